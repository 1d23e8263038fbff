"""Distilling step-by-step (Hsieh et al., ACL Findings 2023) for decoder-only students.

``method: step_by_step``. Each record carries an input ``x``, a label and a teacher
rationale. With ``step_by_step.variant``:

* ``multi_task`` (the paper): two sequences per record sharing ``x``, drawn together,

  - predict: prompt ``predict_prefix + x + prompt_suffix``, target ``label``;
  - explain: prompt ``explain_prefix + x + prompt_suffix``, target ``rationale``;

  both ``[BOS] prompt target [EOS]`` with the loss on target tokens (and EOS) only.
  The objective of one optimizer step is

      L = alpha * CE_predict + (1 - alpha) * CE_explain,

  where each CE is the mean over *its own task's* target tokens of the step, summed over
  its micro-batches and processes (the paper's Hugging Face T5 losses: a long rationale
  and a short label weigh alpha : 1 - alpha whatever their lengths). The loop divides the
  step's weighted sum by ``N`` = all target tokens of the step, which it counts before
  calling :class:`TaskWeights`; so the predict tokens get weight ``alpha * N / N_p`` and
  the explain tokens ``(1 - alpha) * N / N_e``, and ``sum(w * l) / N == L``.
* ``single_task`` (the paper's ablation): one sequence, prompt ``predict_prefix + x +
  prompt_suffix``, target ``rationale + single_task_separator + label``; plain mean CE.
* ``label_only``: standard fine-tuning, prompt ``x + prompt_suffix`` (no task prefix, as the
  paper's baseline), target ``label``; plain mean CE.

The records go through the one data pipeline with :class:`StepByStepEncoder`, so the
held-out split, ``data.on_bad_record``, truncation and statistics are the pipeline's. Fields:
``step_by_step.input_field`` (default: the source's ``prompt_field``), ``label_field``
(default: ``completion_field``) and ``rationale_field``. A record without a needed field,
or with a non-string value, is a bad record named by ``file:line``. Records whose label or
rationale is blank (teacher parse failures) are dropped and counted unless
``drop_empty: false``.

Views (:mod:`stillroom.data.encoders`): the report measures the trained student on the
test-time sequence of each held-out record (``multi_task``: the predict sequence;
``single_task``: the single-task sequence; ``label_only``: the unprefixed sequence), and
the CE baseline (``baseline: true``) is standard fine-tuning: it trains and is measured on
the unprefixed ``x + prompt_suffix -> label`` sequences of the same records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from stillroom.config.core import DataSource
from stillroom.config.methods import StepByStepConfig
from stillroom.data.batch import Batch
from stillroom.data.encoders import RecordViews
from stillroom.data.formats import Encoded, Format, TextEncoder, string_field
from stillroom.eval.metrics import row_nll
from stillroom.methods.base import Method, MethodContext, MethodPlan, StepCounts

PREDICT, EXPLAIN, SINGLE, LABEL = "predict", "explain", "single", "label"


class StepByStepEncoder:
    """A record's predict/explain (or single-task, or label) sequences; see the module docstring."""

    packs_text = False
    views_differ = True
    on_too_long: Literal["truncate", "drop"] = "truncate"

    def __init__(self, sc: StepByStepConfig) -> None:
        self.sc = sc
        self.roles: tuple[str, ...] = {"multi_task": (PREDICT, EXPLAIN), "single_task": (SINGLE,),
                                       "label_only": (LABEL,)}[sc.variant]
        self.counts = {"dropped_empty_label": 0, "dropped_empty_rationale": 0}

    def encode(self, fields: dict, fmt: Format, src: DataSource, text: TextEncoder, key: str) -> RecordViews | None:
        c = self.sc
        x_set = "step_by_step.input_field" if c.input_field else "data.sources[].prompt_field (or step_by_step.input_field)"
        y_set = "step_by_step.label_field" if c.label_field else "data.sources[].completion_field (or step_by_step.label_field)"
        x = string_field(fields, c.input_field or src.prompt_field, f"set {x_set} or fix the record")
        label = string_field(fields, c.label_field or src.completion_field, f"set {y_set} or fix the record")
        rationale = string_field(fields, c.rationale_field, "set step_by_step.rationale_field or fix the record")
        if c.drop_empty and not label.strip():
            self.counts["dropped_empty_label"] += 1
            return None
        if c.drop_empty and not rationale.strip():
            self.counts["dropped_empty_rationale"] += 1
            return None

        def seq(prompt: str, target: str) -> Encoded:
            head = text.bos_prefix + text.encode(prompt)
            tail = text.encode(target) + text.eos()
            return Encoded(head + tail, [False] * len(head) + [True] * len(tail))

        plain = seq(x + c.prompt_suffix, label)
        if c.variant == "label_only":
            return RecordViews([plain], plain, plain)
        if c.variant == "single_task":
            single = seq(c.predict_prefix + x + c.prompt_suffix, rationale + c.single_task_separator + label)
            return RecordViews([single], single, plain)
        predict = seq(c.predict_prefix + x + c.prompt_suffix, label)
        explain = seq(c.explain_prefix + x + c.prompt_suffix, rationale)
        return RecordViews([predict, explain], predict, plain)


