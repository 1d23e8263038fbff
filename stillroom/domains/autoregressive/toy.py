"""The exact-evaluation toy of spec 12.6: a 2-D codebook and a correlated joint over 4-token sequences.

Everything is computed exactly, so the report can measure total variation without estimating the target:

* the codebook: ``V`` vectors drawn uniformly in ``[-scale, scale]^2`` (seeded), redrawn one at a time until
  every pair is at least ``min_distance`` apart;
* the joint ``P[a, b, c, d] = pi[a] T2[a, b] T3[a, b, c] T4[a, d]`` with ``T2[a] = partner_prob * 1[b =
  partner(a)] + (1 - partner_prob) / V``, ``T3[a, b] = rule_prob * 1[c = (a + b) mod V] + (1 - rule_prob) / V``,
  ``T4[a] = repeat_prob * 1[d = a] + (1 - repeat_prob) / V``; ``pi`` a seeded softmax of N(0, 1) logits and
  ``partner`` a seeded permutation without fixed points.

Sequences index the joint row-major (first position slowest), as
:func:`stillroom.domains.generative.toy_metrics.joint_counts` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stillroom.config.autoregressive import SEQUENCE_LENGTH, ArToyConfig

_MAX_DRAWS = 10000


@dataclass(frozen=True)
class CodebookToy:
    """``codebook_vd [V, 2]`` and the exact joint ``probs [V, V, V, V]`` (float64, sums to 1)."""

    codebook_vd: torch.Tensor
    probs: torch.Tensor
    partner_v: torch.Tensor
    pi_v: torch.Tensor

    @property
    def vocab(self) -> int:
        return int(self.codebook_vd.shape[0])

    @property
    def length(self) -> int:
        return self.probs.dim()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, 4]`` int64 token sequences drawn from the exact joint."""
        return sample_joint(self.probs, n, generator)

    @property
    def extra_ids(self) -> int:
        """Ids after the ``V`` codebook ids in the teacher's vocabulary: the BOS token."""
        return 1

    def identity(self) -> list[bytes]:
        """What the teacher cache's data fingerprint hashes."""
        return [self.codebook_vd.numpy().tobytes(), self.probs.numpy().tobytes()]

    def describe(self) -> str:
        return (f"codebook toy: V = {self.vocab} vectors in R^2 (min distance "
                f"{float(min_distance(self.codebook_vd)):.3f}), sequences of {self.length} tokens, exact joint")


def build_toy(cfg: ArToyConfig) -> CodebookToy:
    """The toy ``cfg`` describes (see the module docstring); the same ``cfg`` always gives the same toy."""
    gen = torch.Generator().manual_seed(cfg.seed)
    codebook_vd = draw_codebook(cfg.codebook_size, cfg.min_distance, cfg.scale, gen)
    v = cfg.codebook_size
    pi_v = torch.softmax(torch.randn(v, generator=gen, dtype=torch.float64), dim=0)
    partner_v = derangement(v, gen)
    return CodebookToy(codebook_vd, true_joint(pi_v, partner_v, cfg), partner_v, pi_v)


def draw_codebook(v: int, min_dist: float, scale: float, gen: torch.Generator) -> torch.Tensor:
    """``[v, 2]`` float32 vectors, pairwise at least ``min_dist`` apart (each redrawn until it is)."""
    points: list[torch.Tensor] = []
    for _ in range(_MAX_DRAWS):
        candidate = (torch.rand(2, generator=gen, dtype=torch.float64) * 2 - 1) * scale
        if all(float((candidate - p).norm()) >= min_dist for p in points):
            points.append(candidate)
            if len(points) == v:
                return torch.stack(points).float()
    raise ValueError(f"autoregressive.toy: could not place {v} codebook vectors {min_dist} apart in "
                     f"[-{scale}, {scale}]^2 in {_MAX_DRAWS} draws; raise toy.scale or lower toy.min_distance")


def min_distance(codebook_vd: torch.Tensor) -> torch.Tensor:
    dist_vv = torch.cdist(codebook_vd.double(), codebook_vd.double())
    return dist_vv[~torch.eye(len(codebook_vd), dtype=torch.bool)].min()


def derangement(v: int, gen: torch.Generator) -> torch.Tensor:
    """A seeded permutation of ``0 .. v-1`` without fixed points (``partner(a) != a``)."""
    while True:
        perm = torch.randperm(v, generator=gen)
        if not (perm == torch.arange(v)).any():
            return perm


def true_joint(pi_v: torch.Tensor, partner_v: torch.Tensor, cfg: ArToyConfig) -> torch.Tensor:
    """``[V, V, V, V]`` float64 exact probabilities of every sequence (see the module docstring)."""
    v = len(pi_v)
    eye = torch.eye(v, dtype=torch.float64)
    t2_ab = cfg.partner_prob * eye[partner_v] + (1 - cfg.partner_prob) / v
    rule_ab = (torch.arange(v)[:, None] + torch.arange(v)[None, :]) % v
    t3_abc = cfg.rule_prob * eye[rule_ab] + (1 - cfg.rule_prob) / v
    t4_ad = cfg.repeat_prob * eye + (1 - cfg.repeat_prob) / v
    probs = pi_v[:, None, None, None] * t2_ab[:, :, None, None] * t3_abc[:, :, :, None] * t4_ad[:, None, None, :]
    assert probs.dim() == SEQUENCE_LENGTH
    return probs


def sample_joint(probs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, L]`` int64 sequences drawn from the joint ``probs [V] * L`` (row-major outcome index)."""
    v, length = probs.shape[0], probs.dim()
    flat_n = torch.multinomial(probs.reshape(-1).double(), n, replacement=True, generator=generator)
    place_l = v ** torch.arange(length - 1, -1, -1)
    return (flat_n[:, None] // place_l[None, :]) % v


def all_sequences(v: int, length: int) -> torch.Tensor:
    """``[v ** length, length]`` int64: every sequence, in the row-major order of ``probs.reshape(-1)``."""
    place_l = v ** torch.arange(length - 1, -1, -1)
    return (torch.arange(v ** length)[:, None] // place_l[None, :]) % v


def snap(x_bnd: torch.Tensor, codebook_vd: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` int64: the id of the nearest codebook vector of each continuous token of ``x [B, n, 2]``."""
    dist_bnv = ((x_bnd[..., None, :] - codebook_vd.to(x_bnd)) ** 2).sum(-1)
    return dist_bnv.argmin(-1)
