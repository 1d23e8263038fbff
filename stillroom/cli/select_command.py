"""``stillroom select RECIPE [key=value ...]``: MiniPLM difference sampling of the recipe's text corpus.

The recipe's ``teacher.model`` and ``select.reference`` score every instance of ``data`` (cut as
training cuts it); the top ``select.fraction`` is written as text JSONL that any student can be
trained on (``method: sft``). See docs/methods/miniplm.md.
"""

from __future__ import annotations

import argparse


def handle(args: argparse.Namespace) -> int:
    from stillroom.cli.main import _load
    from stillroom.datagen.miniplm import run_select

    cfg = _load(args)
    result = run_select(cfg)
    print(f"selected: {result.selected}\nscores: {result.scores}\nsummary: {result.summary}")
    return 0


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "select",
        help="MiniPLM: keep the corpus instances the teacher predicts much better than a small reference",
        description="Score every instance of the recipe's data with score = NLL_ref - NLL_teacher (per-token means), "
        "keep the top select.fraction in corpus order and write them as text JSONL, plus a scores file and a summary.",
    )
    p.add_argument("recipe", help="recipe YAML file, or the name of a shipped recipe (e.g. miniplm_select)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. select.fraction=0.3")
    p.set_defaults(func=handle)
    return p