def predict_rows(batch: Batch) -> torch.Tensor:
    """``[B]`` bool: the predict rows of ``batch`` (the others must be explain rows)."""
    unknown = [u for u, r in zip(batch.uids, batch.roles) if r not in (PREDICT, EXPLAIN)]
    if unknown:
        raise ValueError(f"step_by_step: rows {unknown[:3]} are neither predict nor explain sequences")
    return torch.tensor([r == PREDICT for r in batch.roles])


class TaskWeights:
    """``weight_targets`` of ``multi_task``: per-token weights ``alpha * N / N_p`` (predict) and
    ``(1 - alpha) * N / N_e`` (explain), with ``N`` the step's target tokens counted by the loop
    and ``N_p`` the predict tokens of the whole step (summed over processes); ``N_e = N - N_p``."""

    def __init__(self, alpha: float, task_ce: Callable[[list[Batch]], dict[str, float]] | None = None,
                 task_ce_every: int = 0) -> None:
        self.alpha = float(alpha)
        self.task_ce = task_ce
        self.task_ce_every = task_ce_every
        self.last: dict[str, float] = {}

    def __call__(self, micro: list[Batch], counts: StepCounts) -> list[torch.Tensor]:
        rows = [predict_rows(b) for b in micro]
        n_p = counts.all_reduce_sum(sum(int(b.loss_mask.sum(dim=1)[r].sum()) for b, r in zip(micro, rows)))
        n = counts.targets
        n_e = n - n_p
        if n_p == 0 or n_e == 0:
            raise ValueError(f"step {counts.step}: step_by_step needs predict and explain target tokens in every "
                             f"step (got {n_p:.0f} predict, {n_e:.0f} explain)")
        w_p, w_e = self.alpha * n / n_p, (1.0 - self.alpha) * n / n_e
        weights = []
        for b, r in zip(micro, rows):
            row_w = torch.where(r, torch.tensor(w_p, dtype=torch.float32), torch.tensor(w_e, dtype=torch.float32))
            weights.append(row_w[:, None] * b.loss_mask.float())
        self.last = {"step_by_step/tokens_predict": n_p, "step_by_step/tokens_explain": n_e,
                     "step_by_step/weight_predict": w_p, "step_by_step/weight_explain": w_e}
        if self.task_ce is not None and self.task_ce_every and (counts.step + 1) % self.task_ce_every == 0:
            self.last.update(self.task_ce(micro))
        return weights

    def metrics(self) -> dict[str, float]:
        return dict(self.last)


def task_ce_fn(model: torch.nn.Module, vocab_size: int, all_reduce_sum: Callable[[float], float]
               ) -> Callable[[list[Batch]], dict[str, float]]:
    """An extra no-grad forward: mean CE of each task over the step's batches (at the step's parameters)."""

    def measure(micro: list[Batch]) -> dict[str, float]:
        sums = {PREDICT: 0.0, EXPLAIN: 0.0}
        counts = {PREDICT: 0.0, EXPLAIN: 0.0}
        for b in micro:
            nll_b, count_b = row_nll(model, b, vocab_size=vocab_size)
            pred_b = predict_rows(b)
            for task, rows in ((PREDICT, pred_b), (EXPLAIN, ~pred_b)):
                sums[task] += float(nll_b[rows].sum())
                counts[task] += float(count_b[rows].sum())
        return {f"step_by_step/ce_{t}": all_reduce_sum(sums[t]) / max(all_reduce_sum(counts[t]), 1.0) for t in sums}

    return measure


def build(ctx: MethodContext) -> MethodPlan:
    """The per-task token weights of ``multi_task`` (the other variants are plain CE on their sequences)."""
    sc = ctx.cfg.step_by_step
    names = [t.name for t in ctx.cfg.loss.terms]
    keys = ("train_sequences", "heldout_sequences", "dropped_empty_label", "dropped_empty_rationale",
            "dropped_no_targets", "truncated_sequences", "records_bad")
    ctx.log(f"step_by_step: variant {sc.variant}, alpha {sc.alpha}, loss terms {names}; "
            + ", ".join(f"{k}={ctx.data.stats.get(k, 0)}" for k in keys))
    if any(n != "ce" for n in names):
        ctx.log("step_by_step: the task weights multiply every logit loss term, not only ce")
    if sc.variant != "multi_task":
        return MethodPlan()
    task_ce = task_ce_fn(ctx.model, ctx.vocab_size, ctx.topology.all_reduce_sum) if sc.task_ce_every else None
    weights = TaskWeights(sc.alpha, task_ce, sc.task_ce_every)
    return MethodPlan(weight_targets=weights, metrics=weights.metrics)


METHOD = Method("step_by_step", encoder=lambda cfg: StepByStepEncoder(cfg.step_by_step), build=build)
