"""Distillation data for a speculative-decoding draft: the target's own completions of instruction prompts.

The Llama-2-Chat-Drafter pipeline (Goel et al. 2024) and DistillSpec (Zhou et al. 2024)
train the draft on what the *target* says, not on the reference answers. This module
produces that data:

1. prompts: chat messages up to the last user turn of each instruction record
   (``bundled:instructions`` or a JSONL/JSON/parquet file), rendered with the target's
   chat template plus the generation prompt;
2. completions: the target samples one (or ``n_samples``) continuation(s) per prompt
   with the KV cache, in left-padded batches, seeded per batch
   (:func:`sampled_complete_fn`), stored durably in a resumable
   :class:`~stillroom.datagen.store.GenerationStore`
   (:func:`stillroom.datagen.complete.generate_with`): a killed job resumes
   where it stopped;
3. export: ``{"id", "prompt", "completion"}`` JSONL (error records left out). The
   prompt is the rendered chat text, so training with ``format: prompt_completion``
   sees exactly the tokens spec-eval feeds the target; the data pipeline appends EOS
   (for chat models, their end-of-turn token) after the completion.

:func:`make_draft_data` runs the three steps as a
:class:`~stillroom.config.commands.DraftDataConfig` says; on the command line (before
training a draft recipe such as ``draft_forward_kl``)::

    stillroom draft-data --target builtin:smollm2-135m-instruct \\
        --prompts 200 --max-new-tokens 128 --out runs/draft/target_data.jsonl
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stillroom.data.prompts import PromptRecord, prompt_of
from stillroom.datagen.complete import CompleteFn, generate_with
from stillroom.datagen.store import GenerationStore
from stillroom.generate.sampling import eos_token_ids, sample_continuations

if TYPE_CHECKING:
    from stillroom.config.commands import DraftDataConfig

say: Callable[[str], None] = functools.partial(print, flush=True)


def chat_prompts(records: Sequence[dict], tokenizer: Any, *, where: str = "records") -> list[dict]:
    """``[{"id", "prompt"}]``: each record's messages up to its last user turn, rendered with the chat template.

    Records need a ``messages`` list; ``id`` is the record's ``id`` field or its index.
    """
    prompts = [
        PromptRecord(str(rec.get("id", i)) if isinstance(rec, dict) else str(i),
                     prompt_of(rec, f"{where}[{i}]", kinds=("messages",)), f"{where}[{i}]")
        for i, rec in enumerate(records)
    ]
    return render_chat_prompts(prompts, tokenizer)


def render_chat_prompts(prompts: Sequence[PromptRecord], tokenizer: Any) -> list[dict]:
    """``[{"id", "prompt"}]``: chat prompts (messages ending in a user turn) rendered with the tokenizer's chat
    template plus the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat_template; draft data from chat prompts needs one")
    items = []
    for p in prompts:
        if not isinstance(p.prompt, list):
            raise ValueError(f"{p.where}: draft data needs chat `messages`, not a plain-text prompt")
        text = tokenizer.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True)
        items.append({"id": p.id, "prompt": text})
    return items


def sampled_complete_fn(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    max_new_tokens: int,
    sampling_temperature: float,
    top_p: float,
    seed: int,
    greedy: bool = False,
) -> CompleteFn:
    """A ``complete_fn(prompts, n)`` for already-rendered prompt texts, sampling with the KV cache.

    Each call draws from a local generator seeded by ``(seed, n, prompts)``, so the
    same batch gives the same texts in any run. Continuations stop at the tokenizer's
    or the model's EOS; texts are decoded without special tokens.
    """
    eos = eos_token_ids(tokenizer, model)

    def complete(prompts: list[str], n: int) -> list[list[str]]:
        if greedy and n > 1:
            raise ValueError("greedy decoding gives identical samples; use n_samples=1")
        ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        rows = [x for x in ids for _ in range(n)]  # n copies of each prompt, grouped per prompt
        digest = hashlib.sha256(repr((seed, n, prompts)).encode("utf-8")).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
        new = sample_continuations(model, tokenizer, rows, max_new_tokens=max_new_tokens,
                                   sampling_temperature=sampling_temperature, top_p=top_p, greedy=greedy,
                                   eos_token_id=eos, generator=gen)
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    return complete


def export_prompt_completion(store: GenerationStore, items: Sequence[dict], out: Path) -> int:
    """Write ``{"id", "prompt", "completion"}`` lines for every stored sample without an error; returns the count.

    Written through a temporary file and renamed, so ``out`` is never half-written.
    """
    prompt_of = {it["id"]: it["prompt"] for it in items}
    lines = []
    for rec in store.read():
        if "error" in rec or rec["prompt_id"] not in prompt_of:
            continue
        lines.append(json.dumps({"id": rec["key"], "prompt": prompt_of[rec["prompt_id"]], "completion": rec["text"]}))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, out)
    return len(lines)


