"""Deterministic, resumable, rank-aware sampling of example indices, whole groups at a time.

The examples are laid out in groups of ``group_size`` consecutive sequences that
must be drawn together (one record's predict and explain sequences, a chosen and
a rejected trace); ``group_size = 1`` is plain per-sequence sampling. The sampler
draws *groups* and hands out all of a group's indices in order.

Epoch ``e`` visits a permutation of the ``n / group_size`` groups drawn from a
``torch.Generator`` seeded with ``seed + e`` (identity order when
``shuffle=False``). Each *global* micro-batch takes the next
``batch_size / group_size * world_size`` groups of the epoch; rank ``r`` gets its
contiguous slice. So one process with batch ``2B`` sees exactly the examples that
two processes with batch ``B`` see together.

A global micro-batch never straddles epochs: when too few groups remain, the
epoch's remainder is skipped and the next epoch starts (every rank then gets a
full batch of distinct examples). The sampler cycles forever. ``state_dict()``
holds the epoch and the position in it, enough for an exact resume.
"""

from __future__ import annotations

import torch


class ExampleSampler:
    """Yields this rank's micro-batch of indices into a list of ``n`` examples (groups kept whole)."""

    def __init__(
        self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
        group_size: int = 1,
    ) -> None:
        if batch_size < 1 or world_size < 1 or group_size < 1:
            raise ValueError(f"ExampleSampler: batch_size ({batch_size}), world_size ({world_size}) and group_size "
                             f"({group_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"ExampleSampler: rank {rank} is outside 0..{world_size - 1}")
        if batch_size % group_size:
            raise ValueError(f"train.micro_batch_size={batch_size} counts sequences and must be a multiple of "
                             f"{group_size} (each record gives {group_size} sequences, drawn together)")
        if n % group_size:
            raise ValueError(f"ExampleSampler: {n} examples are not whole groups of {group_size}")
        if n < batch_size * world_size:
            raise ValueError(
                f"ExampleSampler: {n} examples cannot fill one global micro-batch of "
                f"{batch_size} x {world_size} processes; lower train.micro_batch_size or add data"
            )
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.group_size = group_size
        self.epoch = 0
        self.position = 0  # groups of the current epoch already handed out (globally)
        self._order: list[int] | None = None

    @property
    def groups(self) -> int:
        return self.n // self.group_size

    @property
    def global_batch(self) -> int:
        """Groups per global micro-batch (all processes)."""
        return self.batch_size // self.group_size * self.world_size

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                self._order = torch.randperm(self.groups, generator=g).tolist()
            else:
                self._order = list(range(self.groups))
        return self._order

    def next_indices(self) -> list[int]:
        """This rank's next micro-batch (``batch_size`` indices, whole groups in order)."""
        if self.position + self.global_batch > self.groups:
            self.epoch += 1
            self.position = 0
            self._order = None
        order = self._epoch_order()
        per_rank = self.batch_size // self.group_size
        lo = self.position + self.rank * per_rank
        self.position += self.global_batch
        g = self.group_size
        return [g * group + j for group in order[lo : lo + per_rank] for j in range(g)]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "n": self.n,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch": self.global_batch,
            "group_size": self.group_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``; the data size, seed, shuffle and grouping must match (else a clear error)."""
        for key, mine in (("n", self.n), ("seed", self.seed), ("shuffle", self.shuffle),
                          ("group_size", self.group_size)):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"the sampler's checkpoint has {key}={state[key]!r} but this run has {mine!r}; "
                    "resuming would visit different examples"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None
