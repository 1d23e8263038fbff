"""``stillroom spec-eval``: acceptance rate, block efficiency and speed-up of a draft for a target."""

from __future__ import annotations

import argparse
from pathlib import Path

TEXT_PROMPT_WORDS = 48  # plain-text records are cut to their first words to make a prompt


def prompt_of(fields: dict, where: str) -> str | list[dict]:
    """The prompt part of a record: chat messages up to the last user turn, ``prompt``, or the start of ``text``."""
    if isinstance(fields.get("messages"), list):
        messages = list(fields["messages"])
        while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages.pop()
        if not messages:
            raise ValueError(f"{where}: `messages` has no user turn to use as a prompt")
        return messages
    if isinstance(fields.get("prompt"), str):
        return fields["prompt"]
    if isinstance(fields.get("text"), str):
        return " ".join(fields["text"].split()[:TEXT_PROMPT_WORDS])
    raise ValueError(f"{where}: a prompt record needs a `messages`, `prompt` or `text` field (has {sorted(fields)})")


def load_prompts(data: str, n: int, seed: int = 0) -> list[str | list[dict]]:
    """The first ``n`` prompts of ``data``: ``bundled:NAME`` or a .jsonl/.json/.parquet/.txt file."""
    from stillroom.config.schema import DataSource
    from stillroom.data.readers import RawRecord, read_source

    src = DataSource(bundled=data.split(":", 1)[1]) if data.startswith("bundled:") else DataSource(path=data)
    prompts: list[str | list[dict]] = []
    for item in read_source(src, seed=seed):
        if not isinstance(item, RawRecord):
            raise ValueError(f"{item.where}: {item.reason}")  # a BadRecord: fail with its location
        prompts.append(prompt_of(item.fields, item.where))
        if len(prompts) >= n:
            break
    if not prompts:
        raise ValueError(f"{data}: no records to use as prompts")
    return prompts


def handle(args: argparse.Namespace) -> int:
    import torch

    from stillroom.generate.spec_eval import run_spec_eval
    from stillroom.models.load import load_model, model_source
    from stillroom.models.precision import torch_dtype

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    target = load_model(model_source(args.target), dtype=dtype)
    draft = load_model(model_source(args.draft), dtype=dtype)
    if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise ValueError(
            f"--target {args.target} and --draft {args.draft} have different tokenizers; "
            "speculative decoding needs a draft that shares the target's vocabulary"
        )
    for loaded in (target, draft):
        loaded.model.to(args.device)
    prompts = load_prompts(args.data, args.prompts, seed=args.seed)
    report = run_spec_eval(
        target.model,
        draft.model,
        target.tokenizer,
        prompts,
        args.gamma,
        max_new_tokens=args.max_new_tokens,
        modes=args.modes,
        sampling_temperature=args.sampling_temperature,
        top_p=args.top_p,
        seed=args.seed,
        out_dir=Path(args.out),
        stop_at_eos=args.stop_at_eos,
    )
    for row in report["results"]:
        print(
            f"{row['mode']:>8} gamma={row['gamma']}: alpha={row['acceptance_rate']:.3f} "
            f"tau={row['block_efficiency']:.2f} speed-up={row['speedup']:.2f}x"
        )
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "spec-eval",
        help="measure a draft model for speculative decoding of a target",
        description="Speculative decoding with --draft proposing for --target: acceptance rate, block "
        "efficiency (measured and DistillSpec's estimate), memory-bound and measured speed-up. Writes "
        "report.json, report.md and block_efficiency.png into --out.",
    )
    p.add_argument("--target", required=True, help="HF folder, hub id, .gguf file or builtin:smollm2-135m-instruct")
    p.add_argument("--draft", required=True, help="the draft model (same forms as --target; same tokenizer)")
    p.add_argument("--gamma", type=int, nargs="+", default=[1, 3, 5], help="draft tokens per round (several: a sweep)")
    p.add_argument("--data", default="bundled:instructions", help="bundled:NAME or a .jsonl/.json/.parquet/.txt file")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts (the first N records)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--modes", nargs="+", choices=["greedy", "sampling"], default=["greedy", "sampling"])
    p.add_argument("--sampling-temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (default: always emit --max-new-tokens)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice). On a busy machine, 1 avoids multi-threaded "
        "matmuls of a few rows stalling and distorting the timings",
    )
    p.add_argument("--out", default="runs/spec-eval", help="output folder")
    p.set_defaults(func=handle)
    return p
