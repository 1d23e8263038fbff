"""Forward speed of the models of a report, timed together so that their ratios compare one measurement.

Speed is a forward pass's throughput (tokens or images per second, eval mode, no grad). Models of one report are
timed interleaved (:func:`interleaved_rates`), and a model with the same architecture as one timed before it in
the same group (:func:`same_architecture`: a CE baseline beside its KD student) takes that model's rate instead of
a timing of its own: its forward is the same computation on other numbers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from stillroom.eval.metrics import inference_mode

SPEED_WARMUP = 2
"""Untimed forward passes of every model before the first timed one (one-time costs: allocator, kernels, caches)."""
SPEED_ROUNDS = 5
"""Interleaved timing rounds; a model's speed is its best round."""
SPEED_KEYS = ("tokens_per_s", "images_per_s")
"""The report rows' speed metrics: a forward pass's items per second (language models, image classifiers)."""
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
    random ids would time the decoder without the image it reads); tokens per pass are its mask's sum. A model
    of the same architecture as one before it (:func:`same_architecture`) is not timed again: it gets that rate.
    """
    if seq_len < 1 or batch_size < 1 or total_tokens < 1:
        raise ValueError(f"forward_tokens_per_s: seq_len, batch_size, total_tokens must be >= 1 "
                         f"(got {seq_len}, {batch_size}, {total_tokens})")
    same = same_architecture(models)
    timed = {}
    with contextlib.ExitStack() as stack:
        for name, model in models.items():
            if same[name] != name:
                continue
            device = stack.enter_context(inference_mode(model, precision))
            batch = dict(inputs) if inputs is not None else _random_ids(name, model, batch_size, seq_len, seed)
            batch = {k: v.to(device) for k, v in batch.items()}
            tokens = int(batch["attention_mask"].sum())
            if tokens < 1:
                raise ValueError(f"forward_tokens_per_s: {name}: the timing batch has no tokens")
            timed[name] = Timed(functools.partial(_forward_synced, model, batch, device), items=tokens,
                                passes=math.ceil(total_tokens / tokens))
        rates = interleaved_rates(timed, rounds=rounds, warmup=warmup, min_round_s=min_round_s)
    return {name: rates[same[name]] for name in models}


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


def speed_line(rates: dict[str, float], unit: str, teacher_again: bool, same: Mapping[str, str] | None = None) -> str:
    """The log line of :func:`interleaved_rates`' default measurement: ``speed (forward tokens/s; ...): teacher
    1,234, student_after 5,678 (4.60x the teacher)``; ``teacher_again``: the teacher was timed again here;
    ``same``: :func:`same_architecture` of the models, naming the rates taken from another model's timing."""
    teacher = rates.get("teacher")
    parts = []
    for name, rate in rates.items():
        note = " (again, beside the students)" if name == "teacher" and teacher_again else ""
        if name != "teacher" and teacher:
            note = f" ({rate / teacher:.2f}x the teacher)"
        if same is not None and same.get(name, name) != name:
            note += f" (the architecture of {same[name]}: its timing)"
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


def same_architecture(models: Mapping[str, torch.nn.Module]) -> dict[str, str]:
    """``name -> name`` of the first model in ``models`` with the same architecture (itself if none before it).

    Same architecture: the same class and config (its path aside), the same module types in the same order, and
    parameters and buffers of the same names, shapes, strides, dtypes and devices. Their forward passes do the
    same operations on tensors of the same shapes, so one timing serves them all (measured: KD student and CE
    baselines of the quickstart within 1% of each other, 2026-12-07).
    """
    first: dict[tuple, str] = {}
    return {name: first.setdefault(architecture_key(model), name) for name, model in models.items()}


def architecture_key(model: torch.nn.Module) -> tuple:
    """What a forward pass's cost depends on, apart from the numbers in the weights (:func:`same_architecture`)."""
    config = getattr(model, "config", None)
    settings = config.to_dict() if hasattr(config, "to_dict") else {}
    settings = {k: v for k, v in settings.items() if k != "_name_or_path"}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return (type(model).__qualname__, json.dumps(settings, sort_keys=True, default=str),
            tuple(type(m).__qualname__ for m in model.modules()),
            tuple((n, tuple(t.shape), t.stride(), str(t.dtype), str(t.device)) for n, t in tensors))
