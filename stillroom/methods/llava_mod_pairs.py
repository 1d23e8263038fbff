"""LLaVA-MoD's preference pairs: chosen = the teacher's answer, rejected = the student's own sampled wrong answer.

:func:`wrong_answer_pairs` samples up to ``tries`` answers from the student for each prompt (the existing
KV-cached sampler, :func:`stillroom.generate.sampling.sample_continuations`, seeded per try so equal seeds
give equal pairs) and keeps the first one that differs from the teacher's answer after :func:`normalise`
(case, spaces, a final full stop). Prompts the student answers right every time give no pair: the
preference stage learns where the student errs (its hallucinations on unanswerable questions among them).
:func:`write_pairs` writes the ``{prompt, chosen, rejected}`` JSONL that ``llava_mod.stage: preference``
reads (temporary file + rename).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from stillroom.generate.sampling import eos_token_ids, sample_continuations
from stillroom.files import write_atomic


def normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding spaces or final full stop (how answers are compared)."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def wrong_answer_pairs(student: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], chosen: Sequence[str], *,
                       tries: int = 4, max_new_tokens: int = 8, sampling_temperature: float = 1.0, seed: int = 0,
                       batch_size: int = 64) -> list[dict]:
    """``[{prompt, chosen, rejected}]`` for the prompts where the student sampled a wrong answer in ``tries``.

    ``chosen[i]`` is the teacher's answer to ``prompts[i]`` (the completion text, leading space included);
    the rejected answer is written the same way (``" " + answer``), so both tokenize alike after the prompt.
    """
    if len(prompts) != len(chosen):
        raise ValueError(f"{len(prompts)} prompts but {len(chosen)} chosen answers")
    eos = eos_token_ids(tokenizer, student)
    rejected: list[str | None] = [None] * len(prompts)
    for attempt in range(tries):
        todo = [i for i, r in enumerate(rejected) if r is None]
        if not todo:
            break
        gen = torch.Generator(device=next(student.parameters()).device).manual_seed(seed * 1000 + attempt)
        for start in range(0, len(todo), batch_size):
            rows = todo[start:start + batch_size]
            ids = [tokenizer(prompts[i], add_special_tokens=False)["input_ids"] for i in rows]
            outs = sample_continuations(student, tokenizer, ids, max_new_tokens=max_new_tokens,
                                        sampling_temperature=sampling_temperature, eos_token_id=eos,
                                        generator=gen)
            for i, out in zip(rows, outs):
                answer = normalise(tokenizer.decode(out, skip_special_tokens=True))
                if answer and answer != normalise(chosen[i]):
                    rejected[i] = " " + answer
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, chosen, rejected) if r is not None]


def write_pairs(pairs: list[dict], path: Path) -> Path:
    """Write ``pairs`` as JSONL at ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if not pairs:
        raise ValueError(f"no preference pairs to write to {path}: the student answered every prompt right "
                         "(raise tries or the sampling temperature, or use more prompts)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(p) + "\n" for p in pairs))
    return path
