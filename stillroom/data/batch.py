"""The Batch contract and the one place where the causal shift happens.

A tokenized example is a list of token ids plus a per-token ``target`` flag
(True where the model must learn to produce that token: every token of plain
text, only assistant/completion tokens of chat or prompt/completion records).

:func:`collate` turns examples into a :class:`Batch` whose ``target_ids`` are
already shifted: ``target_ids[b, t]`` is the token that the logits at position
``t`` predict, ``-100`` where nothing is learned (prompt, padding, the last
position). Everything downstream (losses, teacher stores, metrics) compares
position ``t`` with position ``t`` and never shifts again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE = -100


@dataclass
class Example:
    """One tokenized sequence.

    ``input_ids``: token ids; ``target``: same length, True where the token is a
    learning target; ``uid``: a stable identity (hash of the source record and
    the block index) used for held-out splits and teacher-store alignment;
    ``domain``: optional domain label; ``n_bytes``: UTF-8 bytes of the text the
    target tokens cover (for bits per byte); ``role``: which sequence of its record's
    group this is, for methods that train on several sequences per record (e.g.
    ``predict`` / ``explain``, ``chosen`` / ``rejected``), else ``None``.
    """

    input_ids: list[int]
    target: list[bool]
    uid: str
    domain: str | None = None
    n_bytes: int = 0
    meta: dict = field(default_factory=dict)
    role: str | None = None

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.target):
            raise ValueError(f"example {self.uid}: {len(self.input_ids)} ids but {len(self.target)} target flags")


@dataclass
class Batch:
    """Integer tensors, right-padded. Shapes: ``[B, T]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_ids: torch.Tensor
    uids: list[str]
    n_bytes: torch.Tensor
    """``[B]`` UTF-8 bytes covered by each row's target tokens."""
    domains: list[str | None] = field(default_factory=list)
    roles: list[str | None] = field(default_factory=list)
    """Per row: the :attr:`Example.role` it came from."""
    target_weight: torch.Tensor | None = None
    """Optional ``[B, T]`` float: a per-target-token weight on every logit loss term (``None`` = 1).

    Set by the training loop from a method's ``weight_targets`` (step-by-step's per-task
    normalisation, REDI's signed, length-normalised pair weights), after the loop has counted
    the step's target tokens ``N``; the loop divides by ``N``, so a method whose objective is
    ``sum(w * l) / N`` chooses ``w`` accordingly."""

    @property
    def loss_mask(self) -> torch.Tensor:
        """``[B, T]`` bool: True where a token counts."""
        return self.target_ids != IGNORE

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            target_ids=self.target_ids.to(device),
            uids=self.uids,
            n_bytes=self.n_bytes.to(device),
            domains=self.domains,
            roles=self.roles,
            target_weight=None if self.target_weight is None else self.target_weight.to(device),
        )


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad ``examples`` and build shifted targets (the only causal shift)."""
    if not examples:
        raise ValueError("collate: empty list of examples")
    width = max(len(e.input_ids) for e in examples)
    bsz = len(examples)
    input_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    attention = torch.zeros((bsz, width), dtype=torch.long)
    targets = torch.full((bsz, width), IGNORE, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids = torch.tensor(ex.input_ids, dtype=torch.long)
        input_ids[i, :n] = ids
        attention[i, :n] = 1
        if n > 1:
            learn_next = torch.tensor(ex.target[1:], dtype=torch.bool)
            targets[i, : n - 1] = torch.where(learn_next, ids[1:], torch.full_like(ids[1:], IGNORE))
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        target_ids=targets,
        uids=[e.uid for e in examples],
        n_bytes=torch.tensor([e.n_bytes for e in examples], dtype=torch.long),
        domains=[e.domain for e in examples],
        roles=[e.role for e in examples],
    )


def prompt_length(target: list[bool], n_tokens: int, text_prompt_tokens: int) -> int:
    """How many leading tokens of a sequence form its prompt: those before its first learned token.

    ``target``: the sequence's per-token target flags (``Example.target``; flag 0 never counts,
    as in :func:`collate`). Plain text learns every token from position 1 on, so it has no
    prompt: its first ``text_prompt_tokens`` tokens are used, at most all but one. A sequence
    with no learned token is an error (the data pipeline drops such sequences).
    """
    first = next((i for i in range(1, n_tokens) if target[i]), None)
    if first is None:
        raise ValueError("a sequence without a learned token has no prompt to continue")
    return first if first > 1 else max(1, min(text_prompt_tokens, n_tokens - 1))


def batch_prompts(batch: Batch, text_prompt_tokens: int) -> list[list[int]]:
    """Per row of ``batch``: its prompt ids (:func:`prompt_length`; ``target_ids[b, t]`` is the token at
    ``t + 1``, so the row's target flags are its loss mask shifted right by one)."""
    prompts = []
    for b, n in enumerate(batch.attention_mask.sum(dim=1).tolist()):
        flags = [False] + batch.loss_mask[b, : n - 1].tolist()
        try:
            cut = prompt_length(flags, n, text_prompt_tokens)
        except ValueError:
            raise ValueError(f"sequence {batch.uids[b]} has no target token, so it has no prompt to continue") from None
        prompts.append(batch.input_ids[b, :cut].tolist())
    return prompts
