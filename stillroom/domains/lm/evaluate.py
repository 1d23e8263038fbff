"""Glue between a causal-LM run and :mod:`stillroom.eval`: which models, which batches, which prompts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from stillroom.data import collate
from stillroom.data.batch import Example, prompt_length
from stillroom.eval import count_params, evaluate_lm, forward_tokens_per_s, greedy_generations, teacher_logits_from_model, trainable_params

if TYPE_CHECKING:
    from stillroom.domains.lm.prepare import LmRun

TEXT_PROMPT_TOKENS = 24
"""Plain-text held-out sequences have no prompt: their first this-many tokens prompt the report's generations."""


def heldout_batches(lm: "LmRun", examples: list[Example]) -> list:
    """The first ``eval.heldout_sequences`` of ``examples`` in batches of ``eval.batch_size``."""
    rows = examples[: lm.cfg.eval.heldout_sequences]
    if not rows:
        raise ValueError("no held-out sequences: raise data.heldout_fraction or add data")
    bs = lm.cfg.eval.batch_size
    return [collate(rows[i : i + bs], lm.tokenizer.pad_token_id) for i in range(0, len(rows), bs)]


def generation_prompts(lm: "LmRun", n: int) -> list[str]:
    """Prompts of the first ``n`` held-out sequences (:func:`stillroom.data.batch.prompt_length`)."""
    prompts = []
    for ex in lm.data.heldout[:n]:
        cut = prompt_length(ex.target, len(ex.input_ids), TEXT_PROMPT_TOKENS)
        prompts.append(lm.tokenizer.decode(ex.input_ids[:cut], skip_special_tokens=False))
    return prompts


def periodic_evaluation(lm: "LmRun", heldout: list[Example]) -> Callable[[torch.nn.Module], dict]:
    """Held-out CE, KL to the teacher and top-1 agreement, for ``train.eval_every`` (process 0 only)."""
    batches = heldout_batches(lm, heldout)
    teacher_fn = teacher_logits_from_model(lm.teacher_model) if lm.teacher_model is not None else None

    def evaluate(model: torch.nn.Module) -> dict:
        m = evaluate_lm(model, batches, teacher_fn, precision=lm.cfg.eval.precision, vocab_size=lm.vocab_size)
        return {k: m[k] for k in ("heldout_ce", "kl_teacher_student", "top1_agreement") if m.get(k) is not None}

    return evaluate


def evaluate_models(lm: "LmRun", models: dict[str, tuple[torch.nn.Module, list[Example]]], *,
                    log: Callable[[str], None] = print) -> dict[str, dict]:
    """Report metrics of each named model on its held-out examples (against the in-process teacher)."""
    cfg = lm.cfg
    teacher_logits = teacher_logits_from_model(lm.teacher_model) if lm.teacher_model is not None else None
    out = {}
    for name, (model, examples) in models.items():
        metrics = evaluate_lm(model, heldout_batches(lm, examples), teacher_logits,
                              precision=cfg.eval.precision, vocab_size=lm.vocab_size)
        metrics["params"] = count_params(model)
        metrics["trainable_params"] = trainable_params(model)
        metrics["tokens_per_s"] = forward_tokens_per_s(
            model, seq_len=cfg.data.seq_len, batch_size=cfg.train.micro_batch_size,
            total_tokens=cfg.eval.speed_tokens, precision=cfg.train.precision,
        )
        log(f"eval {name}: ce {metrics['heldout_ce']:.3f}, kl {metrics.get('kl_teacher_student')}, "
            f"top1 {metrics.get('top1_agreement')}")
        out[name] = metrics
    if cfg.eval.generations:
        prompts = generation_prompts(lm, cfg.eval.generations)
        for name, (model, _) in models.items():
            out[name]["generations"] = greedy_generations(model, lm.tokenizer, prompts, cfg.eval.max_new_tokens)
            out[name]["prompts"] = prompts
    return out
