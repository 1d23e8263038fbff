"""stillroom beside a peer trainer (TRL) on the same token batches, the same student and the same teacher.

Every configuration runs in its own process (so its peak resident memory is its own), warm-up step first,
then ``--reps`` timed steps; the whole list runs twice, forwards then backwards, so slow drift of a shared
machine hits every configuration alike. The table gives median seconds per step, the ratio to the plain
PyTorch CE step, and peak RSS.

* plain PyTorch CE step: HF's own loss from ``labels``, backward, clip 1.0, AdamW (no framework);
* teacher forward: the teacher's logits under ``no_grad`` (the online KD limit is CE step + this);
* ours: ``forward_backward`` of the training loop with CE, forward KL (fused and plain path), JSD, and forward
  KL fed by a real top-k store (``StoreReader`` / ``StoreTeacher``, k = 64), each with clip and AdamW;
* TRL 1.16 ``GKDTrainer`` (``lmbda=0``: off-policy; ``beta=0``: forward KL, ``beta=0.5``: JSD), timed per
  optimizer step by a trainer callback, so its own data path and step are included;
* TRL 1.16's chunked divergence (``trl.trainer.distillation_trainer._chunked_divergence_loss``, the loss of its
  ``DistillationTrainer``, which itself only trains on-policy) in a plain loop: student and teacher bodies, the
  chunked loss over both heads, backward, clip, AdamW.

The peer lives in its own environment, never in stillroom's dependencies::

    python -m venv .venv-peers && .venv-peers/bin/pip install torch==2.13.0 trl==1.16.0
    python bench/peers.py --peer-python .venv-peers/bin/python [--reps 3] [--batch 4] [--seq 256] [--vocab 256000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OURS = ["ours_ce", "ours_fkl_fused", "ours_fkl_plain", "ours_jsd_fused", "ours_store_fkl"]
PLAIN = ["plain_ce", "teacher_forward"]
PEER = ["trl_gkd_fkl", "trl_gkd_jsd", "trl_chunked_fkl", "trl_chunked_jsd"]
STORE_K = 64


# ---------------------------------------------------------------- preparation (stillroom's environment)

def prepare(work: Path, batch_size: int, seq: int, vocab: int | None = None) -> None:
    """Teacher and student as HF folders, the token batch, and a top-k store of the teacher on it. ``vocab``:
    both models' embeddings and (tied) heads resized to that many rows first (new rows drawn around the mean
    embedding, transformers' default), to measure a large vocabulary on the same bodies and tokens."""
    from safetensors.torch import save_file

    from smollm2_setup import smollm2_setup
    from stillroom.teachers.store_writer import make_header, model_compute, write_store

    if (work / "ready").exists():
        return
    torch.manual_seed(0)
    setup = smollm2_setup(batch_size, seq)
    tok, examples, batch, kept = setup.tokenizer, setup.examples, setup.batch, setup.kept
    if vocab:
        for model in (setup.teacher, setup.student):
            model.resize_token_embeddings(vocab)
    vocab = vocab or len(tok)
    for name, model in (("teacher", setup.teacher), ("student", setup.student)):
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)
    # HF convention: unshifted labels, -100 where nothing is learned (the model shifts them itself).
    learn = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    learn[:, 1:] = batch.target_ids[:, :-1] != -100
    labels = torch.where(learn, batch.input_ids, torch.full_like(batch.input_ids, -100))
    save_file({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels,
               "target_ids": batch.target_ids}, str(work / "batch.safetensors"))
    (work / "batch.json").write_text(json.dumps({"uids": batch.uids, "kept_layers": kept, "vocab": vocab}))
    header = make_header(examples, teacher_identity="builtin:smollm2-135m-instruct", tokenizer_hash="bench",
                         vocab_size=vocab, k=STORE_K, loss_temperature=1.0, logprob_dtype="float16")
    write_store(work / "store", header, examples,
                model_compute(setup.teacher.eval(), k=STORE_K, loss_temperature=1.0, vocab_size=vocab,
                              pad_id=tok.pad_token_id), log=lambda _: None)
    (work / "ready").write_text("ok")


# ---------------------------------------------------------------- one configuration (its own process)

def _batch(work: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(work / "batch.safetensors"))


def _models(work: Path, teacher: bool):
    from transformers import AutoModelForCausalLM
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    t = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).eval() if teacher else None
    return student, t


