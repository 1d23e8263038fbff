"""Data of the autoregressive domain: token sequences drawn from the toy's exact joint, as loop batches.

A :class:`SeqBatch` holds ``tokens [B, n]`` and counts one target per position (``num_targets = B * n``): the
teacher's cross-entropy, DD2's GTS, FCS and CSD losses all sum over positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stillroom.config.autoregressive import AutoregressiveConfig
from stillroom.domains.autoregressive.markov import MarkovModes, build_markov
from stillroom.domains.autoregressive.toy import CodebookToy, build_toy

HELDOUT_SEQUENCES = 1000
"""Held-out sequences drawn beside the training ones (the split protocol wants one; the report measures exact
TV against enumerated joints instead)."""


@dataclass
class SeqExample:
    tokens: torch.Tensor
    """``[n]`` int64 token ids."""
    uid: str
    cond: int | None = None
    """markov_modes: the condition index (``C``: null); the teacher reads it as token id ``vocab + cond``."""


@dataclass
class SeqBatch:
    """``tokens [B, n]`` int64; one target per position; ``cond [B]`` the condition indices (markov_modes)."""

    tokens: torch.Tensor
    target_weight: torch.Tensor | None = None
    cond: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return int(self.tokens.numel())

    def to(self, device: torch.device | str) -> "SeqBatch":
        return SeqBatch(self.tokens.to(device), self.target_weight, None if self.cond is None else self.cond.to(device))


def collate_sequences(examples: list[SeqExample]) -> SeqBatch:
    cond = None if examples[0].cond is None else torch.tensor([e.cond for e in examples])
    return SeqBatch(torch.stack([e.tokens for e in examples]), cond=cond)


@dataclass
class ArSplits:
    """The toy and its sequences: ``train`` (the teacher's data), ``heldout``; the baseline views are the same."""

    toy: "CodebookToy | MarkovModes"
    train: list[SeqExample]
    heldout: list[SeqExample]
    about: list[str] = field(default_factory=list)

    @property
    def baseline_train(self) -> list[SeqExample]:
        return self.train

    @property
    def baseline_heldout(self) -> list[SeqExample]:
        return self.heldout

    def train_tokens(self) -> torch.Tensor:
        return torch.stack([e.tokens for e in self.train])

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for part in self.toy.identity():
            h.update(part)
        h.update(self.train_tokens().numpy().tobytes())
        if self.train[0].cond is not None:
            h.update(torch.tensor([e.cond for e in self.train]).numpy().tobytes())
        return h.hexdigest()

    def notes(self) -> list[str]:
        return [f"data: {len(self.train)} training sequences drawn from the exact joint", *self.about]


def build_splits(sec: AutoregressiveConfig) -> ArSplits:
    """The toy and ``train_sequences`` + held-out sequences drawn from its joint with ``data_seed``."""
    if sec.dataset == "markov_modes":
        return build_markov_splits(sec)
    toy = build_toy(sec.toy)
    gen = torch.Generator().manual_seed(sec.data_seed)
    tokens = toy.sample(sec.train_sequences + HELDOUT_SEQUENCES, gen)
    examples = [SeqExample(tokens[i], f"seq-{i}") for i in range(len(tokens))]
    about = [toy.describe() + f"; sequences drawn with data_seed {sec.data_seed}"]
    return ArSplits(toy, examples[:sec.train_sequences], examples[sec.train_sequences:], about)


def build_markov_splits(sec: AutoregressiveConfig) -> ArSplits:
    """spec 9.7's conditional sequences: ``train_sequences`` + held-out examples with their conditions (a fraction
    ``markov.null_fraction`` carry the null condition), drawn with ``data_seed``."""
    chains = build_markov(sec.markov)
    tokens_nl, cond_n = chains.training_examples(sec.train_sequences + HELDOUT_SEQUENCES,
                                                 torch.Generator().manual_seed(sec.data_seed))
    examples = [SeqExample(tokens_nl[i], f"seq-{i}", int(cond_n[i])) for i in range(len(tokens_nl))]
    about = [chains.describe() + f"; sequences drawn with data_seed {sec.data_seed}"]
    return ArSplits(chains, examples[:sec.train_sequences], examples[sec.train_sequences:], about)
