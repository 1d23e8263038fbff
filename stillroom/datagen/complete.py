"""Generate teacher samples for a list of prompts into a resumable :class:`GenerationStore`.

Two layers:

- :func:`generate_with` drives any ``complete_fn(prompts: list[str], n: int) ->
  list[list[str]]`` (n samples per prompt): renders prompts from a template,
  skips samples already in the store, calls ``complete_fn`` batch by batch and
  appends each batch durably as soon as it arrives. A remote (HTTP) teacher
  plugs in here with its own ``complete_fn``.
- :func:`hf_complete_fn` builds a ``complete_fn`` from a local Hugging Face
  causal LM (chat template if the tokenizer has one, left padding, KV cache,
  seeded sampling); :func:`generate_with_teacher` is the two combined.

Malformed outputs (non-string, empty, wrong sample count, or rejected by the
optional ``check``) are stored with an ``error`` field and counted; they never
stop the job. Exceptions raised by ``complete_fn`` stop the job by default
(``on_error="raise"``; a rerun resumes after the last stored batch); with
``on_error="record"`` the batch is retried prompt by prompt and the prompts
that still fail are stored as error records.

Reproducibility: with the local helper, each call is seeded from ``seed`` and
the batch's prompts, so the same batch gives the same texts in any run. A
resumed run can group prompts into different batches than an uninterrupted
one would, so sampled texts after a resume may differ from an uninterrupted
run (greedy decoding is unaffected up to padding numerics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Literal

import torch

from stillroom.datagen.store import GenerationStore, make_key

log = logging.getLogger(__name__)

CompleteFn = Callable[[list[str], int], list[list[str]]]
CheckFn = Callable[[str, dict], "str | None"]


class TeacherDownError(RuntimeError):
    """Too many teacher calls failed in a row; the store keeps what finished, a rerun resumes."""


def render_prompts(items: Sequence[dict], template: str, *, id_field: str = "id") -> list[tuple[str, str]]:
    """``[(prompt_id, template.format(**item)), ...]``; fails before any generation on bad items.

    Errors name the item (by index and id) and the missing template field.
    """
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TypeError(f"item {i} must be a dict, got {type(item).__name__}")
        if id_field not in item:
            raise KeyError(f"item {i} has no {id_field!r} field (needed to resume); keys: {sorted(item)}")
        pid = str(item[id_field])
        if pid in seen:
            raise ValueError(f"item {i}: duplicate {id_field} {pid!r}; prompt ids must be unique")
        seen.add(pid)
        try:
            text = template.format(**item)
        except KeyError as e:
            raise KeyError(
                f"template field {e.args[0]!r} is missing from item {i} (id={pid!r}); item keys: {sorted(item)}"
            ) from None
        except (IndexError, ValueError) as e:
            raise ValueError(f"template cannot be rendered for item {i} (id={pid!r}): {e}") from None
        out.append((pid, text))
    return out


def default_check(text: str, item: dict) -> str | None:
    """Reject empty or whitespace-only outputs."""
    return "empty output" if not text.strip() else None


def generate_with(
    complete_fn: CompleteFn,
    items: Sequence[dict],
    *,
    template: str,
    n_samples: int,
    batch_size: int,
    store: GenerationStore,
    teacher_id: str,
    settings: dict,
    check: CheckFn | None = default_check,
    on_error: Literal["raise", "record"] = "raise",
    id_field: str = "id",
    allow_mixed_settings: bool = False,
    max_failed_calls_in_a_row: int | None = None,
) -> dict:
    """Generate ``n_samples`` per item with ``complete_fn`` into ``store``; returns stats.

    ``settings`` (JSON-serialisable) is stored with every record. If the store
    already holds records from another teacher or other settings, this raises
    unless ``allow_mixed_settings``. ``check(text, item)`` returns an error
    message for a malformed output (stored with ``error``) or None.

    ``max_failed_calls_in_a_row`` (with ``on_error="record"``): raise
    :class:`TeacherDownError` once that many ``complete_fn`` calls in a row
    have raised (a dead teacher, not one bad prompt); the batch in progress is
    not stored, so a rerun asks for it again. None: never.

    Stats: ``prompts``, ``samples_expected``, ``samples_skipped`` (already
    stored), ``samples_written``, ``errors`` (error records written now),
    ``duplicates_skipped``, ``batches``, ``seconds``, ``store`` (store totals).
    """
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1 (got {n_samples}, {batch_size})")
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    rendered = render_prompts(items, template, id_field=id_field)
    by_id = {str(item[id_field]): item for item in items}
    _check_settings(store, teacher_id, settings, allow_mixed_settings)

    done = store.done_keys()
    pending: list[tuple[str, str, list[int]]] = []  # (prompt_id, prompt, missing sample indices)
    skipped = 0
    for pid, prompt in rendered:
        missing = [s for s in range(n_samples) if make_key(pid, s) not in done]
        skipped += n_samples - len(missing)
        if missing:
            pending.append((pid, prompt, missing))

    stats = {"prompts": len(rendered), "samples_expected": len(rendered) * n_samples, "samples_skipped": skipped,
             "samples_written": 0, "errors": 0, "duplicates_skipped": 0, "batches": 0}
    dup_before = store.duplicates_skipped
    t0 = time.perf_counter()

    def record(pid: str, s: int, text: object, error: str | None) -> dict:
        rec = {"key": make_key(pid, s), "prompt_id": pid, "sample_index": s, "teacher": teacher_id,
               "settings": settings, "text": text if isinstance(text, str) else None}
        if error is not None:
            rec["error"] = error
        return rec

    def outputs_to_records(chunk, outputs) -> list[dict]:
        recs = []
        if not isinstance(outputs, list) or len(outputs) != len(chunk):
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            for pid, _, missing in chunk:
                for s in missing:
                    recs.append(record(pid, s, None, f"teacher returned {got} prompt results for {len(chunk)} prompts"))
            return recs
        for (pid, _, missing), samples in zip(chunk, outputs):
            if isinstance(samples, tuple):
                samples = list(samples)
            elif not isinstance(samples, list):
                samples = []
            for j, s in enumerate(missing):
                if j >= len(samples):
                    recs.append(record(pid, s, None, f"teacher returned {len(samples)} samples, expected {n_samples}"))
                    continue
                text = samples[j]
                if not isinstance(text, str):
                    recs.append(record(pid, s, None, f"teacher output is {type(text).__name__}, not str"))
                    continue
                problem = check(text, by_id[pid]) if check is not None else None
                recs.append(record(pid, s, text, problem))
        return recs

    failed_in_a_row = 0

    def failed(e: Exception) -> None:
        nonlocal failed_in_a_row
        failed_in_a_row += 1
        if max_failed_calls_in_a_row is not None and failed_in_a_row >= max_failed_calls_in_a_row:
            raise TeacherDownError(
                f"the teacher failed {failed_in_a_row} calls in a row (last: {type(e).__name__}: {e}); stopping. "
                f"{store.path} keeps every finished batch; fix the teacher and rerun to resume"
            ) from e

    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        prompts = [p for _, p, _ in chunk]
        try:
            recs = outputs_to_records(chunk, complete_fn(prompts, n_samples))
            failed_in_a_row = 0
        except Exception as e:
            if on_error == "raise":
                raise
            failed(e)
            log.warning("teacher call failed for a batch of %d prompts (%s); retrying one by one", len(chunk), e)
            recs = []
            for one in chunk:
                try:
                    recs += outputs_to_records([one], complete_fn([one[1]], n_samples))
                    failed_in_a_row = 0
                except Exception as e1:
                    failed(e1)
                    recs += [record(one[0], s, None, f"teacher call failed: {type(e1).__name__}: {e1}")
                             for s in one[2]]
        written = store.append(recs)
        stats["samples_written"] += written
        stats["errors"] += sum(1 for r in recs if "error" in r)
        stats["batches"] += 1
    stats["duplicates_skipped"] = store.duplicates_skipped - dup_before
    stats["seconds"] = time.perf_counter() - t0
    stats["store"] = store.stats()
    if stats["errors"]:
        log.warning("%d of %d generated samples were malformed and stored with an error field",
                    stats["errors"], stats["samples_written"])
    return stats


def _check_settings(store: GenerationStore, teacher_id: str, settings: dict, allow_mixed: bool) -> None:
    try:
        json.dumps(settings)
    except TypeError as e:
        raise TypeError(f"settings must be JSON-serialisable: {e}") from None
    if allow_mixed:
        return
    here = json.dumps([teacher_id, settings], sort_keys=True)
    for other in store.teacher_settings():
        if json.dumps([other["teacher"], other["settings"]], sort_keys=True) != here:
            raise ValueError(
                f"generation store {store.path} already holds samples from teacher {other['teacher']!r} with "
                f"settings {other['settings']}; this run uses teacher {teacher_id!r} with {settings}. "
                "Use another store path, or pass allow_mixed_settings=True to mix them deliberately"
            )


# ---------------------------------------------------------------------- local HF teacher

@contextmanager
def _padding_left(tokenizer):
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def hf_complete_fn(
    model,
    tokenizer,
    *,
    sampling_temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    use_chat_template: bool | None = None,
) -> CompleteFn:
    """A ``complete_fn`` backed by ``model.generate`` on a local HF causal LM.

    Prompts are wrapped in the tokenizer's chat template as one user turn (with
    the generation prompt) when it has one (``use_chat_template=None``), then
    left-padded into one batch. ``sampling_temperature == 0`` means greedy (then
    only n=1 is allowed). Each call seeds torch from ``seed`` and the prompts,
    inside ``torch.random.fork_rng`` so the caller's RNG state is untouched.
    Returned texts are the new tokens only, decoded without special tokens.
    """
    if sampling_temperature < 0:
        raise ValueError(f"sampling_temperature must be >= 0, got {sampling_temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    chat = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
    device = next(model.parameters()).device

    def render(prompt: str) -> str:
        if not chat:
            return prompt
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def complete(prompts: list[str], n: int) -> list[list[str]]:
        if sampling_temperature == 0 and n > 1:
            raise ValueError("greedy decoding (sampling_temperature=0) gives identical samples; use n_samples=1")
        texts = [render(p) for p in prompts]
        with _padding_left(tokenizer):
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
            pad_id = tokenizer.pad_token_id
        input_ids_bt = enc["input_ids"].to(device)
        attention_mask_bt = enc["attention_mask"].to(device)
        digest = hashlib.sha256(repr((seed, n, prompts)).encode("utf-8")).digest()
        call_seed = int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
        sampling = sampling_temperature > 0
        kwargs = dict(do_sample=True, temperature=sampling_temperature, top_p=top_p, top_k=0) if sampling \
            else dict(do_sample=False)
        devices = [device] if device.type == "cuda" else []
        was_training = model.training
        model.eval()  # no dropout while sampling; restored below
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(call_seed)
            try:
                out_bt = model.generate(
                    input_ids=input_ids_bt,
                    attention_mask=attention_mask_bt,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=n,
                    use_cache=True,
                    pad_token_id=pad_id,
                    **kwargs,
                )
            finally:
                model.train(was_training)
        new_bt = out_bt[:, input_ids_bt.shape[1]:]  # [B*n, T_new], rows grouped per prompt
        decoded = tokenizer.batch_decode(new_bt, skip_special_tokens=True)
        return [decoded[i * n:(i + 1) * n] for i in range(len(prompts))]

    return complete


def generate_with_teacher(
    model,
    tokenizer,
    items: Sequence[dict],
    *,
    template: str,
    n_samples: int,
    sampling_temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    store: GenerationStore,
    teacher_id: str,
    seed: int,
    check: CheckFn | None = default_check,
    on_error: Literal["raise", "record"] = "raise",
) -> dict:
    """Sample ``n_samples`` completions per item from a local HF teacher into ``store``.

    ``template.format(**item)`` renders each prompt (chat-templated when the
    tokenizer has a chat template). Samples already in the store are skipped;
    each batch is appended durably as soon as it is generated. Returns the
    stats of :func:`generate_with`.
    """
    if sampling_temperature == 0 and n_samples > 1:
        raise ValueError("greedy decoding (sampling_temperature=0) gives identical samples; use n_samples=1")
    complete = hf_complete_fn(model, tokenizer, sampling_temperature=sampling_temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens, seed=seed)
    settings = {"sampling_temperature": sampling_temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "seed": seed, "template": template}
    return generate_with(complete, items, template=template, n_samples=n_samples, batch_size=batch_size,
                         store=store, teacher_id=teacher_id, settings=settings, check=check, on_error=on_error)