def _status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> int:
    """Reset the peak-RSS counter (``VmHWM``) to the current RSS and return that RSS in KiB: the step's own peak is
    then ``VmHWM`` minus it (what the steps add above the models, optimizer state and inputs already resident)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def _clip_step(model, opt) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def plain_steps(config: str, work: Path, precision: str):
    """A step function for the plain PyTorch CE step and the teacher forward."""
    b = _batch(work)
    student, teacher = _models(work, teacher=config == "teacher_forward")
    if config == "teacher_forward":
        teacher = teacher.to(torch.bfloat16) if precision == "bf16" else teacher

        def forward():
            with torch.no_grad():
                teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return forward
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4)

    def ce():
        student.train()
        with _autocast(precision):
            loss = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        _clip_step(student, opt)
    return ce


def our_steps(config: str, work: Path, precision: str, chunk_tokens: int | None = None):
    """A step of stillroom's loop (``forward_backward`` + clip + AdamW) on the prepared batch."""
    from stillroom.config.schema import LossConfig, LossTerm, TrainConfig
    from stillroom.data.batch import Batch
    from stillroom.domains.lm.forward import StudentForward
    from stillroom.losses import LossMix
    from stillroom.teachers.signal import OnlineTeacher
    from stillroom.teachers.store_reader import StoreReader, StoreTeacher
    from stillroom.train.loop import DistillObjective, Player, forward_backward

    b = _batch(work)
    meta = json.loads((work / "batch.json").read_text())
    batch = Batch(input_ids=b["input_ids"], attention_mask=b["attention_mask"], target_ids=b["target_ids"],
                  uids=meta["uids"], n_bytes=torch.zeros(len(meta["uids"]), dtype=torch.long))
    student, teacher_model = _models(work, teacher=config != "ours_ce" and config != "ours_store_fkl")
    term = {"ours_ce": "ce", "ours_jsd_fused": "jsd"}.get(config, "forward_kl")
    fused = config != "ours_fkl_plain"
    if config == "ours_store_fkl":
        teacher = StoreTeacher(StoreReader(work / "store"))
    elif teacher_model is not None:
        teacher_model = teacher_model.to(torch.bfloat16) if precision == "bf16" else teacher_model
        teacher = OnlineTeacher(teacher_model, vocab_size=meta["vocab"])
    else:
        teacher = None
    chunk = {} if chunk_tokens is None else {"chunk_tokens": chunk_tokens}
    mix = LossMix(LossConfig(terms=[LossTerm(name=term)], fused=fused, **chunk))
    if fused and teacher is not None:  # as a run does (stillroom/domains/lm/prepare.py)
        from stillroom.domains.lm.head_teacher import head_mode_teacher

        teacher = head_mode_teacher(teacher, mix)
    forward = StudentForward(student, fused=fused, hidden_layers=[], vocab=meta["vocab"])
    player = Player("student", student, DistillObjective(forward, mix, teacher))
    player.build_optimizer(TrainConfig(steps=1000, warmup_steps=0))

    def step():
        student.train()
        forward_backward([batch], player, forward, device=torch.device("cpu"), precision=precision,
                         scale=1.0 / batch.num_targets)
        _clip_step(student, player.optimizer)
    return step


def trl_chunked_steps(config: str, work: Path, precision: str):
    """TRL's chunked divergence loss in a plain loop (what its DistillationTrainer computes per step)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    b = _batch(work)
    student, teacher = _models(work, teacher=True)
    teacher = teacher.to(torch.bfloat16) if precision == "bf16" else teacher
    beta = 0.0 if config.endswith("fkl") else 0.5
    mask = b["labels"][:, 1:] != -100
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4)

    def step():
        student.train()
        with _autocast(precision):
            hs = student.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            with torch.no_grad():
                ht = teacher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            loss, _, _ = _chunked_divergence_loss(hs[:, :-1], ht[:, :-1], student.lm_head.weight,
                                                  teacher.lm_head.weight, mask, beta)
        loss.backward()
        _clip_step(student, opt)
    return step


def trl_gkd_times(config: str, work: Path, precision: str, reps: int) -> tuple[list[float], int]:
    """Seconds of each of ``reps`` optimizer steps of TRL's GKDTrainer (after one warm-up step), and the RSS
    (KiB) when the peak counter was reset before them."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    b = _batch(work)
    student, teacher = _models(work, teacher=True)
    times: list[float] = []
    rest: list[int] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if len(times) == 1:  # after the warm-up step, as for the other rows
                rest.append(reset_peak())
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    bsz = b["input_ids"].shape[0]
    args = GKDConfig(output_dir=str(work / "trl_out"), per_device_train_batch_size=bsz, max_steps=reps + 1,
                     learning_rate=5e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                     lmbda=0.0, beta=0.0 if config.endswith("fkl") else 0.5, temperature=1.0,
                     bf16=precision == "bf16", use_cpu=True, report_to=[], logging_steps=10**6,
                     save_strategy="no", dataloader_num_workers=0, max_length=b["input_ids"].shape[1])
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                         data_collator=lambda rows: {k: b[k].clone() for k in ("input_ids", "attention_mask", "labels")},
                         train_dataset=Dataset.from_dict({"row": list(range(bsz * (reps + 1)))}),
                         processing_class=AutoTokenizer.from_pretrained(work / "student"), callbacks=[StepTimer()])
    trainer.train()
    return times[1:], rest[0]


