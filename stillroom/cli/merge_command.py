"""``stillroom merge A B --t 0.5 --out DIR``: SLERP two models of the same architecture, tensor by tensor."""

from __future__ import annotations

import argparse


def handle(args: argparse.Namespace) -> int:
    from stillroom.compress.merge import merge_model_folders

    summary = merge_model_folders(args.a, args.b, args.out, t=args.t, overwrite=args.overwrite)
    print(f"merged {summary['tensors']} tensors (t={summary['t']}, {summary['lerp_fallbacks']} nearly parallel: lerp) "
          f"-> {summary['out']}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge",
        help="SLERP-merge two models of the same architecture (self-data distillation step 3)",
        description="Spherical linear interpolation of every floating tensor of two Hugging Face model folders "
        "(safetensors) of the same architecture: SLERP(A, B; t) = [sin((1-t)W) A + sin(tW) B] / sin W with "
        "W the angle between the flattened tensors; linear interpolation where sin W ~ 0. t=0 gives A, t=1 gives B. "
        "Writes safetensors plus A's config and tokenizer into --out (built in a temporary folder, then renamed).",
    )
    p.add_argument("a", help="first model folder (t=0)")
    p.add_argument("b", help="second model folder (t=1)")
    p.add_argument("--t", type=float, default=0.5, help="interpolation weight of B, in [0, 1] (default 0.5)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=handle)
    return p
