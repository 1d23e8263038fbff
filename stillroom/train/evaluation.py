"""Glue between a run and :mod:`stillroom.eval`: which models, which batches, which prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stillroom.data import collate
from stillroom.eval import count_params, evaluate_lm, forward_tokens_per_s, greedy_generations, teacher_logits_from_model, trainable_params, write_report


def heldout_batches(p) -> list:
    rows = p.splits.heldout[: p.cfg.eval.heldout_sequences]
    if not rows:
        raise ValueError("no held-out sequences: raise data.heldout_fraction or add data")
    bs = p.cfg.eval.batch_size
    return [collate(rows[i : i + bs], p.tokenizer.pad_token_id) for i in range(0, len(rows), bs)]


def generation_prompts(p, n: int, text_prompt_tokens: int = 24) -> list:
    """Prompts from the first ``n`` held-out sequences: the tokens before the first learned
    token (chat / prompt-completion records), or the first ``text_prompt_tokens`` tokens of
    plain text (where every token is learned)."""
    prompts = []
    for ex in p.splits.heldout[:n]:
        first_target = next((i for i, t in enumerate(ex.target) if t), len(ex.target))
        cut = first_target if first_target > 1 else text_prompt_tokens
        prompts.append(p.tokenizer.decode(ex.input_ids[: min(cut, len(ex.input_ids) - 1)], skip_special_tokens=False))
    return prompts


def evaluate_models(p, models: dict, *, log: Callable[[str], None] = print) -> dict:
    cfg = p.cfg
    batches = heldout_batches(p)
    teacher = p.teacher_model
    teacher_logits = teacher_logits_from_model(teacher) if teacher is not None else None
    out = {}
    for name, model in models.items():
        metrics = evaluate_lm(
            model, batches, teacher_logits,
            precision=cfg.eval.precision, vocab_size=p.vocab_size,
        )
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
        prompts = generation_prompts(p, cfg.eval.generations)
        for name, model in models.items():
            out[name]["generations"] = greedy_generations(model, p.tokenizer, prompts, cfg.eval.max_new_tokens)
            out[name]["prompts"] = prompts
    return out


def write_run_report(p, models: dict, metrics_files: dict[str, Path], *, log: Callable[[str], None] = print) -> dict:
    generations = {k: v.pop("generations") for k, v in models.items() if "generations" in v}
    prompts = next((v.pop("prompts") for v in models.values() if "prompts" in v), None)
    for v in models.values():
        v.pop("prompts", None)
    notes = []
    if p.kept_layers is not None:
        notes.append(f"student keeps teacher layers {p.kept_layers}")
    stats = p.splits.stats
    notes.append("data: " + ", ".join(f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float))))
    report = write_report(
        p.run_dir, models, generations=generations or None, prompts=prompts,
        metrics_files={k: f for k, f in metrics_files.items() if f.exists()},
        title=f"stillroom run `{p.cfg.name}` ({p.cfg.method})", notes=notes,
    )
    log(f"report: {p.run_dir / 'report.md'}")
    return report
