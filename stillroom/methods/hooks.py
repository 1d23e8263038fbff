"""What a method may change about one training run, and the table of methods that change something.

``kd`` and ``sft`` change nothing (the loss terms say everything). The other methods build a
:class:`MethodHooks` before step 0; the one training loop (:mod:`stillroom.train.loop`) then uses

* ``train_examples``: the sequences to sample from instead of the data pipeline's (e.g.
  step-by-step's predict/explain pairs, REDI's chosen/rejected pairs);
* ``sampler_factory``: how micro-batches are drawn (called like
  :class:`stillroom.data.ExampleSampler`; its ``state_dict`` is checkpointed with the run,
  so a method keeps its resumable state there, e.g. DDK's domain weights);
* ``prepare_batches(micro_batches, step)``: may replace or annotate the step's micro-batches
  (on-policy samples; per-token weights in ``Batch.target_weight``); timed as ``generate_s``;
* ``log_state()``: extra per-step metrics (``metrics.jsonl``, trackers);
* ``report(run_dir)``: writes the method's own report files next to ``report.md`` after the
  run (DDK: the per-domain weights and ratio curves).

A builder may also replace ``p.splits.heldout`` (what the report and ``train.eval_every``
measure, e.g. step-by-step's test-time predict sequences) and ``p.splits.train`` (what
``baseline: true`` trains on); it says so in its module docstring.

A builder has the signature ``build(p, model, *, mix, run_dir, log) -> MethodHooks`` where
``p`` is :class:`stillroom.train.run.Prepared`. It refuses a run it cannot do (wrong loss
terms, missing fields) with a message naming the key to change.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stillroom.data.batch import Batch, Example


@dataclass
class MethodHooks:
    train_examples: list[Example] | None = None
    sampler_factory: Callable[..., object] | None = None
    prepare_batches: Callable[[list[Batch], int], list[Batch]] | None = None
    log_state: Callable[[], dict] | None = None
    report: Callable[[Path], object] | None = None


BUILDERS = {
    "onpolicy": "stillroom.methods.onpolicy:build_hooks",
    "step_by_step": "stillroom.methods.step_by_step:build_hooks",
    "redi": "stillroom.methods.redi:build_hooks",
    "ddk": "stillroom.methods.ddk:build_hooks",
    "conditional": "stillroom.methods.conditional:build_hooks",
}


def build_method_hooks(method: str, p, model, *, mix, run_dir, log) -> MethodHooks:
    """The hooks of ``method`` (empty for ``kd`` and ``sft``)."""
    if method not in BUILDERS:
        return MethodHooks()
    module, name = BUILDERS[method].split(":")
    return getattr(importlib.import_module(module), name)(p, model, mix=mix, run_dir=run_dir, log=log)