def generate_draft_data(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[dict],
    *,
    out: Path,
    teacher_id: str,
    max_new_tokens: int = 128,
    sampling_temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    n_samples: int = 1,
    batch_size: int = 16,
    seed: int = 0,
) -> dict:
    """Target completions of ``records``' chat prompts -> prompt/completion JSONL at ``out``.

    The resumable store lives next to ``out`` (``<out>.store.jsonl``); rerunning after
    a crash generates only the missing samples. Returns :func:`generate_with`'s stats
    plus ``exported`` (lines written).
    """
    return generate_from_items(
        model, tokenizer, chat_prompts(records, tokenizer), out=out, teacher_id=teacher_id,
        max_new_tokens=max_new_tokens, sampling_temperature=sampling_temperature, top_p=top_p, greedy=greedy,
        n_samples=n_samples, batch_size=batch_size, seed=seed,
    )


def generate_from_items(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[dict],
    *,
    out: Path,
    teacher_id: str,
    max_new_tokens: int,
    sampling_temperature: float,
    top_p: float,
    greedy: bool,
    n_samples: int,
    batch_size: int,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> dict:
    """:func:`generate_draft_data` for already-rendered ``[{"id", "prompt"}]`` items; ``log``, when given,
    receives a line after every generated batch."""
    out = Path(out)
    complete = sampled_complete_fn(model, tokenizer, max_new_tokens=max_new_tokens,
                                   sampling_temperature=sampling_temperature, top_p=top_p, seed=seed, greedy=greedy)
    if log is not None:
        complete = _reporting(complete, log)
    settings = {"max_new_tokens": max_new_tokens, "sampling_temperature": sampling_temperature, "top_p": top_p,
                "greedy": greedy, "seed": seed}
    out.parent.mkdir(parents=True, exist_ok=True)
    with GenerationStore(out.with_name(out.name + ".store.jsonl")) as store:
        stats = generate_with(complete, items, template="{prompt}", n_samples=n_samples, batch_size=batch_size,
                              store=store, teacher_id=teacher_id, settings=settings)
        stats["exported"] = export_prompt_completion(store, items, out)
    return stats


def _reporting(complete: CompleteFn, log: Callable[[str], None]) -> CompleteFn:
    """``complete`` that logs the prompts done so far and the elapsed time after each call."""
    start, done = time.perf_counter(), 0

    def reported(prompts: list[str], n: int) -> list[list[str]]:
        nonlocal done
        texts = complete(prompts, n)
        done += len(prompts)
        log(f"  {done} prompt(s) generated this run, {time.perf_counter() - start:.0f} s")
        return texts

    return reported


def make_draft_data(cfg: DraftDataConfig, *, log: Callable[[str], None] = say) -> dict:
    """``stillroom draft-data``: load ``cfg.target``, read ``cfg.prompts`` chat records of ``cfg.data``, write the
    target's completions to ``cfg.out`` (resumable); returns :func:`generate_draft_data`'s stats."""
    from stillroom.data.prompts import read_prompts
    from stillroom.models.load import load_model, model_source
    from stillroom.models.precision import torch_dtype

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    log(f"loading the target {cfg.target} ...")
    loaded = load_model(model_source(cfg.target), dtype=torch_dtype(cfg.dtype))
    log(f"  {loaded.identity}, {time.perf_counter() - t0:.1f} s")
    counts: dict = {}
    prompts = read_prompts(cfg.data, cfg.prompts, seed=cfg.data_seed, kinds=("messages",),
                           on_bad_record=cfg.on_bad_record, counts=counts)
    items = render_chat_prompts(prompts, loaded.tokenizer)
    skipped = f", {counts['records_bad']} bad record(s) skipped" if counts.get("records_bad") else ""
    log(f"{len(items)} chat prompts from {cfg.data}{skipped}; generating {cfg.n_samples} completion(s) each "
        f"(up to {cfg.max_new_tokens} tokens) in batches of {cfg.batch_size} into {cfg.out} ...")
    out = Path(cfg.out)
    stats = generate_from_items(
        loaded.model.eval(), loaded.tokenizer, items, out=out, teacher_id=loaded.identity,
        max_new_tokens=cfg.max_new_tokens, sampling_temperature=cfg.sampling_temperature, top_p=cfg.top_p,
        greedy=cfg.greedy, n_samples=cfg.n_samples, batch_size=cfg.batch_size, seed=cfg.seed, log=log,
    )
    log(f"{stats['exported']} prompt/completion records in {out} ({stats['samples_written']} generated now, "
        f"{stats['samples_skipped']} already stored, {stats['errors']} malformed, {stats['seconds']:.1f} s)")
    return stats
