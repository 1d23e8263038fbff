"""Held-out metrics of a causal LM, optionally against a teacher, and model size (speed: :mod:`stillroom.eval.speed`).

All metrics are computed over *target tokens* only (``batch.loss_mask``). Positions
are already aligned (see :mod:`stillroom.data.batch`): the logits at ``[b, t]``
predict ``batch.target_ids[b, t]``, and the teacher's logits at ``[b, t]`` are
compared with the model's logits at ``[b, t]``. Nothing here shifts.

The forward pass may run under bf16 autocast; every metric is then computed in
fp32 from the (upcast) logits.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from stillroom.data.batch import Batch, model_inputs_for
from stillroom.eval.target_rows import TargetRows, rows_key, slice_vocab, token_sums_many
from stillroom.models.precision import autocast

PRECISIONS = ("bf16", "fp32")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-free module: run on CPU
        return torch.device("cpu")


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module, precision: str) -> Iterator[torch.device]:
    """``model.eval()``, ``torch.no_grad`` and (for bf16) autocast; restores the mode.

    Yields the model's device. Autocast uses the device type of the model's
    parameters (``"cpu"`` on CPU).
    """
    _check_precision(precision)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(precision, device):
            yield device
    finally:
        model.train(was_training)


def row_nll(model: torch.nn.Module, batch: Batch, precision: str = "fp32", *,
            vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL and counted tokens of ``batch`` under ``model`` (one no-grad forward).

    Returns ``(nll_sum_b [B] float64, count_b [B] int64)`` on the CPU, summed over the positions
    where ``batch.loss_mask`` is True (padding and prompts excluded). The log-softmax is taken in
    fp32, one ``[T, V]`` row at a time, over the first ``vocab_size`` logits (the whole head when
    ``None``). Used for MiniPLM scores, REDI's log-prob monitor and step-by-step's per-task CE.
    """
    with inference_mode(model, precision) as device:
        b = batch.to(device)
        logits_btv = model(**model_inputs_for(model, b), use_cache=False).logits
        if vocab_size is not None:
            logits_btv = logits_btv[..., :vocab_size]
        mask_bt = b.loss_mask
        sums, counts = [], []
        for row in range(logits_btv.shape[0]):
            nll_t = F.cross_entropy(logits_btv[row].float(), b.target_ids[row], ignore_index=-100, reduction="none")
            sums.append((nll_t * mask_bt[row]).sum(dtype=torch.float64))
            counts.append(mask_bt[row].sum())
    return torch.stack(sums).cpu(), torch.stack(counts).cpu()


def teacher_logits_from_model(teacher: torch.nn.Module, *, remember: bool = False) -> Callable[[Batch], torch.Tensor]:
    """A ``teacher_logits_fn`` for :func:`evaluate_lm` that runs an in-process model.

    :func:`evaluate_lm` calls the function inside its own ``no_grad``/autocast
    context, so the teacher forward runs at the same precision as the student's.
    The teacher is put in eval mode for the call and its mode restored after.

    ``remember``: keep the teacher's target rows of each batch (:class:`TargetRows` holding ``[N, H]`` hidden
    states, a few MiB per held-out set) and reuse them when the same batch comes again under the same precision
    and unchanged teacher weights: a run evaluates its frozen teacher's held-out batches beside every student,
    before and after training and every ``train.eval_every`` steps, and the teacher's body forward was most of
    each evaluation (the head and the metric math still run per student). Teachers whose logits are not a plain
    head of their last hidden state (whole ``[N, V]`` rows) are not remembered.
    """

    def fn(batch: Batch) -> torch.Tensor:
        device = _model_device(teacher)
        was_training = teacher.training
        teacher.eval()
        try:
            out = teacher(**model_inputs_for(teacher, batch, device))
        finally:
            teacher.train(was_training)
        return out.logits

    fn.teacher = teacher  # evaluate_lm takes its target rows from the hidden states (TargetRows)
    fn.remembered = {} if remember else None  # _teacher_rows' key -> TargetRows
    return fn


