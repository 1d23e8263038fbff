"""The masked-diffusion domain's task and batches: ``prompt (R value tokens), [SEP], answer (R tokens)``.

The answer is the prompt sorted ascending (``sort``) or the prompt itself (``copy``); with ``shifts > 1`` each
segment of the answer is shifted by one of a few offsets (the training answers draw them, so a segment is uncertain
in parallel and certain once one of its tokens is decoded; :meth:`MdTask.score` verifies any valid answer). A sequence is ``L = 2R + 1`` tokens; the answer starts at ``R + 1``. Prompts come from ``task.seed``, the
held-out prompts after the training ones.

A :class:`MdBatch` holds clean sequences ``tokens [B, L]``; each method's player turns them into its masked
inputs (``replace_batches``), so a batch itself carries no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stillroom.config.masked_diffusion import MdTaskConfig
from stillroom.models.masked_diffusion import special_ids


@dataclass(frozen=True)
class MdTask:
    """``prompts [N, R]`` int64 and the task's answers; ``values`` value tokens; the answer begins at ``R + 1``."""

    kind: str
    values: int
    prompts: torch.Tensor
    segment: int = 1
    shifts: int = 1

    @property
    def length(self) -> int:
        return int(self.prompts.shape[1])

    @property
    def answer_start(self) -> int:
        return self.length + 1

    @property
    def positions(self) -> int:
        return 2 * self.length + 1

    def answers(self, prompts_nr: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[N, R]`` correct answers of ``prompts`` (``shifts > 1``: offsets drawn per segment from ``generator``;
        without one, offset 0)."""
        plain_nr = prompts_nr.sort(dim=1).values if self.kind == "sort" else prompts_nr.clone()
        if self.shifts == 1 or generator is None:
            return plain_nr
        n, r = prompts_nr.shape
        shift_ns = torch.randint(0, self.shifts, (n, r // self.segment), generator=generator)
        return (plain_nr + shift_ns.repeat_interleave(self.segment, dim=1)) % self.values

    def score(self, prompts_nr: torch.Tensor, answers_nr: torch.Tensor) -> tuple[float, float]:
        """``(token accuracy, exact-match rate)``: against the one answer (``shifts = 1``), or a token counts when its
        segment is one allowed shift of the plain answer's segment, an answer when every segment is."""
        plain_nr = self.answers(prompts_nr)
        if self.shifts == 1:
            right_nr = answers_nr == plain_nr
        else:
            n, r = prompts_nr.shape
            offset_nsk = ((answers_nr - plain_nr) % self.values).view(n, r // self.segment, self.segment)
            valid_ns = (offset_nsk == offset_nsk[..., :1]).all(-1) & (offset_nsk[..., 0] < self.shifts)
            right_nr = valid_ns.repeat_interleave(self.segment, dim=1)
        return float(right_nr.double().mean()), float(right_nr.all(dim=1).double().mean())

    def sequences(self, prompts_nr: torch.Tensor, answers_nr: torch.Tensor) -> torch.Tensor:
        """``[N, 2R + 1]``: prompt, separator, answer."""
        sep_n1 = torch.full((len(prompts_nr), 1), special_ids(self.values)[0], dtype=torch.long)
        return torch.cat([prompts_nr, sep_n1, answers_nr], dim=1)

    def describe(self) -> str:
        rule = "sorted ascending" if self.kind == "sort" else "copied"
        if self.shifts > 1:
            rule += f", each segment of {self.segment} shifted by one of {self.shifts} offsets"
        return (f"task: {self.kind} {self.length} tokens over {self.values} values (the prompt {rule}); sequences of "
                f"{self.positions} tokens: prompt, [SEP], answer")


@dataclass
class MdExample:
    tokens: torch.Tensor
    """``[L]`` int64: prompt, separator, answer."""
    uid: str


@dataclass
class MdBatch:
    """Clean sequences ``tokens [B, L]``; the answer starts at ``answer_start``; ``uids`` name the examples (the
    masks a method draws for an example at a step derive from its uid). One target per answer token."""

    tokens: torch.Tensor
    answer_start: int
    uids: list[str]
    target_weight: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return int(self.tokens.shape[0] * (self.tokens.shape[1] - self.answer_start))

    def answer_mask(self) -> torch.Tensor:
        """``[B, L]`` bool: the answer positions."""
        mask_bl = torch.zeros(self.tokens.shape, dtype=torch.bool, device=self.tokens.device)
        mask_bl[:, self.answer_start:] = True
        return mask_bl

    def to(self, device: torch.device | str) -> "MdBatch":
        return MdBatch(self.tokens.to(device), self.answer_start, self.uids, self.target_weight)


def make_collate(answer_start: int):
    """``[MdExample] -> MdBatch`` for sequences whose answer starts at ``answer_start``."""
    def collate(examples: list[MdExample]) -> MdBatch:
        return MdBatch(torch.stack([e.tokens for e in examples]), answer_start, [e.uid for e in examples])
    return collate


@dataclass
class MdSplits:
    """The task's training and held-out prompts; ``train`` holds the method's sequences (the base model's
    self-distilled answers once prepared), ``heldout`` the correct ones."""

    task: MdTask
    train: list[MdExample]
    heldout: list[MdExample]
    about: list[str] = field(default_factory=list)

    @property
    def baseline_train(self) -> list[MdExample]:
        return self.train

    @property
    def baseline_heldout(self) -> list[MdExample]:
        return self.heldout

    def heldout_prompts(self) -> torch.Tensor:
        """``[N, R]`` the held-out prompts."""
        return torch.stack([e.tokens[: self.task.length] for e in self.heldout])

    def notes(self) -> list[str]:
        return [self.task.describe(), *self.about]


def draw_prompts(cfg: MdTaskConfig) -> torch.Tensor:
    """``[train_prompts + heldout_prompts, length]`` value tokens drawn uniformly from ``cfg.seed``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, cfg.values, (cfg.train_prompts + cfg.heldout_prompts, cfg.length), generator=gen)


def examples(task: MdTask, prompts_nr: torch.Tensor, answers_nr: torch.Tensor, prefix: str) -> list[MdExample]:
    rows = task.sequences(prompts_nr, answers_nr)
    return [MdExample(rows[i], f"{prefix}-{i}") for i in range(len(rows))]


def build_task(cfg: MdTaskConfig) -> tuple[MdTask, MdSplits]:
    """The task and its splits with correct answers (offsets drawn from ``seed + 1``; the training
    answers are replaced by self-distilled ones for the distillation run: :mod:`.selfdata`)."""
    prompts = draw_prompts(cfg)
    task = MdTask(cfg.kind, cfg.values, prompts, cfg.segment, cfg.shifts)
    train_p, held_p = prompts[: cfg.train_prompts], prompts[cfg.train_prompts:]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    splits = MdSplits(task, examples(task, train_p, task.answers(train_p, gen), "train"),
                      examples(task, held_p, task.answers(held_p, gen), "heldout"))
    return task, splits
