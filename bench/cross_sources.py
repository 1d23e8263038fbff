"""Cross-tokenizer distillation from a top-k teacher store against the online teacher, on the shipped recipe.

    python bench/cross_sources.py                         # online vs store k=64 int8 vs k=16 int8, seed 0
    python bench/cross_sources.py --seeds 0,1 --steps 150 --out /tmp/cross_sources

The online cross teacher reduces SmolLM2's whole distribution at every aligned position; a store keeps only its
top k at the teacher's own positions, and the matched tokens outside them share the tail as
``stillroom/teachers/cross_topk.py`` documents. This runs ``recipes/cross_tokenizer.yaml`` (SmolLM2-135M-Instruct
into a 4-layer student with its own 8k BPE; CE + forward KL on matched tokens + ULD on the rest) once per arm
and seed through the real CLI (``stillroom cache-teacher`` then ``stillroom run``; no CE baseline), with the
same steps, batches and seed, and prints the held-out bits per byte of each student (the report's number) and
its difference to the online arm of the same seed. Results go to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STILLROOM = [sys.executable, "-m", "stillroom.cli.main"]


def arm_overrides(arm: str) -> list[str]:
    if arm == "online":
        return []
    k, dtype = arm.removeprefix("store_k").split("_")
    return ["teacher.source=store", f"teacher.store.k={k}", f"teacher.store.logprob_dtype={dtype}"]


def run_arm(arm: str, seed: int, steps: int, out: Path) -> dict:
    name = f"{arm}_s{seed}"
    common = [f"name={name}", f"output_dir={out}", f"seed={seed}", f"train.steps={steps}", "baseline=false",
              "eval.generations=0", "eval.before=false"]
    if arm != "online":
        # the store of the run's own training text (one per arm and seed: the student's BPE is trained per run)
        common.append(f"teacher.store.path={out / name / 'teacher_store'}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.time()
    if arm != "online":
        subprocess.run([*STILLROOM, "cache-teacher", "cross_tokenizer", *common, *arm_overrides(arm)], check=True,
                       cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    cached = time.time() - start
    subprocess.run([*STILLROOM, "run", "cross_tokenizer", *common, *arm_overrides(arm)], check=True, cwd=ROOT,
                   env=env, stdout=subprocess.DEVNULL)
    report = json.loads((out / name / "report.json").read_text())
    return {"arm": arm, "seed": seed, "bits_per_byte": report["models"]["student_after"]["bits_per_byte"],
            "teacher_bits_per_byte": report["models"]["teacher"]["bits_per_byte"],
            "cache_s": round(cached, 1), "total_s": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="online,store_k64_int8,store_k16_int8")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", type=Path, default=Path("/tmp/cross_sources"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            rows.append(run_arm(arm, seed, args.steps, args.out))
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    online = {r["seed"]: r["bits_per_byte"] for r in rows if r["arm"] == "online"}
    print(f"\n| arm | bits per byte ({len(online)} seed(s)) | vs online, same seed |\n|---|---|---|")
    for arm in args.arms.split(","):
        mine = [r for r in rows if r["arm"] == arm]
        bpb = [r["bits_per_byte"] for r in mine]
        diff = [r["bits_per_byte"] - online[r["seed"]] for r in mine if r["seed"] in online]
        spread = f" ± {statistics.stdev(bpb):.3f}" if len(bpb) > 1 else ""
        dtext = f"{statistics.mean(diff):+.4f}" + (f" ± {statistics.stdev(diff):.4f}" if len(diff) > 1 else "")
        print(f"| {arm} | {statistics.mean(bpb):.4f}{spread} | {dtext} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
