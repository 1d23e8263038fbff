"""Draft models for speculative decoding of SmolLM2-135M-Instruct: CE vs distilled drafts.

Pipeline (the Llama-2-Chat-Drafter recipe, Goel et al. 2024, with DistillSpec's
on-policy variant, Zhou et al. 2024):

1. the target samples completions of ``--train-prompts`` bundled instruction prompts
   (:mod:`stillroom.datagen.draft_data`, resumable; written as prompt/completion JSONL);
2. one draft of ``--layers`` layers is derived from the target (angular layer
   selection, the ``draft_forward_kl`` recipe) and copied once per method, so every
   method starts from the same weights and sees the same examples in the same order:
   ``ce`` (plain cross-entropy on the target's tokens), ``forward_kl``, ``tvd_pp``
   and ``onpolicy`` (forward KL; half the micro-batches are the draft's own samples);
3. each draft is measured with :func:`stillroom.generate.spec_eval.run_spec_eval` on
   held-out instruction prompts (another generator seed): acceptance rate, block
   efficiency and measured wall-clock speed-up at ``--gamma`` (default 3 and 5).

The defaults are sized for about 15 minutes on a quiet 2-core CPU (fp32: bf16 is slower on
CPUs without native bf16); they are far too small for the distillation differences to be
reliable (see docs/BENCHMARKS.md). A more meaningful run (hours on 2 cores; the script runs
on the CPU): ``--train-prompts 400 --gen-tokens 128
--steps 400 --micro-batch 8 --seq-len 256 --eval-prompts 16 --eval-tokens 64 --modes greedy sampling``.

Writes ``<out>/summary.json`` and ``<out>/summary.md`` (plus each draft's spec-eval
report under ``<out>/spec/<method>/``). Torch threads are set explicitly and recorded.

    python bench/draft_demo.py --out runs/draft_demo --threads 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

METHODS = ("ce", "forward_kl", "tvd_pp", "onpolicy")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/draft_demo")
    p.add_argument("--threads", type=int, default=2, help="torch threads for data and training (recorded)")
    p.add_argument("--spec-threads", type=int, default=1,
                   help="torch threads for speculative decoding (recorded): on a shared machine 2 threads stall on "
                   "the few-row matmuls of decoding and distort the timings")
    p.add_argument("--eval-only", action="store_true",
                   help="skip training: load each method's draft from <out>/<method>/checkpoints (a previous run)")
    p.add_argument("--layers", type=int, default=5, help="draft layers (SmolLM2-135M has 30)")
    p.add_argument("--train-prompts", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=48, help="max new tokens of the target's completions")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=160)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="training autocast (bf16 is several times slower on CPUs without native bf16)")
    p.add_argument("--onpolicy-new-tokens", type=int, default=24)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, "init"],
                   help="init: the derived draft before any training (a reference row)")
    p.add_argument("--eval-prompts", type=int, default=3)
    p.add_argument("--eval-tokens", type=int, default=24)
    p.add_argument("--gamma", type=int, nargs="+", default=[3, 5])
    p.add_argument("--modes", nargs="+", default=["greedy"], choices=["greedy", "sampling"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def method_config(cfg, method: str, args):
    """(run method, config) of one draft-training method, all other settings shared."""
    from stillroom.config.schema import LossTerm, OnPolicyConfig

    if method == "ce":
        return "sft", cfg
    if method == "onpolicy":
        oc = OnPolicyConfig(student_weight=0.5, fixed_weight=0.5, max_new_tokens=args.onpolicy_new_tokens)
        return "onpolicy", cfg.model_copy(update={
            "method": "onpolicy", "onpolicy": oc,
            "loss": cfg.loss.model_copy(update={"terms": [LossTerm(name="forward_kl")]})})
    return "kd", cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"terms": [LossTerm(name=method)]})})


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    from stillroom.cli.main import _recipe_path
    from stillroom.config.load import load_config
    from stillroom.data.prompts import read_prompts
    from stillroom.generate.spec_eval import run_spec_eval
    from stillroom.methods import METHODS
    from stillroom.run import prepare_run
    from stillroom.train.checkpoint import latest_checkpoint, load_checkpoint
    from stillroom.train.loop import train

    # ---- 1. target-generated data ------------------------------------------------------------
    data_path = out / "target_data.jsonl"
    cfg = load_config(_recipe_path("draft_forward_kl"), [
        "name=draft_demo", f"output_dir={out}", f"seed={args.seed}", f"student.from_teacher.num_layers={args.layers}",
        f"data.sources=[{{path: {data_path}, format: prompt_completion}}]", f"data.seq_len={args.seq_len}",
        f"train.steps={args.steps}", f"train.micro_batch_size={args.micro_batch}", f"train.lr={args.lr}",
        f"train.threads={args.threads}", f"train.precision={args.precision}", "train.warmup_steps=5", "baseline=false",
    ])
    p, data_s = prepare_with_data(cfg, data_path, args, prepare_run)
    target, tok = p.teacher_model, p.tokenizer
    timings = {"data_s": data_s}

    # ---- 2. one derived draft, trained once per method ---------------------------------------
    initial = copy.deepcopy(p.student).eval()
    drafts, train_info = {}, {}
    for method in args.methods:
        if method == "init":
            drafts["init"] = initial
            continue
        run_method, cfg_m = method_config(cfg, method, args)
        model = copy.deepcopy(initial)
        if args.eval_only:
            found = latest_checkpoint(out / method / "checkpoints")
            if found is None:
                raise FileNotFoundError(f"--eval-only: no checkpoint of {method!r} in {out / method / 'checkpoints'}")
            model.load_state_dict(load_checkpoint(found, ["student"])[0]["student"])
        else:
            job, _ = dataclasses.replace(p, cfg=cfg_m).job(model, METHODS[run_method], baseline=False,
                                                           run_dir=out / method, resume=False, log=print)
            train(job)
        rows = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
        train_info[method] = {
            "seconds": round(sum(r["step_s"] for r in rows), 1), "steps": len(rows), "final_loss": rows[-1]["loss"],
            "median_step_s": round(statistics.median(r["step_s"] for r in rows), 3),
            "generate_s": round(sum(r["generate_s"] for r in rows), 1),
            "teacher_s": round(sum(r["teacher_s"] for r in rows), 1), "targets": sum(r["targets"] for r in rows),
        }
        print(f"[{method}] {train_info[method]}", flush=True)
        drafts[method] = model.eval()

    # ---- 3. speculative decoding on held-out prompts -----------------------------------------
    torch.set_num_threads(args.spec_threads)
    prompts = [p.prompt for p in read_prompts("bundled:instructions", args.eval_prompts, seed=args.seed + 12345)]
    results = {}
    for method, draft in drafts.items():
        t0 = time.perf_counter()
        done = out / "spec" / method / "report.json"
        if args.eval_only and done.exists():  # a previous (interrupted) evaluation finished this draft
            old = json.loads(done.read_text())
            same = {"prompts": len(prompts), "gammas": list(args.gamma), "modes": list(args.modes),
                    "max_new_tokens": args.eval_tokens, "seed": args.seed}
            if all(old["settings"].get(k) == v for k, v in same.items()):
                results[method] = old
                print(f"[{method}] spec-eval reused from {done}", flush=True)
                continue
        report = run_spec_eval(target, draft, tok, prompts, args.gamma, max_new_tokens=args.eval_tokens,
                               modes=args.modes, seed=args.seed, out_dir=out / "spec" / method)
        results[method] = report
        print(f"[{method}] spec-eval {time.perf_counter() - t0:.0f} s: " + ", ".join(
            f"{r['mode']} g{r['gamma']} tau={r['block_efficiency']:.2f} x{r['speedup']:.2f}" for r in report["results"]),
            flush=True)

    summary = {
        "settings": {**vars(args), "torch_threads_train": args.threads, "torch_threads_spec": torch.get_num_threads(), "target": "builtin:smollm2-135m-instruct",
                     "platform": platform.platform(), "torch": torch.__version__},
        "draft_layers": p.kept_layers, "timings": timings, "train": train_info,
        "draft_params": sum(x.numel() for x in initial.parameters()),
        "target_params": sum(x.numel() for x in target.parameters()),
        "spec": {m: r["results"] for m, r in results.items()},
        "target_alone": {m: r["baseline"] for m, r in results.items()},
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(render(summary))
    print(render(summary))
    return 0


def prepare_with_data(cfg, data_path, args, prepare_run):
    """Generate (or resume) the target's completions, then prepare the run (teacher, data, derived draft)."""
    from stillroom.data.prompts import read_prompts
    from stillroom.datagen.draft_data import generate_from_items, render_chat_prompts
    from stillroom.models.load import load_model

    t0 = time.perf_counter()
    loaded = load_model(cfg.teacher.model, dtype=torch.float32, cache_dir=cfg.cache_dir)
    prompts = read_prompts("bundled:instructions", args.train_prompts, seed=args.seed, kinds=("messages",))
    stats = generate_from_items(loaded.model.eval(), loaded.tokenizer, render_chat_prompts(prompts, loaded.tokenizer),
                                out=data_path, teacher_id=loaded.identity, max_new_tokens=args.gen_tokens,
                                sampling_temperature=1.0, top_p=1.0, greedy=False, n_samples=1, batch_size=16,
                                seed=args.seed)
    data_s = time.perf_counter() - t0
    print(f"target data: {stats['exported']} records ({stats['samples_written']} generated now) in {data_s:.0f} s",
          flush=True)
    del loaded
    return prepare_run(cfg, log=print)[0], round(data_s, 1)


