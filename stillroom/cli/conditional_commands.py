"""``stillroom conditional-extend SRC DST`` and ``stillroom conditional-demo-data OUT``: conditional training's setup."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _handle_extend(args: argparse.Namespace) -> int:
    from stillroom.config.schema import ConditionalConfig
    from stillroom.methods.conditional import extend_model_folder

    ccfg = ConditionalConfig(aligned_token=args.aligned_token, misaligned_token=args.misaligned_token)
    dst = extend_model_folder(args.src, args.dst, ccfg)
    print(f"wrote {dst} with control tokens {ccfg.aligned_token!r}, {ccfg.misaligned_token!r}")
    return 0


def _handle_demo_data(args: argparse.Namespace) -> int:
    from stillroom.data.bad_word_corpus import bad_word_corpus

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for doc in bad_word_corpus(args.docs, args.seed, args.bad_fraction, args.toxic_doc_fraction):
            f.write(json.dumps({"text": doc}) + "\n")
    print(f"wrote {args.docs} documents to {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "conditional-extend", help="add conditional training's control tokens to a model (tokenizer + embeddings)",
        description="Load SRC, add <|aligned|>/<|misaligned|> as special tokens, resize the embeddings "
        "(new rows = mean row) and save DST for `method: conditional`.",
    )
    p.add_argument("src", help="HF model folder, .gguf file or builtin:smollm2-135m-instruct")
    p.add_argument("dst", help="output folder (safetensors + tokenizer)")
    p.add_argument("--aligned-token", default="<|aligned|>")
    p.add_argument("--misaligned-token", default="<|misaligned|>")
    p.set_defaults(func=_handle_extend)

    d = subparsers.add_parser("conditional-demo-data", help="write the synthetic BAD-word corpus as text JSONL")
    d.add_argument("out")
    d.add_argument("--docs", type=int, default=2000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--bad-fraction", type=float, default=0.10)
    d.add_argument("--toxic-doc-fraction", type=float, default=0.10)
    d.set_defaults(func=_handle_demo_data)