def _teacher_rows(teacher_logits_fn: Callable, batch: Batch, mask_bt: torch.Tensor, vocab_size: int | None,
                  device: torch.device, i: int):
    """The teacher's target rows: :class:`TargetRows` of an in-process teacher (on its own device, in eval mode;
    remembered per batch when its function was made with ``remember``), else the target rows of
    ``teacher_logits_fn(batch)``'s whole logits."""
    teacher = getattr(teacher_logits_fn, "teacher", None)
    if teacher is None:
        return slice_vocab(teacher_logits_fn(batch), vocab_size, "teacher").to(device)[mask_bt]
    t_device = _model_device(teacher)
    inputs, mask = model_inputs_for(teacher, batch, t_device), mask_bt.to(t_device)
    remembered = getattr(teacher_logits_fn, "remembered", None)
    key = rows_key(teacher, inputs, mask, vocab_size, t_device) if remembered is not None else None
    if key is not None and key in remembered:
        return remembered[key]
    was_training = teacher.training
    teacher.eval()
    try:
        rows = TargetRows(teacher, inputs, mask, vocab_size, f"batch {i}: teacher")
    finally:
        teacher.train(was_training)
    if key is not None and rows.hidden_nh is not None:
        remembered[key] = rows
    return rows


def evaluate_lm(
    model: torch.nn.Module,
    batches: list[Batch],
    teacher_logits_fn: Callable[[Batch], torch.Tensor] | None = None,
    *,
    precision: str = "bf16",
    vocab_size: int | None = None,
) -> dict:
    """Held-out metrics of ``model`` over the target tokens of ``batches``.

    Args:
        model: a causal LM returning ``.logits`` ``[B, T, V]``.
        batches: aligned batches; only positions with ``loss_mask`` count.
        teacher_logits_fn: ``batch -> [B, T, V_t]`` teacher logits for the same
            positions (called inside this function's ``no_grad``/autocast
            context; see :func:`teacher_logits_from_model`). None: no teacher metrics.
        precision: ``"bf16"`` (forward under bf16 autocast) or ``"fp32"``;
            the metric math is always fp32.
        vocab_size: keep only the first ``vocab_size`` logit columns of the model
            and of the teacher (drops padding rows of the embedding matrix).
            Required when model and teacher widths differ.

    Returns a dict (plain Python numbers):
        ``heldout_ce``: mean nats per target token; ``perplexity``: ``exp(heldout_ce)``;
        ``bits_per_byte``: total nats / ln 2 / total ``batch.n_bytes`` (None when
        no bytes are recorded); ``kl_teacher_student``: mean over target tokens of
        KL(teacher || model), dense, fp32 (None without a teacher);
        ``top1_agreement``: fraction of target tokens where the argmaxes agree
        (None without a teacher); ``tokens``: number of target tokens.

    One batch is processed at a time; only ``[N_targets, V]`` rows of it are kept.
    """
    return evaluate_lms({"model": model}, batches, teacher_logits_fn, precision=precision,
                        vocab_size=vocab_size)["model"]


