"""Glue between a causal-LM run and :mod:`stillroom.eval`: which models, which batches, which prompts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from stillroom.data import collate
from stillroom.data.batch import Example, prompt_length
from stillroom.eval import count_params, evaluate_lm, greedy_generations, teacher_logits_from_model, trainable_params
from stillroom.eval.metrics import evaluate_lms
from stillroom.eval.speed import interleaved_tokens_per_s, same_architecture, speed_line

if TYPE_CHECKING:
    from stillroom.domains.lm.prepare import LmRun

TEXT_PROMPT_TOKENS = 24
"""Plain-text held-out sequences have no prompt: their first this-many tokens prompt the report's generations."""


def heldout_batches(lm: "LmRun", examples: list[Example], pad_id: int | None = None) -> list:
    """The first ``eval.heldout_sequences`` of ``examples`` in batches of ``eval.batch_size`` (padded with
    ``pad_id``, by default the student tokenizer's)."""
    rows = examples[: lm.cfg.eval.heldout_sequences]
    if not rows:
        raise ValueError("no held-out sequences: raise data.heldout_fraction or add data")
    bs = lm.cfg.eval.batch_size
    pad = lm.tokenizer.pad_token_id if pad_id is None else pad_id
    return [collate(rows[i : i + bs], pad) for i in range(0, len(rows), bs)]


def teacher_logits_fn(lm: "LmRun"):
    """The teacher's logits beside a student's for KL and agreement; None without a teacher or when the
    teacher's vocabulary differs (``tokenizer_mode: cross``: bits per byte compare them instead). Its target rows
    are remembered per held-out batch: keep one per run (``LmRun.heldout_teacher``), so the frozen teacher's
    body runs once per batch for the whole run, not once per student and evaluation."""
    if lm.teacher_model is None or lm.cross is not None:
        return None
    return teacher_logits_from_model(lm.teacher_model, remember=True)


def _measured(lm: "LmRun", model: torch.nn.Module, examples: list[Example]) -> tuple[list, int]:
    """``(held-out batches, vocabulary)`` of ``model``: a cross-tokenizer teacher reads the held-out text in its
    own tokens."""
    if lm.cross is not None and model is lm.teacher_model:
        from stillroom.domains.lm.cross import teacher_examples

        return heldout_batches(lm, teacher_examples(lm.cross, examples), lm.cross.t.fill_id), lm.cross.teacher_vocab
    return heldout_batches(lm, examples), lm.vocab_size


def _tokenizer_of(lm: "LmRun", model: torch.nn.Module) -> Any:
    """The tokenizer ``model`` reads: the student's, or a cross-tokenizer teacher's own."""
    return lm.teacher_tokenizer if lm.cross is not None and model is lm.teacher_model else lm.tokenizer


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
    teacher_fn = lm.heldout_teacher

    def evaluate(model: torch.nn.Module) -> dict:
        m = evaluate_lm(model, batches, teacher_fn, precision=lm.cfg.eval.precision, vocab_size=lm.vocab_size)
        return {k: m[k] for k in ("heldout_ce", "kl_teacher_student", "top1_agreement") if m.get(k) is not None}

    return evaluate


