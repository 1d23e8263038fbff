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

Command line (before training a draft recipe such as ``draft_forward_kl``)::

    python -m stillroom.datagen.draft_data --target builtin:smollm2-135m-instruct \\
        --prompts 200 --max-new-tokens 128 --out runs/draft/target_data.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stillroom.generate.sampling import sample_continuations
from stillroom.datagen.store import GenerationStore
from stillroom.methods.onpolicy import eos_token_ids
from stillroom.datagen.complete import CompleteFn, generate_with


def chat_prompts(records: Sequence[dict], tokenizer: Any, *, where: str = "records") -> list[dict]:
    """``[{"id", "prompt"}]``: each record's messages up to its last user turn, rendered with the chat template.

    Records need a ``messages`` list; ``id`` is the record's ``id`` field or its index.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat_template; draft data from chat prompts needs one")
    items = []
    for i, rec in enumerate(records):
        messages = rec.get("messages") if isinstance(rec, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}[{i}]: needs a non-empty `messages` list (has {sorted(rec) if isinstance(rec, dict) else type(rec).__name__})")
        messages = list(messages)
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
        if not messages or messages[-1].get("role") != "user":
            raise ValueError(f"{where}[{i}]: no user turn to answer")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        items.append({"id": str(rec.get("id", i)), "prompt": text})
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
    out = Path(out)
    items = chat_prompts(records, tokenizer)
    complete = sampled_complete_fn(model, tokenizer, max_new_tokens=max_new_tokens,
                                   sampling_temperature=sampling_temperature, top_p=top_p, seed=seed, greedy=greedy)
    settings = {"max_new_tokens": max_new_tokens, "sampling_temperature": sampling_temperature, "top_p": top_p,
                "greedy": greedy, "seed": seed}
    out.parent.mkdir(parents=True, exist_ok=True)
    with GenerationStore(out.with_name(out.name + ".store.jsonl")) as store:
        stats = generate_with(complete, items, template="{prompt}", n_samples=n_samples, batch_size=batch_size,
                              store=store, teacher_id=teacher_id, settings=settings)
        stats["exported"] = export_prompt_completion(store, items, out)
    return stats


def instruction_records(data: str, n: int, seed: int) -> list[dict]:
    """The first ``n`` records of ``bundled:NAME`` or a local file (as :mod:`stillroom.data.readers` reads them)."""
    from stillroom.config.schema import DataSource
    from stillroom.data.readers import RawRecord, read_source

    src = DataSource(bundled=data.split(":", 1)[1], limit=n) if data.startswith("bundled:") else DataSource(path=data, limit=n)
    out = []
    for item in read_source(src, seed=seed):
        if not isinstance(item, RawRecord):
            raise ValueError(f"{item.where}: {item.reason}")
        out.append(item.fields)
        if len(out) >= n:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stillroom.datagen.draft_data",
                                     description="Generate a draft model's distillation data from the target.")
    add_arguments(parser)
    return handle(parser.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="builtin:NAME, a .gguf file or an HF folder")
    p.add_argument("--data", default="bundled:instructions", help="chat records: bundled:NAME or a .jsonl file")
    p.add_argument("--prompts", type=int, default=200, help="number of records used")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the bundled generator (keep eval prompts apart)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sampling-temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--n-samples", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="prompt/completion JSONL to write")


def handle(args: argparse.Namespace) -> int:
    from stillroom.models.load import load_model, model_source
    from stillroom.models.precision import torch_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(model_source(args.target), dtype=torch_dtype(args.dtype))
    records = instruction_records(args.data, args.prompts, args.data_seed)
    stats = generate_draft_data(
        loaded.model.eval(), loaded.tokenizer, records, out=Path(args.out), teacher_id=loaded.identity,
        max_new_tokens=args.max_new_tokens, sampling_temperature=args.sampling_temperature, top_p=args.top_p,
        greedy=args.greedy, n_samples=args.n_samples, batch_size=args.batch_size, seed=args.seed,
    )
    print(f"{stats['exported']} prompt/completion records in {args.out} ({stats['samples_written']} generated now, "
          f"{stats['samples_skipped']} already stored, {stats['errors']} malformed, {stats['seconds']:.1f} s)")
    return 0


def register(subparsers) -> None:
    """``stillroom draft-data``: for :mod:`stillroom.cli.main` to add to its command list."""
    p = subparsers.add_parser("draft-data", help="generate a draft's distillation data from the target's completions")
    add_arguments(p)
    p.set_defaults(func=handle)


if __name__ == "__main__":
    raise SystemExit(main())
