"""Precomputed teacher stores on SmolLM2-135M-Instruct: size, top-k KL error, step cost, training quality.

Teacher: SmolLM2-135M-Instruct (30 layers, V = 49152), fp32 (``--bf16``: bf16). Student: 10 layers
derived from it (every 3rd layer). Data: bundled prose, ``--seq``-token blocks;
the stores cover the first ``--train-seqs`` training blocks. In one run:

1. bytes per stored position at k = 16, 32, 64, float16 and int8 (real store folders);
2. the top-k (K + 1 bins) forward-KL estimate against the dense KL on held-out
   blocks, for the derived student before training and after online training;
3. seconds per optimizer step, timed interleaved (A B C A B C ...): CE only, KD
   with the online teacher, KD reading the store (k = 64 float16 and k = 64 int8),
   as ratios to the CE step;
4. the held-out dense KL(teacher || student) after ``--steps`` KD steps from the
   same initial student on the same batches: online teacher vs stores k = 32/64.

    python bench/teacher_store.py [--steps 12] [--reps 3] [--bf16] [--out docs/bench/teacher_store.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stillroom.config.schema import DataConfig, DataSource, LayerSelection, LossConfig, LossTerm, ModelSource, TrainConfig
from stillroom.data import build_splits, collate
from stillroom.losses import LossMix, forward_kl
from stillroom.models import derive_student, load_model, tokenizer_hash
from stillroom.teachers.signal import OnlineTeacher
from stillroom.teachers.signal import TeacherSignal
from stillroom.teachers.store_format import SequenceSignal, decode_logprobs, encode_rows, id_dtype_for
from stillroom.teachers.store_reader import StoreReader, StoreTeacher
from stillroom.teachers.store_writer import make_header, model_compute, write_store
from stillroom.domains.lm.forward import StudentForward
from stillroom.train.loop import DistillObjective, forward_backward, Player

KS = (16, 32, 64)
DTYPES = ("float16", "int8")
CPU = torch.device("cpu")


def sliced(rows64: dict[str, SequenceSignal], k: int):
    """A store ``compute`` callback serving top-k from precomputed top-64 rows (exact: the top-64 are sorted)."""

    def compute(examples):
        out = []
        for e in examples:
            r = rows64[e.uid]
            rest = torch.cat([r.topk_logprobs_tk[:, k:], r.tail_logmass_t.unsqueeze(-1)], -1)
            out.append(SequenceSignal(e.uid, r.topk_ids_tk[:, :k], r.topk_logprobs_tk[:, :k], torch.logsumexp(rest, -1)))
        return out

    return compute


def train_kd(student0, batches, source, vocab: int, *, lr: float, warmup: int,
             precision: str) -> tuple[torch.nn.Module, float]:
    """Forward-KL steps (fused loss, clip 1.0, AdamW, cosine schedule) from a copy of ``student0``, one per batch of
    ``batches``, with the teacher ``source`` (online or a store); ``(student, training seconds)``."""
    student = copy.deepcopy(student0)
    tc = TrainConfig(steps=len(batches), lr=lr, warmup_steps=warmup, schedule="cosine")
    mix = LossMix(LossConfig(terms=[LossTerm(name="forward_kl")], fused=True, chunk_tokens=1024))
    fwd = StudentForward(student, fused=True, hidden_layers=[], vocab=vocab)
    player = Player("student", student, DistillObjective(fwd, mix, source))
    player.build_optimizer(tc)
    t0 = time.perf_counter()
    student.train()
    for b in batches:
        forward_backward([b], player, fwd, device=CPU, precision=precision, scale=1.0 / b.num_targets)
        torch.nn.utils.clip_grad_norm_(list(student.parameters()), 1.0)
        player.optimizer.step()
        player.scheduler.step()
        player.optimizer.zero_grad(set_to_none=True)
    return student, time.perf_counter() - t0


def heldout_kl(student, teacher_logits: list[torch.Tensor], batches, vocab: int) -> float:
    """Dense KL(teacher || student) per counted held-out token (fp32, T = 1)."""
    total, count = 0.0, 0
    student.eval()
    with torch.no_grad():
        for b, t in zip(batches, teacher_logits):
            s = student(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits[..., :vocab]
            kl, n = forward_kl(s.float(), t, b.loss_mask, chunk_tokens=1024)
            total += float(kl)
            count += n
    return total / count


def topk_estimates(student, teacher_logits, batches, vocab: int, header_for) -> dict[str, float]:
    """Per-token K + 1-bin forward-KL estimates through the real encode/decode path, and the dense KL."""
    sums = {"dense": 0.0} | {f"k{k}/{d}": 0.0 for k in KS for d in DTYPES}
    count = 0
    student.eval()
    with torch.no_grad():
        for b, t in zip(batches, teacher_logits):
            s = student(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits[..., :vocab].float()
            mask = b.loss_mask
            kl, n = forward_kl(s, t, mask, chunk_tokens=1024)
            sums["dense"] += float(kl)
            count += n
            lp = torch.log_softmax(t.float(), -1)
            top_lp, top_ids = lp.topk(64, -1)
            for k in KS:
                tail = torch.logsumexp(lp.scatter(-1, top_ids[..., :k], float("-inf")), -1)
                bsz, width = mask.shape
                row = SequenceSignal("x", top_ids[..., :k].reshape(-1, k), top_lp[..., :k].reshape(-1, k), tail.reshape(-1))
                for d in DTYPES:
                    tensors = encode_rows([row], header_for(k, d))
                    dlp, dtail = decode_logprobs(tensors, 0, bsz * width)
                    sig = TeacherSignal(topk_ids_btk=top_ids[..., :k], topk_logprobs_btk=dlp.reshape(bsz, width, k),
                                        tail_logmass_bt=dtail.reshape(bsz, width))
                    est, _ = forward_kl(s, sig, mask, chunk_tokens=1024)
                    sums[f"k{k}/{d}"] += float(est)
    return {key: v / count for key, v in sums.items()}


def print_estimates(est: dict, when: str) -> None:
    print(f"\nheld-out forward KL, student {when} training: dense {est['dense']:.4f} nats/token\n")
    print("| k | storage | top-k estimate | relative error |\n|---|---|---|---|")
    for k in KS:
        for d in DTYPES:
            e = est[f"k{k}/{d}"]
            print(f"| {k} | {d} | {e:.4f} | {e / est['dense'] - 1:+.2%} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-seqs", type=int, default=32, help="training blocks covered by the stores")
    ap.add_argument("--heldout", type=int, default=4, help="held-out blocks for the KL measurements")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="KD steps per training variant")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--reps", type=int, default=3, help="interleaved timing repetitions")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 teacher weights and bf16 autocast (default fp32: CPUs without AVX512-BF16 run bf16 "
                    "matmuls several times slower than fp32)")
    ap.add_argument("--int8-training", action="store_true", help="also train from the k=64 int8 store")
    ap.add_argument("--out", default=None, help="also write the measurements as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    results: dict = {"args": vars(args), "threads": torch.get_num_threads()}

    def dump(res: dict) -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))

    def note(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    loaded = load_model(ModelSource(builtin="smollm2-135m-instruct"), dtype=torch.float32)
    tok = loaded.tokenizer
    vocab = len(tok)
    student0, kept = derive_student(loaded.model, LayerSelection(strategy="every_n", every_n=3))
    student0 = student0.float()
    teacher = (loaded.model.to(torch.bfloat16) if args.bf16 else loaded.model).eval()
    precision = "bf16" if args.bf16 else "fp32"
    identity = loaded.identity + (" (bf16)" if args.bf16 else "")
    splits = build_splits(DataConfig(sources=[DataSource(bundled="pydoc")], seq_len=args.seq), tok, 0)
    train = splits.train[: args.train_seqs]
    held = splits.heldout[: args.heldout]
    pad = tok.pad_token_id
    held_batches = [collate(held[i : i + args.batch], pad) for i in range(0, len(held), args.batch)]
    online = OnlineTeacher(teacher, vocab_size=vocab)
    held_teacher = [online.signal(b).logits_btv.float() for b in held_batches]

    note("models and data ready")
    # ---- 1. stores and their size ------------------------------------------------------
    tmp = Path(tempfile.mkdtemp(prefix="stillroom-store-bench-"))
    t0 = time.perf_counter()
    rows64 = {r.uid: r for r in model_compute(teacher, k=64, loss_temperature=1.0, vocab_size=vocab, pad_id=pad,
                                              batch_size=args.batch)(train)}
    teacher_pass_s = time.perf_counter() - t0
    n_tokens = sum(len(e.input_ids) for e in train)

    def header_for(k: int, dtype: str, examples=train):
        return make_header(examples, teacher_identity=identity, tokenizer_hash=tokenizer_hash(tok), vocab_size=vocab,
                           k=k, loss_temperature=1.0, logprob_dtype=dtype, shard_tokens=4096)

    sizes = {}
    for k in KS:
        for d in DTYPES:
            folder = tmp / f"k{k}_{d}"
            t0 = time.perf_counter()
            m = write_store(folder, header_for(k, d), train, sliced(rows64, k), log=lambda s: None)
            sizes[f"k{k}/{d}"] = {"bytes_per_token": m["store_bytes"] / m["tokens"], "store_bytes": m["store_bytes"],
                                  "write_s": time.perf_counter() - t0}
    results.update(teacher_pass_s=teacher_pass_s, store_tokens=n_tokens, sizes=sizes,
                   teacher_tokens_per_s=n_tokens / teacher_pass_s, id_dtype=id_dtype_for(vocab))

    note("stores written")
    print(f"\nteacher SmolLM2-135M-Instruct {precision} (V={vocab}), student layers {kept}, {len(train)} x {args.seq} "
          f"store positions, {len(held)} held-out blocks, {torch.get_num_threads()} threads\n"
          f"teacher pass for the store: {n_tokens / teacher_pass_s:.0f} positions/s\n")
    print("| k | log-prob storage | bytes per position |\n|---|---|---|")
    for k in KS:
        for d in DTYPES:
            print(f"| {k} | {d} | {sizes[f'k{k}/{d}']['bytes_per_token']:.1f} |")
    dump(results)
    # ---- 2. top-k estimate error, initial student ----------------------------------------
    hdr = {(k, d): header_for(k, d, held[:1]) for k in KS for d in DTYPES}
    results["kl_estimate_before"] = topk_estimates(student0, held_teacher, held_batches, vocab, lambda k, d: hdr[(k, d)])

    note("top-k estimates (initial student) done")
    print_estimates(results["kl_estimate_before"], "before")
    dump(results)
    # ---- 3. step cost, interleaved ------------------------------------------------------
    step_batch = collate(train[: args.batch], pad)
    timing_student = copy.deepcopy(student0)
    stores = {name: StoreTeacher(StoreReader(tmp / name)) for name in ("k64_float16", "k64_int8", "k32_float16")}
    shared = Player("student", timing_student, DistillObjective(None, LossMix(LossConfig(terms=[LossTerm(name="ce")]))))
    shared.build_optimizer(TrainConfig(steps=1000, warmup_steps=0))  # one AdamW for every variant, as in one run
    timing_opt = shared.optimizer

    def make_step(term: str | None, src):
        terms = [LossTerm(name=term or "ce")]
        mix = LossMix(LossConfig(terms=terms, fused=True, chunk_tokens=1024))
        fwd = StudentForward(timing_student, fused=True, hidden_layers=[], vocab=vocab)
        player = Player("student", timing_student, DistillObjective(fwd, mix, src))

        def step():
            timing_student.train()
            forward_backward([step_batch], player, fwd, device=CPU, precision=precision,
                             scale=1.0 / step_batch.num_targets)
            timing_opt.step()
            timing_opt.zero_grad(set_to_none=True)

        return step

    variants = {
        "ce (student only)": make_step(None, None),
        "kd forward_kl, online teacher": make_step("forward_kl", online),
        "kd forward_kl, store k=64 float16": make_step("forward_kl", stores["k64_float16"]),
        "kd forward_kl, store k=64 int8": make_step("forward_kl", stores["k64_int8"]),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up (also loads the store shards into the reader cache)
    for _ in range(args.reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    signal_s = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        stores["k64_float16"].signal(step_batch)
        signal_s.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    results["step_s"] = {"median": med, "all": times, "store_signal_s": statistics.median(signal_s)}
    del timing_student

    note("step timings done")
    print(f"\n| step ({args.batch}x{args.seq}, {precision}, AdamW) | median s | ratio to CE |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med['ce (student only)']:.2f}x |")
    print(f"\nstore signal for one batch (k=64 float16, shards in RAM): {results['step_s']['store_signal_s'] * 1e3:.1f} ms")
    dump(results)
    # ---- 4. training quality: online vs stores -----------------------------------------
    g = torch.Generator().manual_seed(0)
    order: list[int] = []
    while len(order) < args.steps * args.batch:
        order += torch.randperm(len(train), generator=g).tolist()
    batches = [collate([train[i] for i in order[s * args.batch : (s + 1) * args.batch]], pad) for s in range(args.steps)]
    sources = {"online": online, "store k=32 float16": stores["k32_float16"], "store k=64 float16": stores["k64_float16"]}
    if args.int8_training:
        sources["store k=64 int8"] = stores["k64_int8"]
    train_res = {}
    trained_online = None
    for name, src in sources.items():
        torch.manual_seed(0)
        student, secs = train_kd(student0, batches, src, vocab, lr=args.lr, warmup=2, precision=precision)
        train_res[name] = {"heldout_kl": heldout_kl(student, held_teacher, held_batches, vocab), "train_s": secs}
        if name == "online":
            trained_online = student
        note(f"trained {name}: held-out KL {train_res[name]['heldout_kl']:.4f} in {secs:.0f}s")
    base = train_res["online"]["heldout_kl"]
    for v in train_res.values():
        v["relative_to_online"] = v["heldout_kl"] / base - 1.0
    results["training"] = train_res
    results["heldout_kl_initial"] = results["kl_estimate_before"]["dense"]
    results["kl_estimate_after"] = topk_estimates(trained_online, held_teacher, held_batches, vocab,
                                                  lambda k, d: hdr[(k, d)])
    results["total_s"] = time.perf_counter() - t_start
    print(f"\n| teacher source ({args.steps} KD steps) | held-out KL | vs online |\n|---|---|---|")
    for name, v in train_res.items():
        print(f"| {name} | {v['heldout_kl']:.4f} | {v['relative_to_online']:+.2%} |")
    print(f"(initial student: {results['heldout_kl_initial']:.4f})")
    print_estimates(results["kl_estimate_after"], "after")
    dump(results)

    print(f"\ntotal {results['total_s']:.0f}s")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