def evaluate_models(lm: "LmRun", models: dict[str, tuple[torch.nn.Module, list[Example]]], *,
                    log: Callable[[str], None] = print, timed: bool = True) -> dict[str, dict]:
    """Report metrics of each named model on its held-out examples (against the in-process teacher).

    Speed (``tokens_per_s``) is measured for the whole group at once, after the held-out metrics: every model
    warmed up, then timed interleaved (:func:`~stillroom.eval.speed.interleaved_tokens_per_s`; a model
    of the architecture of one before it takes that one's rate). A group
    without the teacher (the students after training) times the teacher again beside them and returns a
    ``teacher`` row holding that speed alone; the caller merges it into the teacher's row, so the report's
    ``speedup_student_over_teacher`` divides two numbers of one measurement (also after ``--resume``).
    ``timed=False``: no speed at all (the group before training; the run times it after training).
    """
    cfg = lm.cfg
    groups: dict[tuple, list[str]] = {}  # models measured on the same batches are evaluated together
    for name, (model, examples) in models.items():
        groups.setdefault((id(examples), lm.cross is not None and model is lm.teacher_model), []).append(name)
    out = {}
    for names in groups.values():
        batches, vocab = _measured(lm, *models[names[0]])
        results = evaluate_lms({name: models[name][0] for name in names}, batches, lm.heldout_teacher,
                               precision=cfg.eval.precision, vocab_size=vocab)
        for name, metrics in results.items():
            metrics["params"] = count_params(models[name][0])
            metrics["trainable_params"] = trainable_params(models[name][0])
            out[name] = metrics
    out = {name: out[name] for name in models}  # the order given
    for name, metrics in out.items():
        log(f"eval {name}: {eval_line(metrics)}")
    if timed:
        out = _timed(lm, models, out, log)
    if cfg.vlm is not None:  # answers to held-out questions about images: accuracy and generations
        from stillroom.domains.vl.vlm_eval import vlm_report

        answers = vlm_report(cfg.run_dir, lm.data.heldout, {k: m for k, (m, _) in models.items()}, lm.tokenizer,
                             questions=cfg.eval.heldout_sequences, shown=cfg.vlm.report_images,
                             max_new_tokens=cfg.eval.max_new_tokens, log=log)
        for name, metrics in answers.items():
            out[name].update(metrics)
    elif cfg.eval.generations:
        prompts = generation_prompts(lm, cfg.eval.generations)
        for name, (model, _) in models.items():
            out[name]["generations"] = greedy_generations(model, _tokenizer_of(lm, model), prompts,
                                                          cfg.eval.max_new_tokens)
            out[name]["prompts"] = prompts
    if cfg.eval.knowledge:  # fictional facts: trained phrasing vs paraphrase vs implication (knowledge.md)
        from stillroom.eval.knowledge import knowledge_report

        rows = knowledge_report(cfg.run_dir, cfg.eval.knowledge, {k: m for k, (m, _) in models.items()},
                                lm.tokenizer, log=log)
        for name, metrics in rows.items():
            out[name].update(metrics)
    if cfg.eval.lm_eval is not None:  # lm-evaluation-harness tasks on the in-memory models
        from stillroom.eval.harness import lm_eval_rows

        rows = lm_eval_rows(cfg.eval.lm_eval, {k: (m, _tokenizer_of(lm, m)) for k, (m, _) in models.items()}, log=log)
        for name, metrics in rows.items():
            out[name].update(metrics)
    return out


def _timed(lm: "LmRun", models: dict[str, tuple[torch.nn.Module, list[Example]]], out: dict[str, dict],
           log: Callable[[str], None]) -> dict[str, dict]:
    """``out`` with every model's ``tokens_per_s``, timed as a group (the teacher again where it is not in it)."""
    cfg = lm.cfg
    timed = {name: model for name, (model, _) in models.items()}
    again = "teacher" not in timed and lm.teacher_model is not None
    if again:
        timed = {"teacher": lm.teacher_model, **timed}
        out = {"teacher": {}, **out}
    inputs = None
    if cfg.vlm is not None:  # a VLM reads images: timed on held-out image questions, not random text ids
        rows = lm.data.heldout[: cfg.train.micro_batch_size]
        inputs = collate(rows, lm.tokenizer.pad_token_id).model_inputs() if rows else None
    rates = interleaved_tokens_per_s(timed, seq_len=cfg.data.seq_len, batch_size=cfg.train.micro_batch_size,
                                     total_tokens=cfg.eval.speed_tokens, precision=cfg.train.precision,
                                     inputs=inputs)
    for name, rate in rates.items():
        out[name]["tokens_per_s"] = rate
    log(speed_line(rates, "tokens", again, same_architecture(timed)))
    return out


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def eval_line(m: dict) -> str:
    """``ce 4.7270, kl 2.0068, top1 30.0%`` (``n/a`` where there is no teacher)."""
    top1 = m.get("top1_agreement")
    return (f"ce {_num(m['heldout_ce'], '.4f')}, kl {_num(m.get('kl_teacher_student'), '.4f')}, "
            f"top1 {_num(None if top1 is None else 100 * top1, '.1f')}{'' if top1 is None else '%'}")
