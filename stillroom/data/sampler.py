"""Deterministic, resumable, rank-aware sampling of example indices.

Epoch ``e`` visits a permutation of ``range(n)`` drawn from a
``torch.Generator`` seeded with ``seed + e`` (identity order when
``shuffle=False``). Each *global* micro-batch takes the next
``batch_size * world_size`` indices of the epoch; rank ``r`` gets the slice
``[r * batch_size, (r + 1) * batch_size)``. So one process with batch ``2B``
sees exactly the examples that two processes with batch ``B`` see together.

A global micro-batch never straddles epochs: when fewer than
``batch_size * world_size`` indices remain, the epoch's remainder is skipped
and the next epoch starts (every rank then gets a full batch of distinct
examples). The sampler cycles forever. ``state_dict()`` holds the epoch and the
position in it, enough for an exact resume.
"""

from __future__ import annotations

import torch


class ExampleSampler:
    """Yields this rank's micro-batch of indices into a list of ``n`` examples."""

    def __init__(
        self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"ExampleSampler: batch_size ({batch_size}) and world_size ({world_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"ExampleSampler: rank {rank} is outside 0..{world_size - 1}")
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
        self.epoch = 0
        self.position = 0  # indices of the current epoch already handed out (globally)
        self._order: list[int] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                self._order = torch.randperm(self.n, generator=g).tolist()
            else:
                self._order = list(range(self.n))
        return self._order

    def next_indices(self) -> list[int]:
        """This rank's next micro-batch (``batch_size`` indices)."""
        if self.position + self.global_batch > self.n:
            self.epoch += 1
            self.position = 0
            self._order = None
        order = self._epoch_order()
        lo = self.position + self.rank * self.batch_size
        self.position += self.global_batch
        return order[lo : lo + self.batch_size]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "n": self.n,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``; the data size, seed and shuffle must match (else a clear error)."""
        for key, mine in (("n", self.n), ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"ExampleSampler: checkpoint has {key}={state[key]!r} but this run has {mine!r}; "
                    "resuming would visit different examples"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None
