"""CoMD's pieces that do not depend on the loop: instructions drawn from the scene-question generator, greedy
answers of a model (teacher or student), pool items as training sequences, and the exact-match judge.

An instruction is the text form of a scene question (:func:`stillroom.domains.vl.vqa.text_record`); its prompt is
encoded exactly as the data pipeline encodes a ``prompt_completion`` record (BOS rule of
:class:`~stillroom.data.formats.TextEncoder`), and the teacher's greedy continuation (ending at EOS) is the
completion, the only target tokens. Answers are compared with :func:`stillroom.domains.vl.vqa.check_answer`
(case, spacing, a final full stop and count digits do not matter).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from stillroom.config.comd import ComdConfig
from stillroom.data.batch import Example
from stillroom.data.formats import TextEncoder
from stillroom.domains.vl.vqa import QA, check_answer, instance, text_record
from stillroom.generate.sampling import eos_token_ids, sample_continuations

DRAWS = 100
"""Fresh draws per wanted instruction before giving up (every one equal to a held-out question)."""
Wanted = tuple[str, int]
"""(family, level) of one instruction to draw."""


@dataclass(frozen=True)
class Instruction:
    """A scene question in text form with its ground-truth answer (used by the report only)."""

    prompt: str
    qa: QA


@dataclass
class PoolItem:
    """One (instruction, teacher answer) pair of the pool: the sequence ``input_ids`` (prompt ids, then the
    teacher's answer ids) whose last ``len(input_ids) - n_prompt`` tokens are the targets."""

    prompt: str
    answer: str
    family: str
    level: int
    input_ids: list[int]
    n_prompt: int

    def example(self, uid: str) -> Example:
        n = len(self.input_ids)
        return Example(input_ids=list(self.input_ids), target=[False] * self.n_prompt + [True] * (n - self.n_prompt),
                       uid=uid, n_bytes=len(self.answer.encode("utf-8")))

    def state(self) -> dict:
        return asdict(self)


def draw_instructions(cfg: ComdConfig, rng: np.random.Generator, wanted: Sequence[Wanted],
                      exclude: frozenset[str] = frozenset()) -> list[Instruction]:
    """One fresh instruction per ``(family, level)`` of ``wanted``, never one whose prompt is in ``exclude``
    (the held-out questions)."""
    out = []
    for family, level in wanted:
        for _ in range(DRAWS):
            caption, qa = instance(cfg.scenes, rng, family, level)
            prompt = text_record(caption, qa)["prompt"]
            if prompt not in exclude:
                out.append(Instruction(prompt, qa))
                break
        else:
            raise ValueError(f"comd: {DRAWS} fresh {family} questions at level {level} were all held-out questions; "
                             "the scenes are too few for the held-out set: raise comd.scenes.shapes/colours or lower "
                             "comd.eval_per_level")
    return out


def uniform_wanted(cfg: ComdConfig, rng: np.random.Generator, n: int) -> list[Wanted]:
    """``n`` (family, level) pairs: families in turn from a random start (as even as ``n`` allows), levels drawn
    uniformly from ``cfg.levels``."""
    start = int(rng.integers(len(cfg.families)))
    return [(cfg.families[(start + k) % len(cfg.families)], int(rng.choice(cfg.levels))) for k in range(n)]


class Answerer:
    """Greedy answers of a model to text prompts, in batches of ``cfg.generation_batch_size``."""

    def __init__(self, cfg: ComdConfig, tokenizer: Any, add_eos: bool, seq_len: int) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.encoder = TextEncoder(tokenizer, add_eos=add_eos)
        self.seq_len = seq_len

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's ids as the data pipeline encodes a prompt_completion record's prompt."""
        ids = self.encoder.bos_prefix + self.encoder.encode(prompt)
        if len(ids) + self.cfg.max_answer_tokens > self.seq_len:
            raise ValueError(f"comd: a prompt of {len(ids)} tokens + comd.max_answer_tokens="
                             f"{self.cfg.max_answer_tokens} exceeds data.seq_len={self.seq_len}; raise data.seq_len "
                             f"(prompt: {prompt!r:.80})")
        return ids

    def answer(self, model: torch.nn.Module, prompts: Sequence[str]) -> list[tuple[list[int], list[int], str]]:
        """Per prompt ``(prompt ids, answer ids, answer text)``; the answer ends at the first EOS (kept in the
        ids, as a target: the student learns to stop) or after ``max_answer_tokens``."""
        eos = eos_token_ids(self.tokenizer, model)
        out = []
        step = self.cfg.generation_batch_size
        for lo in range(0, len(prompts), step):
            ids = [self.prompt_ids(p) for p in prompts[lo:lo + step]]
            with torch.no_grad():
                conts = sample_continuations(model, self.tokenizer, ids, max_new_tokens=self.cfg.max_answer_tokens,
                                             greedy=True, eos_token_id=eos or None)
            for p, c in zip(ids, conts):
                out.append((p, c, self.tokenizer.decode(c, skip_special_tokens=True)))
        return out

    def pool_items(self, teacher: torch.nn.Module, instructions: Sequence[Instruction]) -> list[PoolItem]:
        """The teacher's answers to ``instructions`` as pool items."""
        answered = self.answer(teacher, [i.prompt for i in instructions])
        return [PoolItem(i.prompt, text, i.qa.family, i.qa.level, p + c, len(p))
                for i, (p, c, text) in zip(instructions, answered)]


def judge_failures(instructions: Sequence[Instruction], teacher_answers: Sequence[str],
                   student_answers: Sequence[str]) -> list[bool]:
    """Per probe: True where the student's answer is not the teacher's (the exact-match judge)."""
    return [not check_answer(QA(i.qa.question, t, i.qa.family, i.qa.level), s)
            for i, t, s in zip(instructions, teacher_answers, student_answers)]


def accuracy_table(instructions: Sequence[Instruction], answers: Sequence[str]) -> dict:
    """Exact-match accuracy against the ground truth: ``{family: {level: acc}}`` plus ``by_level``, ``hard``
    (level 3, all families) and ``overall``."""
    right: dict[tuple[str, int], list[bool]] = {}
    for ins, text in zip(instructions, answers):
        right.setdefault((ins.qa.family, ins.qa.level), []).append(check_answer(ins.qa, text))
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    table: dict = {}
    for (family, level), hits in sorted(right.items()):
        table.setdefault(family, {})[str(level)] = mean(hits)
    by_level = {str(lvl): mean([h for (f, lv), hs in right.items() if lv == lvl for h in hs]) for lvl in (1, 2, 3)}
    return {"families": table, "by_level": by_level, "hard": by_level["3"],
            "overall": mean([h for hs in right.values() for h in hs])}
