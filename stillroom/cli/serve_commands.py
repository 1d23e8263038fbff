"""``stillroom serve-teacher MODEL``: serve a local teacher over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os

DTYPES = ("auto", "bfloat16", "float16", "float32")


def make_service(args):
    """``(TeacherService, api_key or None)`` from parsed ``serve-teacher`` arguments."""
    from stillroom.models import load_model, model_source
    from stillroom.teachers.server import TeacherService

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SystemExit(f"error: --api-key-env names {args.api_key_env!r}, which is not set or empty")
    from stillroom.models.precision import weights_dtype

    loaded = load_model(model_source(args.model), dtype=weights_dtype(args.dtype, args.device), cache_dir=args.cache_dir)
    model = loaded.model.to(args.device)
    name = args.served_model_name or args.model.split(":", 1)[-1].rstrip("/").split("/")[-1]
    service = TeacherService(model, loaded.tokenizer, model_name=name, max_top_k=args.max_top_k,
                             identity=loaded.identity)
    return service, api_key


def cmd_serve_teacher(args) -> int:
    from stillroom.teachers.server import serve

    service, api_key = make_service(args)
    print(f"serving {service.model_name} ({service.identity}) at http://{args.host}:{args.port}/v1 "
          f"(prompt log-probs up to top-{service.max_top_k}{', API key required' if api_key else ''})", flush=True)
    serve(service, args.host, args.port, api_key=api_key)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve-teacher",
        help="serve a local teacher over an OpenAI-compatible API (prompt log-probs for logit KD, generations)",
        description="Serve MODEL (a Hugging Face folder, a .gguf file, or builtin:smollm2-135m-instruct) with "
        "/v1/completions (vLLM-style prompt_logprobs), /v1/chat/completions, /v1/models and /health. "
        "Binds to loopback unless --host says otherwise. Train against it with teacher.source=remote.",
    )
    p.add_argument("model", help="HF folder, .gguf file, hub id, or builtin:smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights dtype (auto: bfloat16 where bf16 matmuls are fast, else float32)")
    p.add_argument("--device", default="cpu", help="torch device of the model (default cpu)")
    p.add_argument("--max-top-k", type=int, default=64, help="largest prompt_logprobs a request may ask (default 64)")
    p.add_argument("--served-model-name", default=None, help="name clients send as `model` (default: from MODEL)")
    p.add_argument("--api-key-env", default=None,
                   help="environment variable holding an API key that clients must send as a Bearer token")
    p.add_argument("--cache-dir", default=None, help="stillroom model cache (builtin models)")
    p.set_defaults(func=cmd_serve_teacher)
