"""Held-out metrics of a causal LM, optionally against a teacher; size and speed.

All metrics are computed over *target tokens* only (``batch.loss_mask``). Positions
are already aligned (see :mod:`stillroom.data.batch`): the logits at ``[b, t]``
predict ``batch.target_ids[b, t]``, and the teacher's logits at ``[b, t]`` are
compared with the model's logits at ``[b, t]``. Nothing here shifts.

The forward pass may run under bf16 autocast; every metric is then computed in
fp32 from the (upcast) logits.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stillroom.data.batch import Batch, model_inputs_for
from stillroom.eval.target_rows import TargetRows, slice_vocab, token_sums
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


def teacher_logits_from_model(teacher: torch.nn.Module) -> Callable[[Batch], torch.Tensor]:
    """A ``teacher_logits_fn`` for :func:`evaluate_lm` that runs an in-process model.

    :func:`evaluate_lm` calls the function inside its own ``no_grad``/autocast
    context, so the teacher forward runs at the same precision as the student's.
    The teacher is put in eval mode for the call and its mode restored after.
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
    return fn


def _teacher_rows(teacher_logits_fn: Callable, batch: Batch, mask_bt: torch.Tensor, vocab_size: int | None,
                  device: torch.device, i: int):
    """The teacher's target rows: :class:`TargetRows` of an in-process teacher (on its own device, in eval mode),
    else the target rows of ``teacher_logits_fn(batch)``'s whole logits."""
    teacher = getattr(teacher_logits_fn, "teacher", None)
    if teacher is None:
        return slice_vocab(teacher_logits_fn(batch), vocab_size, "teacher").to(device)[mask_bt]
    t_device = _model_device(teacher)
    was_training = teacher.training
    teacher.eval()
    try:
        return TargetRows(teacher, model_inputs_for(teacher, batch, t_device), mask_bt.to(t_device), vocab_size,
                          f"batch {i}: teacher")
    finally:
        teacher.train(was_training)


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
    _check_precision(precision)
    if not batches:
        raise ValueError("evaluate_lm: no batches given")
    tokens = 0
    n_bytes = 0
    ce_sum = kl_sum = 0.0
    agree = 0
    with inference_mode(model, precision) as device:
        for i, batch in enumerate(batches):
            mask_bt = batch.loss_mask
            n = int(mask_bt.sum())
            n_bytes += int(batch.n_bytes.sum())
            if n == 0:
                continue
            b = batch.to(device)
            mask_bt = b.loss_mask
            rows = TargetRows(model, model_inputs_for(model, b), mask_bt, vocab_size, f"batch {i}: model")
            targets_n = b.target_ids[mask_bt]
            v = rows.width
            if int(targets_n.max()) >= v or int(targets_n.min()) < 0:
                raise ValueError(
                    f"batch {i}: target ids range [{int(targets_n.min())}, {int(targets_n.max())}] "
                    f"outside the {v} logit columns (tokenizer/model vocab mismatch or wrong vocab_size)"
                )
            teacher_nv = None
            if teacher_logits_fn is not None:
                teacher_nv = _teacher_rows(teacher_logits_fn, b, mask_bt, vocab_size, device, i)
            c, k, a = token_sums(rows, targets_n, teacher_nv)
            ce_sum += c
            kl_sum += k
            agree += a
            tokens += n
    if tokens == 0:
        raise ValueError("evaluate_lm: the batches contain no target tokens (every target_id is -100)")
    ce = ce_sum / tokens
    has_teacher = teacher_logits_fn is not None
    return {
        "heldout_ce": ce,
        "perplexity": math.exp(ce) if ce < 700 else math.inf,
        "bits_per_byte": (ce_sum / math.log(2) / n_bytes) if n_bytes > 0 else None,
        "kl_teacher_student": (max(kl_sum, 0.0) / tokens) if has_teacher else None,
        "top1_agreement": (agree / tokens) if has_teacher else None,
        "tokens": tokens,
    }


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


SPEED_WARMUP = 2
"""Untimed forward passes of every model before the first timed one (one-time costs: allocator, kernels, caches)."""
SPEED_ROUNDS = 5
"""Interleaved timing rounds; a model's speed is its best round."""
SPEED_MIN_ROUND_S = 0.02
"""Shortest timing of one model in one round, in seconds (language models; the classifier domain asks 0.05)."""


@dataclass
class Timed:
    """One model's forward pass for :func:`interleaved_rates`: ``step()`` runs it and returns once the device has
    finished; one pass processes ``items`` (tokens, images); ``passes`` run back to back in each round."""

    step: Callable[[], object]
    items: int
    passes: int = 1