def evaluate_lms(
    models: Mapping[str, torch.nn.Module],
    batches: list[Batch],
    teacher_logits_fn: Callable[[Batch], torch.Tensor] | None = None,
    *,
    precision: str = "bf16",
    vocab_size: int | None = None,
) -> dict[str, dict]:
    """:func:`evaluate_lm` of each named model on the same ``batches``, together: per chunk of target rows the
    teacher's side (its log-softmax, zero mask and argmax) is computed once and compared with every model's,
    and the teacher in the group reads its own rows (one forward). The numbers are each model's alone (test):
    three 10-layer students of SmolLM2-135M took 20 s together against 25 s one at a time, the teacher with one
    student 16 s against 19 s (40 x 128 held-out tokens, fp32, 2 cores). Every model's target rows of one batch
    are held at once: ``[N, H]`` hidden states each, or whole ``[N, V]`` logits for a model without a plain head."""
    _check_precision(precision)
    if not batches:
        raise ValueError("evaluate_lm: no batches given")
    if not models:
        raise ValueError("evaluate_lm: no models given")
    tokens = n_bytes = 0
    sums = {name: [0.0, 0.0, 0] for name in models}  # CE nats, KL nats, top-1 matches
    teacher = getattr(teacher_logits_fn, "teacher", None) if teacher_logits_fn is not None else None
    with contextlib.ExitStack() as stack:
        devices = {name: stack.enter_context(inference_mode(m, precision)) for name, m in models.items()}
        for i, batch in enumerate(batches):
            n = int(batch.loss_mask.sum())
            n_bytes += int(batch.n_bytes.sum())
            if n == 0:
                continue
            rows, targets, teacher_nv = {}, {}, None
            for name, model in models.items():
                b = batch.to(devices[name])
                if model is teacher:  # the teacher against itself: its own rows, one forward
                    rows[name] = teacher_nv = _teacher_rows(teacher_logits_fn, b, b.loss_mask, vocab_size,
                                                            devices[name], i)
                else:
                    rows[name] = TargetRows(model, model_inputs_for(model, b), b.loss_mask, vocab_size,
                                            f"batch {i}: model")
                targets[name] = _checked_targets(b.target_ids[b.loss_mask], rows[name].width, i)
            if teacher_logits_fn is not None and teacher_nv is None:
                name = next(iter(models))
                b = batch.to(devices[name])
                teacher_nv = _teacher_rows(teacher_logits_fn, b, b.loss_mask, vocab_size, devices[name], i)
            for name, (c, k, a) in zip(rows, token_sums_many(list(rows.values()), list(targets.values()),
                                                             teacher_nv)):
                sums[name][0] += c
                sums[name][1] += k
                sums[name][2] += a
            tokens += n
    if tokens == 0:
        raise ValueError("evaluate_lm: the batches contain no target tokens (every target_id is -100)")
    has_teacher = teacher_logits_fn is not None
    out = {}
    for name, (ce_sum, kl_sum, agree) in sums.items():
        ce = ce_sum / tokens
        out[name] = {
            "heldout_ce": ce,
            "perplexity": math.exp(ce) if ce < 700 else math.inf,
            "bits_per_byte": (ce_sum / math.log(2) / n_bytes) if n_bytes > 0 else None,
            "kl_teacher_student": (max(kl_sum, 0.0) / tokens) if has_teacher else None,
            "top1_agreement": (agree / tokens) if has_teacher else None,
            "tokens": tokens,
        }
    return out


def _checked_targets(targets_n: torch.Tensor, width: int, i: int) -> torch.Tensor:
    """``targets_n`` ``[N]``, refused where an id falls outside the ``width`` logit columns."""
    if int(targets_n.max()) >= width or int(targets_n.min()) < 0:
        raise ValueError(
            f"batch {i}: target ids range [{int(targets_n.min())}, {int(targets_n.max())}] "
            f"outside the {width} logit columns (tokenizer/model vocab mismatch or wrong vocab_size)"
        )
    return targets_n


def _is_lora_param(name: str) -> bool:
    # peft adapter tensors (LoRA A/B, embedding variants, DoRA magnitudes) and the
    # frozen original copy kept beside `modules_to_save`: absent after merging.
    return ".lora_" in name or name.startswith("lora_") or ".original_module." in name


def count_params(model: torch.nn.Module) -> int:
    """All parameters (shared/tied tensors counted once).

    For a peft model, the parameter count of the merged architecture (what
    ``merge_and_unload()`` would produce): adapter tensors are left out.
    """
    is_peft = hasattr(model, "peft_config")
    return sum(
        p.numel() for name, p in model.named_parameters() if not (is_peft and _is_lora_param(name))
    )


def trainable_params(model: torch.nn.Module) -> int:
    """Parameters with ``requires_grad`` (for peft: the adapters and modules_to_save)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
