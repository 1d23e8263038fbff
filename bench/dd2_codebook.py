"""DD2's CPU experiment (spec 12.6): a one-step generator distilled from an autoregressive teacher on the exact-
evaluation codebook toy, against sampling each position independently from the teacher's marginals.

Every arm is a real ``stillroom run dd2_codebook`` (the recipe's teacher: a LlamaForCausalLM trained here once,
teacher.seed 0, shared by all seeds; the seed changes the generator, the guidance network, GTS and the noise):

* **A**: each position drawn independently from the teacher's marginals (the report's ``teacher_independent`` row);
* **B**: DD2 without GTS (``dd2.gts_steps=0``: generator and guidance from random initialisation);
* **C**: DD2 full (GTS, then CSD in the SiD alpha = 1 form against FCS);
* **D**: C with the DMD-form generator loss.

Metric: exact TV between the empirical joint of 20k snapped samples and the teacher's enumerated joint, and
the TVs of the (q1, q2) and (q1, q4) marginals. Pass (spec): C's joint TV <= 0.5 x A's and <= B's, each beyond
the seed spread (``bench/repro/verdict.py``). Steps are shortened from the spec's (GTS 1k, CSD/FCS 3k) to
``--steps`` / ``--gts-steps`` to fit about 10 minutes on 2 shared cores.

    .venv/bin/python bench/dd2_codebook.py            # 3 seeds -> bench/results/dd2_codebook.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.repro.common import RESULTS, fmt, markdown_table  # noqa: E402
from bench.repro.verdict import beyond_spread, verdict_fields  # noqa: E402

CLAIM = ("DD2 (Liu et al. 2025, spec 12): a one-step generator distilled by conditional score distillation from an "
         "AR teacher's analytic scores matches the teacher's joint far better than one-step independent sampling "
         "(C's joint TV <= 0.5 x A's) and GTS initialisation matters (C's <= B's)")
ARMS = {"B": ["dd2.gts_steps=0"], "C": [], "D": ["dd2.generator_loss=dmd"]}
KEYS = ("joint_tv", "pair_tv_12", "pair_tv_14")


def run_arm(arm: str, seed: int, out: Path, cache: Path, steps: int, gts_steps: int) -> dict:
    gts = [] if arm == "B" else [f"dd2.gts_steps={gts_steps}"]
    args = [sys.executable, "-m", "stillroom.cli.main", "run", "dd2_codebook", f"output_dir={out}",
            f"cache_dir={cache}", f"name={arm}-s{seed}", f"seed={seed}", f"train.steps={steps}", *gts, *ARMS[arm]]
    subprocess.run(args, check=True, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    return json.loads((out / f"{arm}-s{seed}" / "report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--gts-steps", type=int, default=300)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "stillroom"))
    ap.add_argument("--note", default="", help="analysis text appended to the generated one")
    a = ap.parse_args(argv)
    t0, per_seed = time.time(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            reports = {arm: run_arm(arm, seed, Path(tmp), Path(a.cache), a.steps, a.gts_steps) for arm in ARMS}
            rows = {arm: {k: r["student_after"][k] for k in KEYS} for arm, r in reports.items()}
            rows["A"] = {k: reports["C"]["teacher_independent"][k] for k in KEYS}
            rows["teacher samples"] = {k: reports["C"]["teacher"][k] for k in KEYS}
            per_seed[seed] = rows
            print(seed, json.dumps(rows), flush=True)
    result = summarize(per_seed, a)
    result["seconds"] = round(time.time() - t0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "dd2_codebook.json"
    path.with_suffix(".json.tmp").write_text(json.dumps(result, indent=2))
    path.with_suffix(".json.tmp").replace(path)
    print(result["table_md"], "\n", result["verdict_text"], "\n", result["analysis"])
    return 0


def shortened(a) -> bool:
    """Whether the run's steps fall short of the spec's (GTS 1k, CSD/FCS 3k)."""
    return a.gts_steps < 1000 or a.steps < 3000


def summarize(per_seed: dict, a) -> dict:
    seeds = sorted(per_seed)

    def col(arm: str, key: str = "joint_tv") -> list[float]:
        return [per_seed[s][arm][key] for s in seeds]

    arms = ["A", "B", "C", "D", "teacher samples"]
    table = markdown_table(["arm", "joint TV", "TV (q1,q2)", "TV (q1,q4)"],
                           [[arm, *(fmt(col(arm, k)) for k in KEYS)] for arm in arms])
    half_a = beyond_spread("C's joint TV <= 0.5 x A's (0.5 A - C)",
                           [0.5 * x - y for x, y in zip(col("A"), col("C"))])
    b_vs_c = beyond_spread("C's joint TV <= B's (B - C)", [x - y for x, y in zip(col("B"), col("C"))])
    d_vs_c = beyond_spread("D's joint TV <= C's (C - D)", [x - y for x, y in zip(col("C"), col("D"))])
    parts = [half_a, b_vs_c, d_vs_c]
    fields = verdict_fields(parts, required=[half_a.name, b_vs_c.name])
    mean = {arm: sum(col(arm)) / len(seeds) for arm in arms}
    analysis = (f"Mean joint TV: A {mean['A']:.3f}, B {mean['B']:.3f}, C {mean['C']:.3f}, D {mean['D']:.3f}; the "
                f"sampling floor of 20k exact teacher samples is {mean['teacher samples']:.3f}. "
                + ("C reaches half of A's TV. " if half_a.held else
                   "C does not reach half of A's TV: the one-step generator learns part of the correlations (its "
                   "pairwise TVs fall below A's where they do) but its joint stays far from the teacher's"
                   + ("; the spec's 3k alternating steps were cut to fit the CPU budget. " if shortened(a) else
                      ", at the spec's step counts too. "))
                + ("GTS helps beyond the seed spread." if b_vs_c.held else
                   "GTS initialisation does not help beyond the seed spread here.")
                + a.note)
    return {"method": "dd2_codebook", "claim": CLAIM, "seeds": seeds, "per_seed": per_seed,
            "setting": (f"codebook toy V = 8 in R^2, n = 4; teacher LlamaForCausalLM (2 layers, d 32, 400 steps, "
                        f"seed 0, shared); GTS {a.gts_steps} steps, CSD/FCS {a.steps} alternating steps (spec: 1k / "
                        f"3k{', shortened for CPU' if shortened(a) else ''}), batch 256, lr 1e-3; 20k samples per arm"),
            "table_md": table, "analysis": analysis, "finished": time.strftime("%Y-%m-%d %H:%M"), **fields}


if __name__ == "__main__":
    raise SystemExit(main())
