"""Spec 9.7's conditional sequences: per condition a mixture of Markov-chain modes, with exact likelihoods.

Condition ``c`` has ``M`` modes with weights ``w_m``; mode ``(c, m)`` is a first-order Markov chain over ``V``
tokens with initial distribution ``pi_cm`` and transitions ``T_cm[a, b] = P(y_t = b | y_{t-1} = a)``, both the
softmax of seeded N(0, 1) logits times ``sharpness`` (so modes are distinct and peaked). Exactly:

* ``log p(y | c, m) = log pi_cm[y_1] + sum_t log T_cm[y_{t-1}, y_t]``;
* ``log p(y | c) = logsumexp_m (log w_m + log p(y | c, m))`` (the true conditional generator);
* ``log p(y | null) = logsumexp_c (log p(y | c)) - log C`` (conditions are uniform, so the null condition's
  sequences are the marginal over conditions).

Training examples draw ``c`` uniformly, a mode from ``w`` and a chain path; a fraction ``null_fraction`` of them
carries the null condition id instead of ``c`` (the teacher learns ``p(y | null)``, what CFG contrasts with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stillroom.config.autoregressive import MarkovModesConfig


@dataclass(frozen=True)
class MarkovModes:
    """The generator: ``log_init_cmv [C, M, V]``, ``log_trans_cmvv [C, M, V, V]``, ``log_weight_m [M]`` (float64)."""

    log_init_cmv: torch.Tensor
    log_trans_cmvv: torch.Tensor
    log_weight_m: torch.Tensor
    length: int
    null_fraction: float

    @property
    def vocab(self) -> int:
        return int(self.log_init_cmv.shape[-1])

    @property
    def conditions(self) -> int:
        return int(self.log_init_cmv.shape[0])

    @property
    def modes(self) -> int:
        return int(self.log_weight_m.shape[0])

    @property
    def null_index(self) -> int:
        """The null condition's index ``C`` (conditions are ``0 .. C-1``; the teacher reads index ``k`` as the
        token id ``vocab + k``)."""
        return self.conditions

    @property
    def extra_ids(self) -> int:
        """Ids after the ``V`` tokens in the teacher's vocabulary: ``C`` conditions and the null condition."""
        return self.conditions + 1

    def identity(self) -> list[bytes]:
        """What the teacher cache's data fingerprint hashes."""
        return [self.log_init_cmv.numpy().tobytes(), self.log_trans_cmvv.numpy().tobytes(),
                self.log_weight_m.numpy().tobytes(), f"{self.length}/{self.null_fraction}".encode()]

    def describe(self) -> str:
        return (f"markov_modes: {self.conditions} conditions x {self.modes} Markov-chain modes over {self.vocab} "
                f"tokens, length {self.length}, {self.null_fraction:.0%} null-condition examples")

    def mode_log_likelihood(self, tokens_nl: torch.Tensor, cond_n: torch.Tensor) -> torch.Tensor:
        """``[N, M]`` float64 ``log p(y | c, m)`` of sequences ``tokens [N, L]`` under each mode of ``cond [N]``
        (real conditions only)."""
        tokens_nl, cond_n = tokens_nl.cpu(), cond_n.cpu()[:, None]
        modes_1m = torch.arange(self.modes)[None, :]
        logp_nm = self.log_init_cmv[cond_n, modes_1m, tokens_nl[:, :1]]
        for t in range(1, tokens_nl.shape[1]):
            logp_nm = logp_nm + self.log_trans_cmvv[cond_n, modes_1m, tokens_nl[:, t - 1, None], tokens_nl[:, t, None]]
        return logp_nm

    def log_likelihood(self, tokens_nl: torch.Tensor, cond_n: torch.Tensor) -> torch.Tensor:
        """``[N]`` float64 exact ``log p(y | c)`` of ``tokens [N, L]``, ``cond [N]`` condition indices;
        ``cond == null_index`` gives the marginal over conditions."""
        cond_n = cond_n.cpu()
        null_n = cond_n == self.null_index
        out_n = torch.empty(len(cond_n), dtype=torch.float64)
        if (~null_n).any():
            real = self.mode_log_likelihood(tokens_nl[~null_n], cond_n[~null_n]) + self.log_weight_m
            out_n[~null_n] = real.logsumexp(-1)
        if null_n.any():
            toks = tokens_nl[null_n].cpu()
            per_c = [self.log_likelihood(toks, torch.full((len(toks),), c)) for c in range(self.conditions)]
            out_n[null_n] = torch.stack(per_c, -1).logsumexp(-1) - math.log(self.conditions)
        return out_n

    def best_mode(self, tokens_nl: torch.Tensor, cond_n: torch.Tensor) -> torch.Tensor:
        """``[N]`` int64: the mode of ``cond`` with the highest likelihood of each sequence (modes-hit metric)."""
        return self.mode_log_likelihood(tokens_nl, cond_n).argmax(-1)

    def sample(self, cond_n: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[N, L]`` int64 sequences, each from a mode of its (real) condition drawn from the mode weights."""
        n = len(cond_n)
        mode_n = torch.multinomial(self.log_weight_m.exp(), n, replacement=True, generator=generator)
        token_n = torch.multinomial(self.log_init_cmv[cond_n, mode_n].exp(), 1, generator=generator).squeeze(1)
        columns = [token_n]
        for _ in range(1, self.length):
            rows_nv = self.log_trans_cmvv[cond_n, mode_n, columns[-1]].exp()
            columns.append(torch.multinomial(rows_nv, 1, generator=generator).squeeze(1))
        return torch.stack(columns, 1)

    def training_examples(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [n, L], cond [n])``: condition indices ``c`` uniform, then a fraction ``null_fraction`` of them
        set to ``null_index``."""
        cond_n = torch.randint(self.conditions, (n,), generator=generator)
        tokens_nl = self.sample(cond_n, generator)
        dropped_n = torch.rand(n, generator=generator, dtype=torch.float64) < self.null_fraction
        return tokens_nl, torch.where(dropped_n, self.null_index, cond_n)


def build_markov(cfg: MarkovModesConfig) -> MarkovModes:
    """The generator ``cfg`` describes (see the module docstring); the same ``cfg`` always gives the same chains."""
    gen = torch.Generator().manual_seed(cfg.seed)
    c, m, v = cfg.conditions, len(cfg.mode_weights), cfg.vocab
    init = torch.log_softmax(cfg.sharpness * torch.randn(c, m, v, generator=gen, dtype=torch.float64), -1)
    trans = torch.log_softmax(cfg.sharpness * torch.randn(c, m, v, v, generator=gen, dtype=torch.float64), -1)
    weights = torch.tensor(cfg.mode_weights, dtype=torch.float64)
    return MarkovModes(init, trans, (weights / weights.sum()).log(), cfg.length, cfg.null_fraction)


def bigram_embedding(tokens_nl: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[N, V*V]`` float32 L2-normalised bag-of-bigrams counts of ``tokens [N, L]`` (the frozen embedding ``E`` of
    the diversity reward and metric: sequences sharing no bigram have cosine 0, identical ones 1)."""
    index_nk = tokens_nl[:, :-1] * vocab + tokens_nl[:, 1:]
    counts = torch.zeros(tokens_nl.shape[0], vocab * vocab, device=tokens_nl.device)
    counts.scatter_add_(1, index_nk, torch.ones_like(index_nk, dtype=counts.dtype))
    return torch.nn.functional.normalize(counts, dim=-1)


def pairwise_diversity(tokens_gkl: torch.Tensor, vocab: int) -> float:
    """Mean over groups ``g`` of the mean pairwise ``1 - cos`` of the bigram embeddings of ``tokens [G, K, L]``."""
    g, k, length = tokens_gkl.shape
    emb_gke = bigram_embedding(tokens_gkl.reshape(g * k, length), vocab).reshape(g, k, -1)
    cos_gkk = emb_gke @ emb_gke.transpose(1, 2)
    off_diag = ~torch.eye(k, dtype=torch.bool, device=cos_gkk.device)
    return float((1 - cos_gkk[:, off_diag]).mean())