def render(s: dict) -> str:
    st = s["settings"]
    lines = [
        "# Draft models for SmolLM2-135M-Instruct",
        "",
        f"Draft: {len(s['draft_layers'] or [])} layers {s['draft_layers']} ({s['draft_params']:,} parameters; target "
        f"{s['target_params']:,}). Training: {st['steps']} steps x {st['micro_batch']} sequences (seq_len "
        f"{st['seq_len']}) on {st['train_prompts']} target completions. Eval: {st['eval_prompts']} held-out prompts x "
        f"{st['eval_tokens']} tokens, torch threads {st['torch_threads_train']} (training) / {st['torch_threads_spec']} (decoding). Total {s['total_s']:.0f} s.",
        "",
        "| draft | mode | gamma | alpha | tau | tau vs CE | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    ce = {(r["mode"], r["gamma"]): r["block_efficiency"] for r in s["spec"].get("ce", [])}
    for method, rows in s["spec"].items():
        for r in rows:
            base = ce.get((r["mode"], r["gamma"]))
            rel = f"{(r['block_efficiency'] / base - 1) * 100:+.1f}%" if base and method != "ce" else "-"
            lines.append(f"| {method} | {r['mode']} | {r['gamma']} | {r['acceptance_rate']:.3f} | "
                         f"{r['block_efficiency']:.2f} | {rel} | {r['speedup']:.2f}x |")
    lines += ["", "| draft | train s | median step s | generate s | final loss |", "|---|---|---|---|---|"]
    for method, t in s["train"].items():
        lines.append(f"| {method} | {t['seconds']} | {t['median_step_s']} | {t['generate_s']} | {t['final_loss']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
