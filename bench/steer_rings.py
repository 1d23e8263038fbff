"""Steered sampling (spec 15) on the rings: does the exact class posterior turn the unconditional teacher into a
class-conditional sampler, and how close does it come to the teacher's own conditional samples?

The teacher of ``generative_rings_sft`` (trained once with 10% condition dropout, cached) sampled in 50 steps:
``teacher`` (its class label), ``teacher_uncond`` (the null label) and ``teacher_steered`` (the null label,
steered towards each sample's class by the exact posterior at mode std 0.2, ``generative.eval.steer_scale``).
Mode precision counts samples within 3 std of a mode of their *target* class. Three evaluation-noise seeds per
scale (the teacher is one fixed model).

    python bench/steer_rings.py [--scales 0.3 1 3] [--seeds 0 1 2]   # JSON: bench/results/steer_rings.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.repro.common import fmt, markdown_table  # noqa: E402

ROWS = ("teacher", "teacher_uncond", "teacher_steered")
KEYS = ("mode_precision", "mode_recall", "swd_data")


def main() -> int:
    from stillroom.cli.recipe_commands import recipe_path
    from stillroom.config.load import load_config
    from stillroom.run import run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="/tmp/steer_rings")
    a = ap.parse_args()
    t0, raw = time.time(), {}
    for scale in a.scales:
        for seed in a.seeds:
            cfg = load_config(recipe_path("generative_rings_sft"), [f"output_dir={a.out}", f"name=steer_{scale}_{seed}",
                                                       "train.steps=1", "eval.before=false", "baseline=false",
                                                       f"generative.eval.steer_scale={scale}",
                                                       f"generative.eval.seed={seed}",
                                                       "generative.eval.teacher_steps=[]"])
            report = json.loads((run(cfg, log=lambda _m: None) / "report.json").read_text())
            raw[f"{scale}@{seed}"] = {row: {k: report[row][k] for k in KEYS} for row in ROWS}
            print(scale, seed, json.dumps(raw[f"{scale}@{seed}"]), flush=True)
    table = []
    for scale in a.scales:
        runs = [raw[f"{scale}@{s}"] for s in a.seeds]
        for row in ROWS if scale == a.scales[0] else ROWS[2:]:
            name = row if row != "teacher_steered" else f"teacher_steered (scale {scale:g})"
            table.append([name] + [fmt([r[row][k] for r in runs], 3 if k != "swd_data" else 4) for k in KEYS])
    md = markdown_table(["row (50 steps)", "mode precision", "mode recall", "SWD to data"], table)
    out = Path(__file__).resolve().parent / "results" / "steer_rings.json"
    out.write_text(json.dumps({"scales": a.scales, "seeds": a.seeds, "raw": raw, "table_md": md,
                               "seconds": round(time.time() - t0)}, indent=2))
    print(md, f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
