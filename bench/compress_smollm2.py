"""Real scale (issue 12): SmolLM2-135M-Instruct pruned to about half of its non-embedding parameters by width
and by depth, each recovered by KD from the dense model and, on the same tokens, by CE only, side by side
with the dense teacher.

The prunings are the shipped recipes ``prune_smollm2_width`` (6 of 9 heads over the 3 KV groups, MLP 1536 ->
640, every layer) and ``prune_smollm2_depth`` (15 of 30 layers, angular), run by
``stillroom.compress.prune.prune`` exactly as ``stillroom prune RECIPE`` does. Each pruned folder is then
the student of one ``stillroom run`` (method kd, forward KL, ``baseline: true`` trains a copy with plain CE on
the same batches). Kept small for 2 CPU cores: ``--steps`` steps (default 60) of ``--micro-batch`` (4) x 128
tokens of pydoc prose; held-out metrics on ``--heldout`` (16) x 128-token held-out sequences.
Writes bench/results/compress_smollm2.json and
prints the table of docs/BENCHMARKS.md (with raw tokens/s; the page gives each as a ratio to the teacher
timed beside it, from the run logs, because the raw rates move with the machine's load).

    .venv/bin/python bench/compress_smollm2.py [--steps 60] [--out runs/compress_smollm2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = {"width": "prune_smollm2_width", "depth": "prune_smollm2_depth"}
METRICS = ("params", "heldout_ce", "kl_teacher_student", "top1_agreement", "tokens_per_s")


def run_config(kind: str, out: Path, steps: int, micro_batch: int = 4, heldout: int = 16) -> dict:
    """The shipped prune recipe plus the recovery run's sections (one RunConfig serves both commands)."""
    recipe = yaml.safe_load((ROOT / "stillroom" / "recipes" / f"{RECIPES[kind]}.yaml").read_text())
    recipe["prune"]["out"] = str(out / kind / "pruned")
    recipe["prune"]["overwrite"] = True
    return {**recipe, "name": f"{kind}_recover", "output_dir": str(out / kind), "method": "kd", "baseline": True,
            "teacher": {**recipe["teacher"], "dtype": "float32"},
            "data": {**recipe["data"], "heldout_max": heldout},
            "loss": {"terms": [{"name": "forward_kl"}]},
            "train": {"steps": steps, "micro_batch_size": micro_batch, "lr": 3e-4, "warmup_steps": 5, "precision": "fp32",
                      "keep_checkpoints": 1, "log_every": 10},
            "eval": {"heldout_sequences": heldout, "batch_size": 4, "generations": 0, "speed_tokens": 512}}


def one(kind: str, out: Path, steps: int, micro_batch: int, heldout: int) -> dict:
    from stillroom.compress.prune import prune
    from stillroom.config.schema import RunConfig
    from stillroom.run import run

    cfg = run_config(kind, out, steps, micro_batch, heldout)
    t0 = time.time()
    result = prune(RunConfig.model_validate(cfg), log=print)
    pruned_s = time.time() - t0
    run_dir = run(RunConfig.model_validate({**cfg, "student": {"model": {"path": str(result.folder)}}}),
                  overwrite=True, log=print)
    models = json.loads((run_dir / "report.json").read_text())["models"]
    pick = lambda row: {k: row.get(k) for k in METRICS}  # noqa: E731
    return {"prune_seconds": round(pruned_s, 1), "params_after_prune": result.params_after,
            "teacher": pick(models["teacher"]), "pruned": pick(models["student_before"]),
            "kd": pick(models["student_after"]), "ce_only": pick(models["baseline"]),
            "seconds": round(time.time() - t0)}


def table(results: dict) -> str:
    def row(name: str, m: dict) -> str:
        def f(key: str, spec: str) -> str:
            v = m.get(key)
            return "n/a" if v is None else format(100 * v if key == "top1_agreement" else v, spec)
        return (f"| {name} | {m['params'] / 1e6:.1f}M | {f('heldout_ce', '.3f')} | {f('kl_teacher_student', '.3f')} "
                f"| {f('top1_agreement', '.1f')}% | {f('tokens_per_s', '.0f')} |")
    lines = ["| model | params | held-out CE | KL(teacher, student) | top-1 agreement | tokens/s |",
             "|---|---|---|---|---|---|", row("dense teacher (30 layers)", results["width"]["teacher"])]
    for kind, label in (("width", "width-pruned"), ("depth", "depth-pruned")):
        r = results[kind]
        lines += [row(f"{label}, before recovery", r["pruned"]), row(f"{label} + KD", r["kd"]),
                  row(f"{label} + CE only", r["ce_only"])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="recovery steps of micro-batch x 128 tokens (KD and CE each)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences of 128 tokens per step")
    ap.add_argument("--heldout", type=int, default=16, help="held-out sequences measured")
    ap.add_argument("--out", default="runs/compress_smollm2", help="where the pruned folders and runs go")
    args = ap.parse_args()
    out = Path(args.out)
    results = {kind: one(kind, out, args.steps, args.micro_batch, args.heldout) for kind in RECIPES}
    md = table(results)
    path = ROOT / "bench" / "results" / "compress_smollm2.json"
    payload = {"steps": args.steps, "tokens_per_step": args.micro_batch * 128, "heldout_sequences": args.heldout, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
               "results": results, "table_md": md}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    print(md)


if __name__ == "__main__":
    main()
