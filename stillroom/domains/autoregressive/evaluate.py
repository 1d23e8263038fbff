"""What the autoregressive report measures: exact total variation of sampled token sequences.

Every row draws ``eval.samples`` sequences (a generator from the same seeded noise ``eval.seed``, its
continuous tokens snapped to the nearest codeword) and compares their empirical joint with the teacher's exact
joint (:func:`~.teacher.teacher_joint`, all ``V^4`` sequences scored in one batch):

* ``joint_tv``: TV between the empirical joint and the teacher's joint;
* ``pair_tv_12`` / ``pair_tv_14``: TV of the pairwise marginals (q1, q2) and (q1, q4);
* ``tv_true``: TV between the empirical joint and the toy's true joint;
* ``teacher_tv_true`` (teacher row): the *exact* TV between the teacher's joint and the true joint;
* ``nfe`` (network evaluations per sequence: 1 for a one-step generator, ``n`` for the teacher's ancestral
  decoding), ``samples_per_s`` (best of 3 timed batches of ``eval.speed_batch``), ``params``.

The teacher row samples its own exact joint (its ``joint_tv`` is the floor that sampling noise alone gives at
``eval.samples`` sequences); the ``teacher_independent`` row is the spec's arm A: each position drawn independently
from the teacher's marginal (a one-step "set prediction" that keeps the marginals and loses the correlations).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from stillroom.config.autoregressive import AutoregressiveConfig
from stillroom.domains.autoregressive.nets import TOKEN_DIM, CondDenoiser
from stillroom.domains.autoregressive.teacher import next_token_probs
from stillroom.domains.autoregressive.toy import sample_joint, snap
from stillroom.domains.generative.toy_metrics import exact_tv, joint_counts, pair_tv


def token_metrics(tokens_nl: torch.Tensor, teacher_probs: torch.Tensor, true_probs: torch.Tensor) -> dict[str, float]:
    """The TV metrics (see the module docstring) of sampled sequences ``tokens [N, L]``."""
    vocab = teacher_probs.shape[0]
    counts = joint_counts(tokens_nl, vocab)
    return {"joint_tv": exact_tv(counts, teacher_probs), "pair_tv_12": pair_tv(tokens_nl, teacher_probs, 0, 1, vocab),
            "pair_tv_14": pair_tv(tokens_nl, teacher_probs, 0, 3, vocab), "tv_true": exact_tv(counts, true_probs)}


def eval_noise(sec: AutoregressiveConfig, length: int, n: int | None = None) -> torch.Tensor:
    """``[N, L, 2]`` the evaluation noise every generator row draws from (seed ``eval.seed``)."""
    gen = torch.Generator().manual_seed(sec.eval.seed)
    return torch.randn(n or sec.eval.samples, length, TOKEN_DIM, generator=gen)


@torch.no_grad()
def generator_tokens(model: CondDenoiser, noise_nld: torch.Tensor, codebook_vd: torch.Tensor,
                     device: torch.device, chunk: int = 4096) -> torch.Tensor:
    """``[N, L]`` int64: the generator's continuous tokens from ``noise``, snapped to the nearest codeword."""
    was_training = model.training
    model.eval()
    out = [snap(model.generate(noise_nld[i:i + chunk].to(device)), codebook_vd.to(device)).cpu()
           for i in range(0, len(noise_nld), chunk)]
    model.train(was_training)
    return torch.cat(out)


def independent_tokens(teacher_probs: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``[n, L]`` sequences whose positions are drawn independently from the teacher's marginals (arm A)."""
    gen = torch.Generator().manual_seed(seed)
    length = teacher_probs.dim()
    columns = []
    for i in range(length):
        marginal_v = teacher_probs.sum(dim=[d for d in range(length) if d != i])
        columns.append(torch.multinomial(marginal_v, n, replacement=True, generator=gen))
    return torch.stack(columns, dim=1)


def teacher_tokens(teacher_probs: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``[n, L]`` sequences drawn from the teacher's exact joint (what its ancestral decoding draws)."""
    return sample_joint(teacher_probs, n, torch.Generator().manual_seed(seed))


@torch.no_grad()
def teacher_decode(model: nn.Module, batch: int, length: int, vocab: int, device: torch.device,
                   gen: torch.Generator) -> torch.Tensor:
    """``[batch, L]`` ancestral samples of the teacher: ``L`` sequential forwards (what its speed is timed on)."""
    tokens = torch.zeros(batch, 0, dtype=torch.long, device=device)
    for i in range(length):
        padded = torch.cat([tokens, torch.zeros(batch, 1, dtype=torch.long, device=device)], dim=1)
        probs_bv = next_token_probs(model, padded, vocab)[:, i]
        tokens = torch.cat([tokens, torch.multinomial(probs_bv.cpu(), 1, generator=gen).to(device)], dim=1)
    return tokens


def samples_per_s(draw_batch) -> float:
    """Sequences per second of ``draw_batch() -> [B, L]`` (best of 3 after a warm-up)."""
    draw_batch()
    best, size = float("inf"), 1
    for _ in range(3):
        t0 = time.perf_counter()
        size = len(draw_batch())
        best = min(best, time.perf_counter() - t0)
    return size / max(best, 1e-9)


def generator_speed(model: CondDenoiser, sec: AutoregressiveConfig, codebook_vd: torch.Tensor, length: int,
                    device: torch.device) -> float:
    noise = eval_noise(sec, length, sec.eval.speed_batch)
    return samples_per_s(lambda: generator_tokens(model, noise, codebook_vd, device))


def teacher_speed(model: nn.Module, sec: AutoregressiveConfig, length: int, vocab: int, device: torch.device) -> float:
    gen = torch.Generator().manual_seed(0)
    return samples_per_s(lambda: teacher_decode(model, sec.eval.speed_batch, length, vocab, device, gen))
