"""Distilling step-by-step (Hsieh et al., ACL Findings 2023) for decoder-only students.

``method: step_by_step``. Each record carries an input ``x``, a label and a teacher
rationale. With ``step_by_step.variant``:

* ``multi_task`` (the paper): two sequences per record sharing ``x``,

  - predict: prompt ``predict_prefix + x + prompt_suffix``, target ``label``;
  - explain: prompt ``explain_prefix + x + prompt_suffix``, target ``rationale``;

  both ``[BOS] prompt target [EOS]`` with the loss on target tokens (and EOS) only.
  The objective of one optimizer step is

      L = alpha * CE_predict + (1 - alpha) * CE_explain,

  where each CE is the mean over *its own task's* target tokens of the step, summed over
  its micro-batches and processes (the paper's Hugging Face T5 losses: a long rationale
  and a short label weigh alpha : 1 - alpha whatever their lengths). The one training
  loop divides the step's weighted sum by ``N`` = all target tokens of the step, so the
  predict tokens get weight ``alpha * N / N_p`` and the explain tokens
  ``(1 - alpha) * N / N_e`` (``Batch.target_weight``); then ``sum(w * l) / N == L``.
  The two sequences of a record are always drawn together, into the same micro-batch
  (:class:`PairSampler`; ``train.micro_batch_size`` counts sequences and must be even).
* ``single_task`` (the paper's ablation): one sequence, prompt ``predict_prefix + x + prompt_suffix``,
  target ``rationale + single_task_separator + label``; plain mean CE.
* ``label_only``: the predict sequence alone; plain mean CE (fine-tuning with the prefix).

Records come from ``data.sources`` (read again here, with the pipeline's readers, record
identities and held-out split, so exactly the pipeline's held-out records are left out
of training). Fields: ``step_by_step.input_field`` (default: the source's
``prompt_field``), ``label_field`` (default: ``completion_field``) and
``rationale_field``. So a source declared as ``format: prompt_completion`` with
``prompt_field: input, completion_field: label`` (or, for ``bundled: arithmetic``,
``prompt_field: question, completion_field: label_completion``) describes the label
task, and the method adds the rationale. A record without a needed field, or with a
non-string value, is a bad record named by ``file:line`` (``data.on_bad_record``).
Records whose label or rationale is blank (teacher parse failures) are dropped and
counted unless ``drop_empty: false``. Each sequence is cut to ``data.seq_len`` tokens;
a record left without a target token in one of its sequences is dropped and counted.

The run's held-out sequences (what the report and ``train.eval_every`` measure) are
replaced by the held-out records' *test-time* sequences: the predict sequence
(``single_task``: the single-task one). The run's training split (``p.splits.train``, which
``baseline: true`` trains on with ``method: sft``) is replaced by the predict sequences of the
training records, so the baseline is label-only fine-tuning on the same records, same prefix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stillroom.config.schema import DataSource, StepByStepConfig
from stillroom.data.batch import Batch, Example
from stillroom.data.errors import BadRecord, BadRecordPolicy, DataError
from stillroom.data.formats import TextEncoder, string_field
from stillroom.data.pipeline import good_records, is_heldout, record_key, source_tags
from stillroom.data.readers import describe
from stillroom.data.sampler import ExampleSampler
from stillroom.eval.metrics import row_nll

PREDICT, EXPLAIN, SINGLE = "predict", "explain", "single"


# ---------------------------------------------------------------------------- records -> sequences
@dataclass
class TaskRecord:
    """One usable record: the three texts and where it came from."""

    x: str
    label: str
    rationale: str
    uid: str
    where: str
    domain: str | None = None


@dataclass
class StepByStepData:
    """The method's sequences. ``train``: in ``multi_task`` the pairs ``[predict_0, explain_0,
    predict_1, explain_1, ...]``, else one sequence per record; ``heldout``: the test-time
    sequence of each held-out record; ``stats``: counts of what was read, dropped, truncated."""

    train: list[Example]
    heldout: list[Example]
    stats: dict = field(default_factory=dict)
    predict_train: list[Example] = field(default_factory=list)
    """The predict sequence of every training record used (``label_only``'s data)."""


def read_records(
    sources: list[DataSource], cfg: StepByStepConfig, *, seed: int, heldout_fraction: float, on_bad_record: str,
) -> tuple[list[TaskRecord], list[TaskRecord], dict]:
    """``(train records, held-out records, stats)`` of ``sources``.

    Applies each source's ``limit`` (readable records), ``on_bad_record`` and the pipeline's
    hash-based held-out split (:func:`stillroom.data.pipeline.is_heldout` on the same record key).
    """
    train: list[TaskRecord] = []
    held: list[TaskRecord] = []
    stats = {"records_read": 0, "records_bad": 0, "dropped_empty_label": 0, "dropped_empty_rationale": 0}
    for src, tag in zip(sources, source_tags(sources)):
        policy = BadRecordPolicy(on_bad_record)
        x_key = cfg.input_field or src.prompt_field
        y_key = cfg.label_field or src.completion_field
        x_set = "step_by_step.input_field" if cfg.input_field else "data.sources[].prompt_field (or step_by_step.input_field)"
        y_set = "step_by_step.label_field" if cfg.label_field else "data.sources[].completion_field (or step_by_step.label_field)"
        readable = 0
        for item in good_records(src, seed, policy, stats):
            readable += 1
            try:
                x = string_field(item.fields, x_key, f"set {x_set} or fix the record")
                label = string_field(item.fields, y_key, f"set {y_set} or fix the record")
                rationale = string_field(item.fields, cfg.rationale_field,
                                         "set step_by_step.rationale_field or fix the record")
            except BadRecord as bad:
                policy(bad.at(item.where))
                continue
            if cfg.drop_empty and not label.strip():
                stats["dropped_empty_label"] += 1
                continue
            if cfg.drop_empty and not rationale.strip():
                stats["dropped_empty_rationale"] += 1
                continue
            key = record_key(tag, item.index, item.fields)
            rec = TaskRecord(x, label, rationale, uid=f"{tag}:{item.index}", where=item.where, domain=src.domain)
            (held if is_heldout(key, heldout_fraction) else train).append(rec)
        stats["records_bad"] += policy.count
        if readable == 0:
            raise DataError(f"data source {describe(src).label}: no readable records for step_by_step")
    if not train:
        raise DataError(f"step_by_step: no training records ({stats}); add data or lower data.heldout_fraction")
    return train, held, stats


class SequenceBuilder:
    """Token sequences of the tasks: ``[BOS] prefix+x target [EOS]``, cut to ``seq_len`` tokens.

    The prompt and the target are tokenized separately (as ``prompt_completion`` records are),
    so the boundary between prompt (not learned) and target (learned) is exact.
    """

    def __init__(self, tokenizer: Any, cfg: StepByStepConfig, *, seq_len: int, add_eos: bool) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        self.seq_len = seq_len
        self.enc = TextEncoder(tokenizer, add_eos)
        self.truncated = 0

    def sequence(self, prompt: str, target: str, uid: str, task: str, domain: str | None) -> Example | None:
        """The example, or ``None`` when truncation leaves no predicted target token."""
        head = self.enc.bos_prefix + self.enc.encode(prompt)
        tail_text = self.enc.encode(target)
        tail = tail_text + self.enc.eos()
        ids, flags = head + tail, [False] * len(head) + [True] * len(tail)
        if len(ids) > self.seq_len:
            self.truncated += 1
            ids, flags = ids[: self.seq_len], flags[: self.seq_len]
        if not any(flags[1:]):
            return None
        kept_text = tail_text[: max(0, len(ids) - len(head))]  # n_bytes: the target text tokens kept
        n_bytes = len(self.tok.decode(kept_text, skip_special_tokens=True).encode("utf-8")) if kept_text else 0
        digest = hashlib.sha1(",".join(map(str, ids)).encode("ascii")).hexdigest()[:10]
        return Example(input_ids=ids, target=flags, uid=f"{uid}:{task}:{digest}", domain=domain, n_bytes=n_bytes,
                       meta={"task": task})

    def tasks(self, rec: TaskRecord, variant: str) -> list[Example] | None:
        """The record's training sequences for ``variant`` (``None``: the record is unusable)."""
        c = self.cfg
        if variant == "single_task":
            target = rec.rationale + c.single_task_separator + rec.label
            seqs = [self.sequence(c.predict_prefix + rec.x + c.prompt_suffix, target, rec.uid, SINGLE, rec.domain)]
        else:
            seqs = [self.sequence(c.predict_prefix + rec.x + c.prompt_suffix, rec.label, rec.uid, PREDICT, rec.domain)]
            if variant == "multi_task":
                seqs.append(self.sequence(c.explain_prefix + rec.x + c.prompt_suffix, rec.rationale, rec.uid, EXPLAIN,
                                          rec.domain))
        return None if any(s is None for s in seqs) else seqs  # type: ignore[return-value]


def build_data(
    sources: list[DataSource], cfg: StepByStepConfig, tokenizer: Any, *, seq_len: int, add_eos: bool, seed: int,
    heldout_fraction: float, heldout_max: int, on_bad_record: str = "stop",
) -> StepByStepData:
    """Read the records of ``sources`` and build the ``cfg.variant`` sequences (see the module docstring)."""
    train_recs, held_recs, stats = read_records(
        sources, cfg, seed=seed, heldout_fraction=heldout_fraction, on_bad_record=on_bad_record)
    builder = SequenceBuilder(tokenizer, cfg, seq_len=seq_len, add_eos=add_eos)
    train: list[Example] = []
    predict_train: list[Example] = []
    dropped = 0
    for rec in train_recs:
        seqs = builder.tasks(rec, cfg.variant)
        pred = seqs if cfg.variant != "single_task" or seqs is None else builder.tasks(rec, "label_only")
        if seqs is None or pred is None:
            dropped += 1
            continue
        train.extend(seqs)
        predict_train.append(pred[0])
    test_variant = "single_task" if cfg.variant == "single_task" else "label_only"
    heldout = []
    for rec in sorted(held_recs, key=lambda r: hashlib.sha256(r.uid.encode()).hexdigest()):
        seqs = builder.tasks(rec, test_variant)
        if seqs is not None:
            heldout.extend(seqs)
    heldout = heldout[:heldout_max]
    if not train:
        raise DataError(f"step_by_step: every training record lost its targets to data.seq_len={seq_len}; raise it")
    stats.update(train_records=len(train_recs) - dropped, heldout_records=len(held_recs), dropped_no_targets=dropped,
                 truncated_sequences=builder.truncated, train_sequences=len(train), heldout_sequences=len(heldout))
    return StepByStepData(train, heldout, stats, predict_train)


# ---------------------------------------------------------------------------- sampling and weights
class PairSampler:
    """Draws *records* and yields both of their sequences (``multi_task`` data laid out as
    ``[predict_0, explain_0, predict_1, explain_1, ...]``), so a record's two tasks are always in
    the same micro-batch. Called like :class:`stillroom.data.ExampleSampler`; ``batch_size``
    counts sequences (must be even). Record order, epochs, ranks and resume are an
    :class:`ExampleSampler` over the ``n / 2`` records with ``batch_size / 2``."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size % 2:
            raise ValueError(f"step_by_step (variant multi_task): train.micro_batch_size={batch_size} must be even "
                             "(each record gives a predict and an explain sequence, drawn together)")
        if n % 2:
            raise ValueError(f"PairSampler: {n} sequences is not a list of (predict, explain) pairs")
        self.records = ExampleSampler(n // 2, batch_size // 2, seed, shuffle, rank, world_size)

    def next_indices(self) -> list[int]:
        return [i for r in self.records.next_indices() for i in (2 * r, 2 * r + 1)]

    def state_dict(self) -> dict:
        return {"pairs": True, **self.records.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("pairs"):
            raise ValueError("step_by_step: the checkpoint's sampler did not draw (predict, explain) pairs; "
                             "resume with the variant the run was started with")
        self.records.load_state_dict({k: v for k, v in state.items() if k != "pairs"})


def task_masks(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B]`` bool masks of the predict and explain rows of ``batch`` (from its uids)."""
    tasks = [u.rsplit(":", 2)[-2] if u.count(":") >= 2 else "" for u in batch.uids]
    unknown = [u for u, t in zip(batch.uids, tasks) if t not in (PREDICT, EXPLAIN)]
    if unknown:
        raise ValueError(f"step_by_step: rows {unknown[:3]} are neither predict nor explain sequences")
    predict = torch.tensor([t == PREDICT for t in tasks])
    return predict, ~predict


class TaskWeights:
    """``prepare_batches`` of ``multi_task``: per-token weights ``alpha * N / N_p`` (predict) and
    ``(1 - alpha) * N / N_e`` (explain), with the counts of the whole step (all micro-batches,
    summed over processes by ``all_reduce_sum``). ``last`` holds the step's counts and weights."""

    def __init__(self, alpha: float, all_reduce_sum: Callable[[float], float] = lambda v: v,
                 task_ce: Callable[[list[Batch]], dict[str, float]] | None = None, task_ce_every: int = 0) -> None:
        self.alpha = float(alpha)
        self.all_reduce_sum = all_reduce_sum
        self.task_ce = task_ce
        self.task_ce_every = task_ce_every
        self.last: dict[str, float] = {}

    def __call__(self, micro: list[Batch], step: int) -> list[Batch]:
        masks = [task_masks(b) for b in micro]
        n_p = n_e = 0
        for b, (pred_b, expl_b) in zip(micro, masks):
            counts_b = b.loss_mask.sum(dim=1)
            n_p += int(counts_b[pred_b].sum())
            n_e += int(counts_b[expl_b].sum())
        n_p, n_e = self.all_reduce_sum(n_p), self.all_reduce_sum(n_e)
        if n_p == 0 or n_e == 0:
            raise ValueError(f"step {step}: step_by_step needs predict and explain target tokens in every step "
                             f"(got {n_p:.0f} predict, {n_e:.0f} explain)")
        n = n_p + n_e
        w_p, w_e = self.alpha * n / n_p, (1.0 - self.alpha) * n / n_e
        out = []
        for b, (pred_b, _) in zip(micro, masks):
            row_w = torch.where(pred_b, torch.tensor(w_p, dtype=torch.float32), torch.tensor(w_e, dtype=torch.float32))
            b.target_weight = row_w[:, None] * b.loss_mask.float()
            out.append(b)
        self.last = {"step_by_step/tokens_predict": n_p, "step_by_step/tokens_explain": n_e,
                     "step_by_step/weight_predict": w_p, "step_by_step/weight_explain": w_e}
        if self.task_ce is not None and self.task_ce_every and (step + 1) % self.task_ce_every == 0:
            self.last.update(self.task_ce(out))
        return out

    def log_state(self) -> dict[str, float]:
        return dict(self.last)


def task_ce_fn(model: torch.nn.Module, vocab_size: int, all_reduce_sum: Callable[[float], float]
               ) -> Callable[[list[Batch]], dict[str, float]]:
    """An extra no-grad forward: mean CE of each task over the step's batches (at the step's parameters)."""

    def measure(micro: list[Batch]) -> dict[str, float]:
        sums = {PREDICT: 0.0, EXPLAIN: 0.0}
        counts = {PREDICT: 0.0, EXPLAIN: 0.0}
        for b in micro:
            nll_b, count_b = row_nll(model, b, vocab_size=vocab_size)
            pred_b, expl_b = task_masks(b)
            for task, rows in ((PREDICT, pred_b), (EXPLAIN, expl_b)):
                sums[task] += float(nll_b[rows].sum())
                counts[task] += float(count_b[rows].sum())
        return {f"step_by_step/ce_{t}": all_reduce_sum(sums[t]) / max(all_reduce_sum(counts[t]), 1.0) for t in sums}

    return measure


# ---------------------------------------------------------------------------- the method's hooks
def build_hooks(p: Any, model: torch.nn.Module, *, mix: Any, run_dir: Path, log: Callable[[str], None] = print):
    """``method: step_by_step``: its sequences, the pair sampler and the per-task token weights."""
    from stillroom.methods.hooks import MethodHooks

    cfg, sc = p.cfg, p.cfg.step_by_step
    if sc.variant == "multi_task" and cfg.train.micro_batch_size % 2:
        raise ValueError(f"step_by_step (variant multi_task): train.micro_batch_size={cfg.train.micro_batch_size} "
                         "must be even (each record gives a predict and an explain sequence, drawn together)")
    if sc.predict_prefix == sc.explain_prefix and sc.variant == "multi_task":
        raise ValueError("step_by_step.predict_prefix and explain_prefix are equal; the tasks would be indistinguishable")
    data = build_data(cfg.data.sources, sc, p.tokenizer, seq_len=cfg.data.seq_len, add_eos=cfg.data.add_eos,
                      seed=cfg.seed, heldout_fraction=cfg.data.heldout_fraction, heldout_max=cfg.data.heldout_max,
                      on_bad_record=cfg.data.on_bad_record)
    names = [t.name for t in mix.cfg.terms]
    structural = [t.name for t, spec in zip(mix.cfg.terms, mix.specs) if spec.kind != "logit"]
    if sc.variant == "multi_task" and structural:
        raise ValueError(f"step_by_step (variant multi_task) weights tokens per task, which loss terms {structural} "
                         "cannot take; use logit terms only (e.g. loss.terms=[{name: ce}])")
    if mix.needs_teacher and cfg.teacher.source == "store":
        raise ValueError("step_by_step builds its own predict/explain sequences, which a precomputed teacher store "
                         "does not cover; use teacher.source=online (or remote), or loss.terms=[{name: ce}]")
    log(f"step_by_step: variant {sc.variant}, alpha {sc.alpha}, loss terms {names}; "
        + ", ".join(f"{k}={v}" for k, v in data.stats.items()))
    if any(n != "ce" for n in names):
        log("step_by_step: the task weights multiply every logit loss term, not only ce")
    # The run's held-out evaluation measures the test-time task, and `baseline: true` (method sft on
    # p.splits.train) becomes label-only fine-tuning on the same records with the same prefix.
    p.splits.heldout = data.heldout
    p.splits.train = data.predict_train
    if sc.variant != "multi_task":
        return MethodHooks(train_examples=data.train)
    task_ce = task_ce_fn(model, p.vocab_size, p.topology.all_reduce_sum) if sc.task_ce_every else None
    weights = TaskWeights(sc.alpha, p.topology.all_reduce_sum, task_ce, sc.task_ce_every)
    return MethodHooks(train_examples=data.train, sampler_factory=PairSampler, prepare_batches=weights,
                       log_state=weights.log_state)
