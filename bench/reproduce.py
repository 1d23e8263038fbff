"""Reproduce a method's qualitative claim at CPU scale: ``python bench/reproduce.py METHOD [--seeds 0 1 2]``.

Each method's experiment lives in ``bench/repro/<method>.py`` and exposes
``main(seeds: list[int], work: Path, quick: bool) -> dict`` returning at least
``claim``, ``setting``, ``table_md`` (the table with mean ± std over seeds),
``held`` (True/False, by the shared rule of :mod:`bench.repro.verdict`: a part holds only
beyond the seed spread), ``parts`` and ``analysis``. The result is printed and written to
``bench/results/repro_<method>.json``; docs/REPRODUCTIONS.md quotes those files.

``--from-results`` re-runs only the summary (table, parts, verdict, analysis) on the per-seed
numbers stored in that file, e.g. after the verdict rule changed; nothing is trained.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ["step_by_step", "self_data", "redi", "miniplm", "ddk", "conditional", "meal_v2", "ast", "lelp", "unfused", "ferkd", "dmae", "self_distill_fpt", "self_distill_fpt_text", "taid", "finetunebench", "codsa", "dparallel", "mend", "cross_tokenizer", "pretrained_teacher"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=[*METHODS, "draft_tiny"], help="draft_tiny: only with --from-results "
                    "(its experiment runs as bench/draft_tiny.py)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="a much smaller run (smoke test; numbers not meaningful)")
    ap.add_argument("--from-results", action="store_true",
                    help="recompute table, parts, verdict and analysis from the stored per-seed numbers (no training)")
    args = ap.parse_args(argv)
    if args.from_results:
        return resummarize(args.method)
    if args.method == "draft_tiny":
        ap.error("draft_tiny runs as `python bench/draft_tiny.py`; here only with --from-results")
    if len(args.seeds) < 3 and not args.quick:
        ap.error("a reproduction needs at least 3 seeds (or --quick for a smoke run)")
    import torch

    torch.set_num_threads(1)
    from bench.repro.common import save_result

    module = importlib.import_module(f"bench.repro.{args.method}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        result = module.main(args.seeds, work, args.quick)
    result.update(seeds=args.seeds, quick=args.quick, seconds=round(time.perf_counter() - t0, 1))
    if not args.quick:
        path = save_result(args.method, result)
        print(f"wrote {path}")
    print(f"# {args.method}\n\nclaim: {result['claim']}\nsetting: {result['setting']}\n\n{result['table_md']}\n")
    print(f"held: {result['held']}\n{result['analysis']}")
    return 0


def resummarize(method: str) -> int:
    """Rewrite ``bench/results/repro_<method>.json``'s summary from its own per-seed numbers."""
    import json

    from bench.repro.common import RESULTS

    if method == "draft_tiny":
        module, path = importlib.import_module("bench.draft_tiny"), RESULTS / "draft_tiny.json"
    else:
        module, path = importlib.import_module(f"bench.repro.{method}"), RESULTS / f"repro_{method}.json"
    stored = json.loads(path.read_text())
    old_held = stored.get("held")
    stored.update(module.resummarize(stored))
    stored["verdict_recomputed"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(stored, indent=2, default=str))
    print(f"{method}: held {old_held} -> {stored['held']}: {stored['verdict_text']}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
