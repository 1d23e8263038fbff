"""The quickstart over several seeds: the KD student against the CE baseline at equal steps and at equal wall
time (``baseline_wall_time: true`` in the recipe), mean ± std over seeds, and the quickstart command's wall time.

Runs ``stillroom quickstart seed=S name=<prefix><S>`` for each seed, one after the other (each uses every core);
resumable: a seed whose run folder already holds ``report.json`` is not run again (its wall time is taken from
the JSON written earlier), and a seed whose run stopped half way continues with ``--resume`` (its wall time is
then not one command's, and is left out of the mean).

    python bench/quickstart_seeds.py [--seeds 0 1 2] [--output-dir runs] [--out docs/bench/quickstart_seeds.json] \
        [override ...]

Extra arguments are passed to ``stillroom quickstart`` as overrides (e.g. ``train.steps=60``).
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

from stillroom.files import write_atomic

ROWS = (("student_after", "KD student"), ("baseline", "baseline, CE, equal steps"),
        ("baseline_wall", "baseline, CE, equal wall time"))
METRICS = (("heldout_ce", "held-out CE", 1.0, "{:.3f}"), ("kl_teacher_student", "KL(teacher‖model)", 1.0, "{:.3f}"),
           ("top1_agreement", "top-1 agreement %", 100.0, "{:.1f}"), ("steps", "steps", 1.0, "{:.0f}"),
           ("train_seconds", "train s", 1.0, "{:.0f}"))


def run_seed(seed: int, args: argparse.Namespace, earlier: dict) -> dict:
    """One seed's quickstart (run now, continued, or taken as it is): its report rows and command seconds."""
    name = f"{args.prefix}{seed}"
    run_dir = Path(args.output_dir) / name
    command = [sys.executable, "-m", "stillroom.cli.main", "quickstart", f"seed={seed}", f"name={name}",
               f"output_dir={args.output_dir}", *args.overrides]
    wall_s = (earlier.get(str(seed)) or {}).get("command_s")
    if not (run_dir / "report.json").is_file():
        resumed = (run_dir / "config.resolved.yaml").is_file()
        print(f"seed {seed}: {' '.join(command[2:])}" + (" --resume" if resumed else ""), flush=True)
        t0 = time.perf_counter()
        subprocess.run(command + (["--resume"] if resumed else []), check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall_s = None if resumed else round(time.perf_counter() - t0, 1)
    report = json.loads((run_dir / "report.json").read_text())
    missing = [key for key, _ in ROWS if key not in report["models"]]
    if missing:
        raise SystemExit(f"{run_dir / 'report.json'} has no {', '.join(missing)} row: run the quickstart with "
                         f"baseline: true and baseline_wall_time: true (or --overwrite that seed's run)")
    rows = {key: {m: report["models"][key].get(m) for m, *_ in METRICS} for key, _ in ROWS}
    return {"run_dir": str(run_dir), "command_s": wall_s, "models": rows}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(seeds: dict[str, dict]) -> tuple[list[str], dict]:
    """The markdown table (mean ± std over seeds) and the same numbers as a dict."""
    summary: dict = {}
    lines = ["| model | " + " | ".join(label for _, label, *_ in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for key, label in ROWS:
        cells, summary[key] = [], {}
        for metric, _, scale, fmt in METRICS:
            values = [s["models"][key][metric] for s in seeds.values() if s["models"][key][metric] is not None]
            if not values:
                cells.append("—")
                continue
            mean, std = mean_std([v * scale for v in values])
            summary[key][metric] = {"mean": mean, "std": std}
            cells.append(f"{fmt.format(mean)} ± {fmt.format(std)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    walls = [s["command_s"] for s in seeds.values() if s["command_s"] is not None]
    if walls:
        mean, std = mean_std(walls)
        summary["command_s"] = {"mean": mean, "std": std, "n": len(walls)}
        lines.append(f"\n`stillroom quickstart` wall time: {mean:.0f} ± {std:.0f} s over {len(walls)} seed(s)")
    return lines, summary


def targets(seeds: dict[str, dict]) -> list[str]:
    """The issue's claims, checked on the seed means: KD beats the equal-steps baseline on CE, KL and agreement;
    beats the equal-wall-time one on KL and agreement and is within 0.1 nats of it on CE."""
    def mean(key: str, metric: str) -> float:
        return statistics.mean(s["models"][key][metric] for s in seeds.values())

    out = []
    for base, ce_margin in (("baseline", 0.0), ("baseline_wall", 0.1)):
        ce = mean("student_after", "heldout_ce") - mean(base, "heldout_ce")
        kl = mean("student_after", "kl_teacher_student") - mean(base, "kl_teacher_student")
        top1 = mean("student_after", "top1_agreement") - mean(base, "top1_agreement")
        wins = {"CE": ce < ce_margin, "KL": kl < 0, "top-1": top1 > 0}
        out.append(f"KD − {base}: CE {ce:+.3f} (target < {ce_margin:+.1f}), KL {kl:+.3f} (target < 0), top-1 "
                   f"{100 * top1:+.1f} points (target > 0): " + ", ".join(
                       f"{k} {'holds' if ok else 'FAILS'}" for k, ok in wins.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--output-dir", default="runs")
    ap.add_argument("--prefix", default="quickstart_seed")
    ap.add_argument("--out", default="docs/bench/quickstart_seeds.json", help="the measurements as JSON")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides for every seed's quickstart")
    args = ap.parse_args()
    out = Path(args.out)
    earlier = json.loads(out.read_text()).get("seeds", {}) if out.is_file() else {}
    seeds: dict[str, dict] = {}
    for seed in args.seeds:
        seeds[str(seed)] = run_seed(seed, args, earlier)
        out.parent.mkdir(parents=True, exist_ok=True)  # after every seed: a stopped bench keeps what it measured
        write_atomic(out, json.dumps({"overrides": args.overrides, "seeds": {**earlier, **seeds}}, indent=2) + "\n")
    lines, summary = table(seeds)
    checks = targets(seeds)
    print("\n".join(lines + [""] + checks))
    write_atomic(out, json.dumps({"overrides": args.overrides, "seeds": seeds, "summary": summary,
                                  "targets": checks}, indent=2) + "\n")


if __name__ == "__main__":
    main()
