"""Black-box generation from an OpenAI-compatible server, for ``stillroom generate`` (``teacher.source: remote``).

Sampled texts need nothing of logit distillation (no top-k, no vocabulary, no
cache of log-probs), so they live here with the other teacher-made data, on the
same HTTP client as the remote teacher (:class:`stillroom.teachers.http.OpenAIClient`:
URL and API-key checks, retries with backoff, bounded concurrency, key redaction).
Durability is the caller's: :func:`stillroom.datagen.complete.generate_with`
stores each batch in a resumable :class:`~stillroom.datagen.store.GenerationStore`.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from stillroom.config.schema import RemoteConfig
from stillroom.datagen.complete import CompleteFn
from stillroom.teachers.http import OpenAIClient, RemoteError


def generate(client: OpenAIClient, prompts: Sequence[str | list[dict]], n: int = 1, *, max_new_tokens: int = 256,
             sampling_temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             stop: list[str] | None = None, chat: bool = True) -> list[list[str]]:
    """``n`` sampled texts per prompt (``[len(prompts)][n]``), requests bounded by ``concurrency``.

    A prompt is a user message (str) or a list of chat messages; ``chat=False`` sends str prompts to
    ``/completions`` as raw text. With ``seed``, each prompt gets ``seed + crc32(prompt)`` so the same
    prompt gets the same seed however prompts are batched (a resumed run samples what a whole run
    would have). Servers that return fewer than ``n`` choices per request are asked again for the rest
    (at most ``n`` requests per prompt).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    path = "/chat/completions" if chat else "/completions"
    model = client.cfg.model

    def one(i: int) -> list[str]:
        prompt = prompts[i]
        payload: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": sampling_temperature, "top_p": top_p}
        if model is not None:
            payload["model"] = model
        if stop:
            payload["stop"] = stop
        if chat:
            payload["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        elif isinstance(prompt, str):
            payload["prompt"] = prompt
        else:
            raise ValueError(f"prompt {i} is a message list; use chat=True for chat prompts")
        texts: list[str] = []
        for attempt in range(n):
            if seed is not None:
                payload["seed"] = (seed + zlib.crc32(json.dumps(prompt).encode()) + attempt) % 2**31
            payload["n"] = n - len(texts)
            texts += texts_of(client.request("POST", path, payload), chat, f"POST {client.shown_base}{path}")
            if len(texts) >= n:
                return texts[:n]
        return texts

    out: list[list[str] | None] = [None] * len(prompts)

    def store(i: int, texts: list[str]) -> None:
        out[i] = texts

    client.parallel(one, list(range(len(prompts))), store)
    return [o or [] for o in out]


def texts_of(body: Any, chat: bool, where: str) -> list[str]:
    """The choices' texts in ``index`` order; a choice without text is an error naming ``where``."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        raise RemoteError(f"{where}: the response has no `choices`: {str(body)[:160]!r}")
    texts = []
    for c in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
        text = (c.get("message") or {}).get("content") if chat and isinstance(c, dict) else \
            (c.get("text") if isinstance(c, dict) else None)
        if not isinstance(text, str):
            raise RemoteError(f"{where}: a choice has no text ({str(c)[:120]!r})")
        texts.append(text)
    return texts


def complete_fn(client: OpenAIClient, **settings: Any) -> CompleteFn:
    """A ``complete_fn(prompts, n)`` for :func:`stillroom.datagen.complete.generate_with`; ``settings`` are
    :func:`generate`'s keywords (max_new_tokens, sampling_temperature, top_p, seed, stop, chat)."""
    return lambda prompts, n: generate(client, prompts, n, **settings)


def remote_complete(rcfg: RemoteConfig, **settings: Any) -> tuple[CompleteFn, OpenAIClient]:
    """``(complete_fn, client)`` for the server of ``teacher.remote``, checked now; close the client when done.

    The server check (``/models``: reachable, model served) runs before any prompt is sent, so a
    wrong URL or model fails in a second, not after the first batch; a refused connection fails at
    once, saying to start the server. ``client.shown_base`` is the URL to show (never its userinfo).
    """
    client = OpenAIClient(rcfg)
    try:
        client.check_server()
    except BaseException:
        client.close()
        raise
    return complete_fn(client, **settings), client
