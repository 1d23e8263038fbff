"""Autoregressive domain speed: each method's training cost, beside the cross-entropy step on the same models.

The shipped recipes ``dd2_codebook`` (DD2: a one-step generator of a codebook sequence; GTS first, then the
FCS/CSD generator updates) and ``cfg_distill_markov`` (diversity-rewarded CFG distillation: on-policy samples of
the student scored by the teacher at CFG), each prepared by the domain as a run prepares it (its teacher trained
here with ``--teacher-steps`` steps into a temporary cache: speed does not depend on how well it is trained), then
its job timed over ``--steps`` loop steps after 3 warm-up steps (``train`` itself, checkpoints off). The markov
recipe's CE baseline (the teacher's cross-entropy continued on the same student) is timed beside it as the
reference step.

    .venv/bin/python bench/autoregressive_speed.py [--steps 40] [--teacher-steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stillroom.cli.recipe_commands import recipe_path  # noqa: E402
from stillroom.config.load import load_config  # noqa: E402
from stillroom.domains.autoregressive.prepare import AutoregressiveDomain  # noqa: E402
from stillroom.methods import METHODS  # noqa: E402
from stillroom.train.distributed import Topology  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generative_speed import per_1000_updates  # noqa: E402  (one timing rule for both benches)

RECIPES = {"dd2_codebook": ["dd2"], "cfg_distill_markov": ["cfg_distill", "sft"]}
"""Recipe -> the methods timed on its prepared run (``sft``: the recipe's CE baseline)."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--teacher-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n\n| recipe | method | s per 1000 updates |\n|---|---|---:|")
    with tempfile.TemporaryDirectory() as cache:
        for recipe, methods in RECIPES.items():
            cfg = load_config(recipe_path(recipe), [f"cache_dir={cache}", f"autoregressive.teacher.steps={args.teacher_steps}",
                                       "train.save_every=1000000000", "train.log_every=1000000000"])
            prep = AutoregressiveDomain().prepare(cfg, Topology(), METHODS[methods[0]], log=lambda _: None)
            for method in methods:
                cost = per_1000_updates(prep, method, args.steps, baseline=method == "sft")
                print(f"| {recipe} | {method} | {cost:.1f} |", flush=True)


if __name__ == "__main__":
    main()