def worker(config: str, work: Path, precision: str, reps: int, chunk_tokens: int | None) -> None:
    torch.manual_seed(0)
    if config.startswith("trl_gkd"):
        times, rest_kib = trl_gkd_times(config, work, precision, reps)
    else:
        build = plain_steps if config in PLAIN else trl_chunked_steps if config.startswith("trl_") else our_steps
        step = build(config, work, precision, chunk_tokens) if build is our_steps else build(config, work, precision)
        step()  # warm-up
        rest_kib = reset_peak()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    step_peak_mib = (_status_kib("VmHWM") - rest_kib) / 1024
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"config": config, "times": times, "peak_rss_mib": peak_mib,
                                  "step_peak_mib": step_peak_mib}))


# ---------------------------------------------------------------- orchestration

def run_one(python: str, config: str, work: Path, precision: str, reps: int, threads: int,
            chunk_tokens: int | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [python, __file__, "--worker", config, "--work", str(work), "--precision", precision, "--reps", str(reps)]
    cmd += [] if chunk_tokens is None else ["--chunk-tokens", str(chunk_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{config} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--peer-python", default=".venv-peers/bin/python", help="python of the environment with trl")
    ap.add_argument("--work", default="runs/bench_peers")
    ap.add_argument("--only", default=None, help="comma-separated configurations (default: all)")
    ap.add_argument("--out", default=None, help="also write the measurements as JSON here")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="loss.chunk_tokens of our rows (default: the config's)")
    ap.add_argument("--vocab", type=int, default=None, help="resize both models' vocabularies to this (e.g. 256000)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # --work is then the prepared folder itself
        worker(args.worker, Path(args.work), args.precision, args.reps, args.chunk_tokens)
        return
    work = Path(args.work) / (f"{args.batch}x{args.seq}" + (f"_v{args.vocab}" if args.vocab else ""))
    from stillroom.models.precision import resolve_precision
    precision = resolve_precision(args.precision, "cpu")
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.batch, args.seq, args.vocab)
    configs = args.only.split(",") if args.only else PLAIN + OURS + PEER
    if not Path(args.peer_python).exists():
        print(f"no peer environment at {args.peer_python}: TRL rows skipped (see the module docstring)")
        configs = [c for c in configs if c not in PEER]
    threads = torch.get_num_threads()
    results: dict[str, dict] = {c: {"times": [], "peak_rss_mib": 0.0, "step_peak_mib": 0.0} for c in configs}
    for order in (configs, configs[::-1]):
        for c in order:
            python = args.peer_python if c in PEER else sys.executable
            r = run_one(python, c, work, precision, args.reps, threads, args.chunk_tokens)
            results[c]["times"] += r["times"]
            for key in ("peak_rss_mib", "step_peak_mib"):
                results[c][key] = max(results[c][key], r[key])
            print(f"  {c}: {statistics.median(r['times']):.3f} s/step, step peak {r['step_peak_mib']:.0f} MiB, "
                  f"process peak {r['peak_rss_mib']:.0f} MiB", flush=True)
    med = {c: statistics.median(r["times"]) for c, r in results.items()}
    base = med.get("plain_ce")
    print(f"\nbatch {args.batch}x{args.seq}, {precision}, {threads} threads, {2 * args.reps} steps per row "
          f"(two processes each)\n")
    print("| step | median s | ratio to plain CE | step peak MiB (above resident) | process peak RSS MiB |")
    print("|---|---|---|---|---|")
    for c in configs:
        ratio = f"{med[c] / base:.2f}x" if base else "-"
        r = results[c]
        print(f"| {c} | {med[c]:.3f} | {ratio} | {r['step_peak_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
    if base and "teacher_forward" in med:
        print(f"\nonline KD limit (plain CE + teacher forward): {base + med['teacher_forward']:.3f} s "
              f"({(base + med['teacher_forward']) / base:.2f}x)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"median_s": med, "results": results, "precision": precision}, indent=1))


if __name__ == "__main__":
    main()
