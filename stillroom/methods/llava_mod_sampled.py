"""Preference pairs made on the way (``llava_mod.rejected: sampled``): each training row's prompt becomes a pair.

For every row of a micro-batch of ``prompt_completion`` records: chosen = the record's completion
(``llava_mod.chosen: record``, e.g. teacher-written answers) or the teacher's greedy answer (``teacher``);
rejected = the student's own sampled answer, drawn up to ``llava_mod.tries`` times until it differs from the
chosen one (token ids, EOS ignored). Where the student answers right every time, the pair keeps that right
answer as its rejected side: chosen and rejected are equal, so the pair's DPO gradient is exactly zero (its
loss is the constant log 2), and ``llava_mod/wrong_share`` logs the share of pairs with a wrong answer.
Sampling uses the KV-cached sampler of :mod:`stillroom.generate.sampling`, seeded from (run seed, step,
micro-batch), so a resumed run draws the same pairs. Image records (a ``vlm`` run, ``Batch.pixel_values``):
the prompts are answered in the same batch with their images on the prompts' forward (the same seeded
generator), and both rows of a pair carry the prompt's pixels,
so the DPO log-probs of student and reference see the image.
"""

from __future__ import annotations

from typing import Any

import torch

from stillroom.data.batch import Batch, Example, batch_prompts, collate
from stillroom.generate.sampling import eos_token_ids, sample_continuations

CHOSEN, REJECTED = "chosen", "rejected"


def _strip(ids: list[int], eos: set[int]) -> list[int]:
    return [t for t in ids if t not in eos]


class SampledPairs:
    """``replace_batches(micro, step)``: every row -> its chosen and rejected rows (module docstring)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None, tokenizer: Any, section,
                 seed: int, pad_id: int):
        if section.chosen == "teacher" and teacher is None:
            raise ValueError("llava_mod.chosen=teacher needs the teacher in process (teacher.model)")
        self.student, self.teacher, self.section, self.seed, self.pad_id = student, teacher, section, seed, pad_id
        self.eos = eos_token_ids(tokenizer, student)
        self.tokenizer = tokenizer
        self.state: dict[str, float] = {}

    def __call__(self, micro: list[Batch], step: int) -> list[Batch]:
        out, wrong, rows = [], 0, 0
        for j, batch in enumerate(micro):
            paired, n_wrong = self.pairs(batch, step, j)
            out.append(paired)
            wrong, rows = wrong + n_wrong, rows + len(batch.uids)
        self.state = {"llava_mod/wrong_share": wrong / max(rows, 1)}
        return out

    def pairs(self, batch: Batch, step: int, j: int) -> tuple[Batch, int]:
        """The pair batch of one micro-batch (rows ``2i, 2i + 1``: chosen, rejected) and its count of wrong answers."""
        pixels_b3hw = getattr(batch, "pixel_values", None)
        prompts = batch_prompts(batch, 1)
        chosen = self._chosen(batch, prompts, pixels_b3hw)
        rejected = self._rejected(prompts, chosen, step, j, pixels_b3hw)
        eos = set(self.eos)
        examples, wrong = [], 0
        for uid, p, c, r in zip(batch.uids, prompts, chosen, rejected):
            wrong += _strip(r, eos) != _strip(c, eos)
            for role, answer in ((CHOSEN, c), (REJECTED, r)):
                examples.append(Example(list(p) + list(answer), [False] * len(p) + [True] * len(answer),
                                        uid=f"{uid}:{role[0]}:0", role=role))
        paired = collate(examples, self.pad_id)
        if pixels_b3hw is not None:  # rows 2i, 2i + 1 share prompt i's image: [2B, 3, H, W]
            paired.pixel_values = pixels_b3hw.repeat_interleave(2, dim=0)
        return paired, wrong

    def _chosen(self, batch: Batch, prompts: list[list[int]], pixels_b3hw: torch.Tensor | None) -> list[list[int]]:
        if self.section.chosen == "teacher":
            return self._continue(self.teacher, prompts, pixels_b3hw, greedy=True)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        return [batch.input_ids[b, len(p):n].tolist() for b, (p, n) in enumerate(zip(prompts, lengths))]

    def _rejected(self, prompts: list[list[int]], chosen: list[list[int]], step: int, j: int,
                  pixels_b3hw: torch.Tensor | None) -> list[list[int]]:
        eos, sec = set(self.eos), self.section
        device = next(self.student.parameters()).device
        gen = torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + step * 1009 + j) % 2 ** 31)
        rejected: list[list[int] | None] = [None] * len(prompts)
        last: list[list[int]] = [[] for _ in prompts]
        for _ in range(sec.tries):
            todo = [i for i, r in enumerate(rejected) if r is None]
            if not todo:
                break
            rows_pixels = None if pixels_b3hw is None else pixels_b3hw[todo]
            outs = self._continue(self.student, [prompts[i] for i in todo], rows_pixels, generator=gen)
            for i, out in zip(todo, outs):
                last[i] = out or list(chosen[i])
                if out and _strip(out, eos) != _strip(chosen[i], eos):
                    rejected[i] = out
        return [r if r is not None else last[i] for i, r in enumerate(rejected)]

    def _continue(self, model: torch.nn.Module, prompts: list[list[int]], pixels_b3hw: torch.Tensor | None,
                  greedy: bool = False, generator: torch.Generator | None = None) -> list[list[int]]:
        """The new tokens after each prompt: one left-padded batch through the KV-cached sampler, the images
        ``[B, 3, H, W]`` (one per prompt, or none) on the prompts' forward."""
        sec = self.section
        return sample_continuations(model, self.tokenizer, prompts, max_new_tokens=sec.max_new_tokens, greedy=greedy,
                                    eos_token_id=self.eos, sampling_temperature=sec.sampling_temperature,
                                    generator=generator, pixel_values=pixels_b3hw)

    def metrics(self) -> dict[str, float]:
        return dict(self.state)