def interleaved_rates(timed: Mapping[str, Timed], *, rounds: int = SPEED_ROUNDS, warmup: int = SPEED_WARMUP,
                      min_round_s: float = 0.0) -> dict[str, float]:
    """Items per second of each named model, timed interleaved: its best of ``rounds`` rounds.

    Every model first runs ``warmup`` untimed passes, all before any timing starts (a cold first model
    must not be timed cold). Then each round times every model in turn, ``A B C A B C ...``, so a slow
    spell of the machine falls on all of them and not on whichever was timed first: per model and round
    at least ``passes`` passes back to back, and more until the round has lasted ``min_round_s`` seconds
    (a timing of a few milliseconds is mostly scheduler noise). Other work on the machine only ever
    slows a round down, so each model's fastest round is its least disturbed one (``timeit``'s rule): on
    a shared CPU the best-of-5 ratio of two tiny models varied 1.2x between runs where the median's
    varied 2x.
    """
    if rounds < 1 or warmup < 1:
        raise ValueError(f"interleaved_rates: rounds and warmup must be >= 1 (got {rounds}, {warmup})")
    for t in timed.values():
        for _ in range(warmup):
            t.step()
    rates: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(rounds):
        for name, t in timed.items():
            n, t0 = 0, time.perf_counter()
            while n < t.passes or time.perf_counter() - t0 < min_round_s:
                t.step()
                n += 1
            rates[name].append(n * t.items / max(time.perf_counter() - t0, 1e-9))
    return {name: max(r) for name, r in rates.items()}


def interleaved_tokens_per_s(models: Mapping[str, torch.nn.Module], seq_len: int, batch_size: int,
                             total_tokens: int, precision: str = "bf16", *, rounds: int = SPEED_ROUNDS,
                             warmup: int = SPEED_WARMUP, seed: int = 0,
                             min_round_s: float = SPEED_MIN_ROUND_S,
                             inputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Forward-pass throughput (tokens/s; no grad, eval mode, modes restored) of each named model, timed
    together by :func:`interleaved_rates`, so that ratios between them compare one measurement.

    Random ids ``[batch_size, seq_len]`` (a private generator: the global RNG is untouched; the same ids
    for models of the same vocabulary); per round at least ``ceil(total_tokens / (batch_size * seq_len))``
    passes and ``min_round_s`` seconds. ``inputs``: one real batch's forward arguments instead (a
    vision-language model's held-out questions: ids with their image tokens, mask and ``pixel_values``, since
    random ids would time the decoder without the image it reads); tokens per pass are its mask's sum.
    """
    if seq_len < 1 or batch_size < 1 or total_tokens < 1:
        raise ValueError(f"forward_tokens_per_s: seq_len, batch_size, total_tokens must be >= 1 "
                         f"(got {seq_len}, {batch_size}, {total_tokens})")
    timed = {}
    with contextlib.ExitStack() as stack:
        for name, model in models.items():
            device = stack.enter_context(inference_mode(model, precision))
            batch = dict(inputs) if inputs is not None else _random_ids(name, model, batch_size, seq_len, seed)
            batch = {k: v.to(device) for k, v in batch.items()}
            tokens = int(batch["attention_mask"].sum())
            if tokens < 1:
                raise ValueError(f"forward_tokens_per_s: {name}: the timing batch has no tokens")
            timed[name] = Timed(functools.partial(_forward_synced, model, batch, device), items=tokens,
                                passes=math.ceil(total_tokens / tokens))
        return interleaved_rates(timed, rounds=rounds, warmup=warmup, min_round_s=min_round_s)


def _random_ids(name: str, model: torch.nn.Module, batch_size: int, seq_len: int, seed: int) -> dict:
    """Random ids ``[batch_size, seq_len]`` in ``model``'s vocabulary (a private generator) and a full mask."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):  # a VLM: its decoder's settings
        config = config.get_text_config()
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise ValueError(f"forward_tokens_per_s: {name}: model.config.vocab_size is needed to draw random ids")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"forward_tokens_per_s: {name}: seq_len={seq_len} exceeds "
                         f"max_position_embeddings={max_pos}")
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _forward_synced(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device) -> None:
    model(**inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_line(rates: dict[str, float], unit: str, teacher_again: bool) -> str:
    """The log line of :func:`interleaved_rates`' default measurement: ``speed (forward tokens/s; ...): teacher
    1,234, student_after 5,678 (4.60x the teacher)``; ``teacher_again``: the teacher was timed again here."""
    teacher = rates.get("teacher")
    parts = []
    for name, rate in rates.items():
        note = " (again, beside the students)" if name == "teacher" and teacher_again else ""
        if name != "teacher" and teacher:
            note = f" ({rate / teacher:.2f}x the teacher)"
        parts.append(f"{name} {rate:,.0f}{note}")
    return (f"speed (forward {unit}/s; {SPEED_WARMUP} warm-up passes each, then timed interleaved, best of "
            f"{SPEED_ROUNDS} rounds): " + ", ".join(parts))


def forward_tokens_per_s(
    model: torch.nn.Module,
    seq_len: int,
    batch_size: int,
    total_tokens: int,
    precision: str = "bf16",
    *,
    repeats: int = SPEED_ROUNDS,
    seed: int = 0,
) -> float:
    """One model's :func:`interleaved_tokens_per_s` (``repeats`` rounds after the warm-up); to compare
    models, time them together with :func:`interleaved_tokens_per_s` instead."""
    if repeats < 1:
        raise ValueError(f"forward_tokens_per_s: repeats must be >= 1 (got {repeats})")
    return interleaved_tokens_per_s({"model": model}, seq_len, batch_size, total_tokens, precision,
                                    rounds=repeats, seed=seed)["model"]
