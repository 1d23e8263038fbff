"""Sampling with and without CFG, and the report of ``dataset: markov_modes`` runs (spec 9.7).

A model here is a causal LM over ``[condition id, y_1 .. y_L]`` (the teacher, or a student copied from it);
:func:`decode` draws ``y`` token by token, with CFG logits ``gamma * l(c, y<t) + (1 - gamma) * l(null, y<t)``
when ``gamma != 1`` (two forwards per token). Each report row draws ``eval.samples`` sequences (split evenly over
the conditions, from the seeded generator ``eval.seed``) and measures:

* ``quality`` Q: mean exact ``log p(y | c)`` per sequence under the true conditional generator;
* ``diversity`` D: mean pairwise ``1 - cos`` of bag-of-bigram embeddings within groups of ``eval.diversity_group``
  samples of one condition (averaged over groups and conditions);
* ``modes_hit``: distinct modes per condition among its samples (each sample's mode: the one of highest
  likelihood), averaged over conditions;
* ``nfe`` (forwards per token: 2 with CFG, else 1), ``samples_per_s`` (best of 3 batches of ``eval.speed_batch``).
"""

from __future__ import annotations

import torch
from torch import nn

from stillroom.config.autoregressive import AutoregressiveConfig
from stillroom.domains.autoregressive.evaluate import samples_per_s
from stillroom.domains.autoregressive.markov import MarkovModes, pairwise_diversity
from stillroom.domains.autoregressive.teacher import codebook_logits


def cfg_logits(model: nn.Module, tokens_bn: torch.Tensor, cond_b: torch.Tensor, vocab: int, null_index: int,
               gamma: float) -> torch.Tensor:
    """``[B, n, V]`` guided logits ``gamma * l(c) + (1 - gamma) * l(null)`` at every position (one forward when
    ``gamma == 1``)."""
    cond_logits = codebook_logits(model, tokens_bn, vocab, cond_b)
    if gamma == 1.0:
        return cond_logits
    null_logits = codebook_logits(model, tokens_bn, vocab, torch.full_like(cond_b, null_index))
    return gamma * cond_logits + (1 - gamma) * null_logits


@torch.no_grad()
def decode(model: nn.Module, cond_b: torch.Tensor, vocab: int, length: int, null_index: int, gamma: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, length]`` int64 ancestral samples given condition indices ``cond [B]`` (on the model's device); the
    global RNG draws them unless ``generator`` (a CPU generator) is given."""
    device = next(model.parameters()).device
    cond_b = cond_b.to(device)
    tokens = torch.zeros(len(cond_b), 0, dtype=torch.long, device=device)
    for i in range(length):
        padded = torch.cat([tokens, torch.zeros(len(cond_b), 1, dtype=torch.long, device=device)], dim=1)
        probs_bv = torch.softmax(cfg_logits(model, padded, cond_b, vocab, null_index, gamma)[:, i], dim=-1)
        if generator is None:
            drawn_b1 = torch.multinomial(probs_bv, 1)
        else:
            drawn_b1 = torch.multinomial(probs_bv.cpu(), 1, generator=generator).to(device)
        tokens = torch.cat([tokens, drawn_b1], dim=1)
    return tokens


def eval_conditions(chains: MarkovModes, sec: AutoregressiveConfig) -> torch.Tensor:
    """``[C * k]`` condition indices, ``k = eval.samples // C`` rounded down to whole diversity groups."""
    group = sec.eval.diversity_group
    per_condition = max(group, sec.eval.samples // chains.conditions // group * group)
    return torch.arange(chains.conditions).repeat_interleave(per_condition)


def markov_metrics(tokens_nl: torch.Tensor, cond_n: torch.Tensor, chains: MarkovModes, group: int) -> dict:
    """Q, D and modes hit (see the module docstring) of samples ``tokens [N, L]`` with condition indices ``cond [N]``
    (grouped by condition, each condition's count a multiple of ``group``)."""
    tokens_nl, cond_n = tokens_nl.cpu(), cond_n.cpu()
    quality = float(chains.log_likelihood(tokens_nl, cond_n).mean())
    modes_n = chains.best_mode(tokens_nl, cond_n)
    hits = [len(torch.unique(modes_n[cond_n == c])) for c in range(chains.conditions)]
    groups = [tokens_nl[cond_n == c].reshape(-1, group, tokens_nl.shape[1]) for c in range(chains.conditions)]
    return {"quality": quality, "diversity": pairwise_diversity(torch.cat(groups), chains.vocab),
            "modes_hit": sum(hits) / len(hits)}


def markov_row(model: nn.Module, chains: MarkovModes, sec: AutoregressiveConfig, gamma: float = 1.0) -> dict:
    """One report row: the metrics of ``model``'s samples at CFG strength ``gamma``, NFE per token, samples/s."""
    cond_n = eval_conditions(chains, sec)
    gen = torch.Generator().manual_seed(sec.eval.seed)
    tokens = decode(model, cond_n, chains.vocab, chains.length, chains.null_index, gamma, gen)
    speed_cond = torch.arange(sec.eval.speed_batch) % chains.conditions
    speed = samples_per_s(lambda: decode(model, speed_cond, chains.vocab, chains.length, chains.null_index, gamma,
                                         gen))
    return {**markov_metrics(tokens, cond_n, chains, sec.eval.diversity_group), "nfe": 1 if gamma == 1.0 else 2,
            "samples_per_s": speed, "params": sum(p.numel() for p in model.parameters()), "samples": len(cond_n)}


def markov_report(models: dict[str, nn.Module], chains: MarkovModes, sec: AutoregressiveConfig) -> dict[str, dict]:
    """Rows per named model sampled without CFG; the teacher also brings ``teacher_cfg`` (CFG at
    ``eval.cfg_gamma``)."""
    out = {}
    for name, model in models.items():
        out[name] = markov_row(model, chains, sec)
        if name == "teacher":
            out["teacher_cfg"] = markov_row(model, chains, sec, sec.eval.cfg_gamma)
    return out


def markov_notes(sec: AutoregressiveConfig) -> str:
    return (f"markov_modes rows: quality Q = mean exact log p(y | c) under the true conditional generator; diversity "
            f"D = mean pairwise 1 - cos of bag-of-bigram embeddings within groups of {sec.eval.diversity_group} "
            f"samples of a condition; modes_hit = distinct most-likely modes per condition; nfe = forwards per "
            f"token; teacher_cfg: the teacher with CFG at gamma {sec.eval.cfg_gamma}; the other rows sample "
            "without CFG")


def markov_student(teacher: nn.Module) -> nn.Module:
    """The student of a markov_modes run: a trainable copy of the teacher (spec 9.4 step 1)."""
    import copy

    return copy.deepcopy(teacher).requires_grad_(True).train()


def ce_player(model: nn.Module, vocab: int):
    """The baseline's player: the teacher's own cross-entropy on ``[condition, y]`` (the data's null-condition
    examples included), continued from the same start as the student."""
    from stillroom.domains.autoregressive.teacher import TeacherCE, TeacherForward
    from stillroom.train.loop import Player

    return Player("student", model, TeacherCE(TeacherForward(model, vocab)))


def save_lm(model: nn.Module, folder) -> None:
    """``save_pretrained`` (safetensors) into a temporary sibling folder, renamed into ``folder`` whole."""
    import os
    import shutil
    from pathlib import Path

    folder = Path(folder)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
