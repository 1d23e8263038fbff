"""CoMD's pieces that do not depend on the loop: instructions drawn from the scene-question generator, greedy
answers of a model (teacher or student), pool items as training sequences, and the exact-match judge.

An instruction is the text form of a scene question (:func:`stillroom.domains.vl.vqa.text_record`); its prompt is
encoded exactly as the data pipeline encodes a ``prompt_completion`` record (BOS rule of
:class:`~stillroom.data.formats.TextEncoder`), and the teacher's greedy continuation (ending at EOS) is the
completion, the only target tokens. Answers are compared with :func:`stillroom.domains.vl.vqa.check_answer`
(case, spacing, a final full stop and count digits do not matter).

On a VLM (``PoolImages``): every instruction's scene is rendered to a PNG under the run folder (written
atomically; the pool state records the paths, so a resumed run finds them), its prompt is the question alone
with the image tokens after BOS (exactly as :class:`stillroom.domains.vl.vlm_data.VlmEncoder` encodes a VQA
record), and teacher and student answer with the image (left-padded batches with the images on the prompts'
forward, :func:`stillroom.generate.sampling.sample_continuations`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from stillroom.config.comd import ComdConfig
from stillroom.data.batch import Example
from stillroom.data.formats import TextEncoder
from stillroom.data.images import ImageRef, load_pixels
from stillroom.domains.vl.vqa import QA, check_answer, image_instance, instance, save_png, text_record
from stillroom.generate.sampling import eos_token_ids, sample_continuations

DRAWS = 100
"""Fresh draws per wanted instruction before giving up (every one equal to a held-out question)."""
Wanted = tuple[str, int]
"""(family, level) of one instruction to draw."""


@dataclass(frozen=True)
class PoolImages:
    """The image side of CoMD on a VLM: scenes are written to ``folder/<name>.png``; a prompt holds
    ``image_ids`` (the model's image tokens) after BOS; ``ref_of`` reads a file as the data pipeline does."""

    folder: Path
    image_ids: tuple[int, ...]
    ref_of: Callable[[str], ImageRef]


@dataclass(frozen=True)
class Instruction:
    """A scene question with its ground-truth answer (used by the report only): in text form (the caption in the
    prompt), or on a VLM the question alone with ``image`` (the scene's PNG) and ``text`` (the text form, which
    keys the held-out exclusion)."""

    prompt: str
    qa: QA
    image: str | None = None
    text: str | None = None

    @property
    def key(self) -> str:
        return self.prompt if self.text is None else self.text


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
    image: str | None = None
    """The scene's PNG (VLM pools), else None."""

    def example(self, uid: str, ref_of: Callable[[str], ImageRef] | None = None) -> Example:
        n = len(self.input_ids)
        image = None if self.image is None else ref_of(self.image)
        return Example(input_ids=list(self.input_ids), target=[False] * self.n_prompt + [True] * (n - self.n_prompt),
                       uid=uid, n_bytes=len(self.answer.encode("utf-8")), image=image)

    def state(self) -> dict:
        state = asdict(self)
        if self.image is None:  # text pools keep the state they always had
            del state["image"]
        return state


def draw_instructions(cfg: ComdConfig, rng: np.random.Generator, wanted: Sequence[Wanted],
                      exclude: frozenset[str] = frozenset(), images: PoolImages | None = None,
                      tag: str = "") -> list[Instruction]:
    """One fresh instruction per ``(family, level)`` of ``wanted``, never one whose text form is in ``exclude``
    (the held-out questions). With ``images``, the k-th scene is written to ``images.folder/<tag>-<k>.png``."""
    out = []
    for family, level in wanted:
        for _ in range(DRAWS):
            if images is None:
                caption, qa = instance(cfg.scenes, rng, family, level)
                drawn = Instruction(text_record(caption, qa)["prompt"], qa)
            else:
                pixels_3hw, caption, qa = image_instance(cfg.scenes, rng, family, level)
                drawn = Instruction(qa.question, qa, str(images.folder / f"{tag}-{len(out):05d}.png"),
                                    text_record(caption, qa)["prompt"])
            if drawn.key not in exclude:
                if drawn.image is not None:
                    save_png(pixels_3hw, Path(drawn.image))
                out.append(drawn)
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

    def __init__(self, cfg: ComdConfig, tokenizer: Any, add_eos: bool, seq_len: int,
                 images: PoolImages | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.encoder = TextEncoder(tokenizer, add_eos=add_eos)
        self.seq_len = seq_len
        self.images = images

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's ids as the data pipeline encodes a prompt_completion record's prompt (a VLM's: the image
        tokens right after BOS)."""
        image_ids = [] if self.images is None else list(self.images.image_ids)
        ids = self.encoder.bos_prefix + image_ids + self.encoder.encode(prompt)
        if len(ids) + self.cfg.max_answer_tokens > self.seq_len:
            raise ValueError(f"comd: a prompt of {len(ids)} tokens + comd.max_answer_tokens="
                             f"{self.cfg.max_answer_tokens} exceeds data.seq_len={self.seq_len}; raise data.seq_len "
                             f"(prompt: {prompt!r:.80})")
        return ids

    def answer(self, model: torch.nn.Module, prompts: Sequence[str],
               images: Sequence[str | None] | None = None) -> list[tuple[list[int], list[int], str]]:
        """Per prompt ``(prompt ids, answer ids, answer text)``; the answer ends at the first EOS (kept in the
        ids, as a target: the student learns to stop) or after ``max_answer_tokens``. On a VLM ``images[i]`` is
        prompt ``i``'s PNG."""
        eos = eos_token_ids(self.tokenizer, model)
        if self.images is not None:
            return self._answer_with_images(model, prompts, images, eos)
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

    def _answer_with_images(self, model: torch.nn.Module, prompts: Sequence[str], images: Sequence[str | None] | None,
                            eos: list[int]) -> list[tuple[list[int], list[int], str]]:
        """:meth:`answer` on a VLM: ``generation_batch_size`` prompts at a time, their pixels ``[b, 3, S, S]`` on
        the prompts' forward."""
        if images is None or len(images) != len(prompts) or any(i is None for i in images):
            raise ValueError("comd on a VLM: every prompt needs its scene's image")
        out = []
        step = self.cfg.generation_batch_size
        for lo in range(0, len(prompts), step):
            ids = [self.prompt_ids(p) for p in prompts[lo:lo + step]]
            pixels = torch.stack([load_pixels(self.images.ref_of(i)) for i in images[lo:lo + step]])
            with torch.no_grad():
                conts = sample_continuations(model, self.tokenizer, ids, max_new_tokens=self.cfg.max_answer_tokens,
                                             greedy=True, eos_token_id=eos or None, pixel_values=pixels)
            out += [(p, c, self.tokenizer.decode(c, skip_special_tokens=True)) for p, c in zip(ids, conts)]
        return out

    def pool_items(self, teacher: torch.nn.Module, instructions: Sequence[Instruction]) -> list[PoolItem]:
        """The teacher's answers to ``instructions`` as pool items."""
        answered = self.answer(teacher, [i.prompt for i in instructions], [i.image for i in instructions])
        return [PoolItem(i.prompt, text, i.qa.family, i.qa.level, p + c, len(p), i.image)
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
