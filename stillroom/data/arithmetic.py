"""Seeded grade-school arithmetic word problems with exact answers and step-by-step rationales.

Why: reasoning-distillation methods (Distilling Step-by-Step, REDI, self-data
distillation) need problems with a checkable final answer and a reference
rationale. This generator makes them offline, at any size, deterministically.

Levels:
    1: one operation on small numbers (1 step);
    2: two steps;
    3: three or four steps, always with multiplication and/or division whose
       results stay integral.

Every step is a binary operation ``a op b = c`` written into the rationale
sentence; the generator evaluates each step itself and asserts that every
intermediate result is a non-negative integer and that the last step's
result is the answer. Problem ``i`` depends only on ``(seed, i)`` (and the
problems before it, for de-duplication), so ``generate_problems(10, s)[:5] ==
generate_problems(5, s)``.

Record keys: ``id`` (``arith-<level>-<hash of the question>``), ``level``,
``question``, ``rationale``, ``answer`` (int), ``steps`` (number of steps),
``prompt``, ``completion``, ``messages``, ``label_completion``. See
docs/ARITHMETIC.md.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from stillroom.data.arithmetic_templates import TEMPLATES, Retry, Steps

ANSWER_TRIGGER = "The answer is"
INSTRUCTION = f'Solve it step by step, then end with "{ANSWER_TRIGGER} N." where N is the final number.'
LEVELS = (1, 2, 3)

_STEP_RANGE = {1: (1, 1), 2: (2, 2), 3: (3, 4)}


def _make_one(level: int, rng: random.Random) -> dict:
    for _ in range(100):
        steps = Steps()
        template = rng.choice(TEMPLATES[level])
        try:
            question = template(rng, steps)
        except Retry:
            continue
        lo, hi = _STEP_RANGE[level]
        assert lo <= len(steps.results) <= hi, (template.__name__, len(steps.results))
        return _record(level, question, steps)
    raise RuntimeError(f"arithmetic generator could not draw a level-{level} problem (bug in a template)")


def _record(level: int, question: str, steps: Steps) -> dict:
    answer = steps.results[-1]
    rationale = " ".join(steps.sentences)
    label = f"{ANSWER_TRIGGER} {answer}."
    prompt = f"{question}\n{INSTRUCTION}\n"
    completion = f"{rationale} {label}"
    digest = hashlib.sha1(question.encode("utf-8")).hexdigest()[:12]
    return {
        "id": f"arith-{level}-{digest}",
        "level": level,
        "question": question,
        "rationale": rationale,
        "answer": answer,
        "steps": len(steps.results),
        "prompt": prompt,
        "completion": completion,
        "messages": [
            {"role": "user", "content": prompt.rstrip("\n")},
            {"role": "assistant", "content": completion},
        ],
        "label_completion": label,
    }


def generate_problems(n: int, seed: int, levels: Sequence[int] = LEVELS) -> list[dict]:
    """Generate ``n`` distinct problems; problem ``i`` has level ``levels[i % len(levels)]``.

    Deterministic: the same ``(n, seed, levels)`` gives an identical list, and a
    shorter list is a prefix of a longer one. Questions are unique within the list.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    levels = tuple(levels)
    bad = [lv for lv in levels if lv not in LEVELS]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty sequence drawn from {LEVELS}, got {levels!r}")
    out: list[dict] = []
    seen: set[str] = set()
    for i in range(n):
        level = levels[i % len(levels)]
        for attempt in range(1000):
            rng = random.Random(f"stillroom-arithmetic:{seed}:{i}:{attempt}")
            rec = _make_one(level, rng)
            if rec["question"] not in seen:
                break
        else:  # pragma: no cover - the problem space is far larger than any sane n
            raise RuntimeError(f"could not find a new level-{level} problem after 1000 draws; n={n} is too large")
        seen.add(rec["question"])
        out.append(rec)
    return out


_FORMATS = {
    "prompt_completion": ("id", "level", "prompt", "completion", "answer"),
    "messages": ("id", "level", "messages", "answer"),
    "full": None,
}


def write_jsonl(problems: Iterable[dict], path: str | os.PathLike, format: str = "prompt_completion") -> Path:
    """Write problems as JSON lines, atomically (temp file + rename). Returns the path.

    ``format``: ``prompt_completion`` (id, level, prompt, completion, answer),
    ``messages`` (id, level, messages, answer) or ``full`` (every key).
    """
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {sorted(_FORMATS)}, got {format!r}")
    keys = _FORMATS[format]
    from stillroom.data.jsonl import write_jsonl_atomic

    return write_jsonl_atomic(path, (rec if keys is None else {k: rec[k] for k in keys} for rec in problems))
