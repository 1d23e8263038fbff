"""Serve a local teacher over an OpenAI-compatible HTTP API (``stillroom serve-teacher``).

Endpoints (FastAPI; loopback by default):

* ``GET /health`` -> ``{"status": "ok"}`` (no authentication).
* ``GET /v1/models`` -> the served model, with stillroom extras ``vocab_size``, ``tokenizer_hash`` and ``identity``
  so that a client can check compatibility, and ``image_input`` (a VLM: how it takes ``images``; else null).
* ``POST /v1/completions``: ``prompt`` is a string, a list of token ids (exact client tokenization, as vLLM
  accepts), or a list of either. With ``prompt_logprobs: k`` each choice carries vLLM's ``prompt_logprobs``: one
  entry per prompt token, ``None`` for the first, else
  ``{str(token_id): {"logprob": float, "rank": int, "decoded_token": str}}`` holding the top-k of
  ``log_softmax(logits)`` of the *previous* position (the distribution that predicted this token) plus the actual
  token (so k or k + 1 entries). Log-probs are raw (temperature 1), clamped below at -9999 like vLLM (JSON has no
  -inf); ``rank`` is 1-based (1 + number of strictly larger log-probs). ``max_tokens`` may be 0 (log-probs only).
  vLLM's extras ``stop_token_ids``, ``ignore_eos`` and ``return_token_ids`` (each choice then carries
  ``token_ids``, ending with the stop token) are honoured. A served VLM (a LLaVA folder) also reads ``images``
  with one token-id prompt (stillroom's extension, :mod:`stillroom.teachers.remote_images`); a text model
  refuses that field.
* ``POST /v1/load_weights``: serve the weights of a folder (:mod:`stillroom.teachers.reload`; 403 unless
  started with ``--allow-reload``); ``/v1/models`` ``weights`` and ``system_fingerprint`` name them.
* ``POST /v1/chat/completions``: the tokenizer's chat template, then sampling
  (``temperature`` 0 = greedy; ``seed`` makes it reproducible).

Errors follow OpenAI's shape: ``{"error": {"message", "type", "code"}}``. Model work is serialised by a lock (one
forward at a time bounds memory: a prompt of L tokens needs ``[L, V]`` fp32 log-probs). An optional API key is
compared in constant time and never logged. With ``TeacherService.log_requests`` (``stillroom serve-teacher``'s
default) each request writes one line to stderr: method, path, model, prompt tokens, top-k and max tokens (where
the request got that far), status and milliseconds; never the API key or the prompt text.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from stillroom.data.prompts import prompt_ids
from stillroom.generate.sampling import eos_token_ids, sample_continuations
from stillroom.teachers.reload import add_reload_route
from stillroom.teachers.remote_images import ImageInput, ImageRequestError, request_pixels

log = logging.getLogger(__name__)

LOGPROB_FLOOR = -9999.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logit_bias, ...)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stop_token_ids: list[int] | None = None  # vLLM's extras: more end tokens, none at all, ids in the answer
    ignore_eos: bool = False
    return_token_ids: bool = False


class CompletionRequest(_Request):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    prompt_logprobs: int | None = Field(None, ge=0)
    logprobs: int | None = None
    echo: bool = False
    images: list[Any] | None = None  # stillroom's extension: image_url parts of a VLM row (remote_images.py)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)


def _error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


@dataclass
class TeacherService:
    """The model work behind the endpoints (usable without HTTP)."""

    model: torch.nn.Module
    tokenizer: Any
    model_name: str
    max_top_k: int = 64
    max_new_tokens_cap: int = 2048
    identity: str | None = None
    log_requests: bool = False
    """Write one line per HTTP request to stderr (see the module docstring)."""
    allow_reload: bool = False
    """Answer ``POST /v1/load_weights`` (:mod:`stillroom.teachers.reload`); otherwise it answers 403."""
    weights: str | None = None
    """Digest of the weights loaded through ``/v1/load_weights`` (None: the ones the server started with)."""
    images: ImageInput | None = None  # how a served VLM reads the request field `images` (None: a text model)

    def __post_init__(self) -> None:
        self.model.eval()
        self.vocab_size = len(self.tokenizer)
        self.device = next(self.model.parameters()).device
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.lock = threading.Lock()
        self.eos = eos_token_ids(self.tokenizer, self.model)
        self._decoded: dict[int, str] = {}

    def decoded(self, token_id: int) -> str:
        if token_id not in self._decoded:
            self._decoded[token_id] = self.tokenizer.decode([token_id])
        return self._decoded[token_id]

    def check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise HTTPException(400, "a prompt encodes to zero tokens")
        if len(ids) > self.max_len:
            raise HTTPException(400, f"prompt has {len(ids)} tokens; the model accepts at most {self.max_len}")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise HTTPException(400, f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], k: int, pixels: torch.Tensor | None = None) -> list[dict | None]:
        """vLLM-style prompt log-probs of one prompt (module docstring); ``pixels`` ``[n, 3, S, S]``: its images."""
        extra = {} if pixels is None else {"pixel_values": pixels.to(self.device)}  # a VLM row: as the online teacher
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits_lv = self.model(input_ids=input_ids, use_cache=False, **extra).logits[0, :-1, : self.vocab_size]
        logp_lv = torch.log_softmax(logits_lv.float(), dim=-1)
        actual_l = torch.tensor(ids[1:], dtype=torch.long, device=self.device)
        actual_lp_l = logp_lv.gather(-1, actual_l[:, None]).squeeze(-1)
        actual_rank_l = (logp_lv > actual_lp_l[:, None]).sum(-1) + 1
        out: list[dict[str, dict] | None] = [None]
        if k > 0:
            top_lp_lk, top_id_lk = logp_lv.topk(k, dim=-1)
            top_lp, top_id = top_lp_lk.tolist(), top_id_lk.tolist()
        for j, (tok, lp, rank) in enumerate(zip(ids[1:], actual_lp_l.tolist(), actual_rank_l.tolist())):
            entry: dict[str, dict] = {}
            if k > 0:
                for r, (i, v) in enumerate(zip(top_id[j], top_lp[j]), start=1):
                    entry[str(i)] = {"logprob": max(v, LOGPROB_FLOOR), "rank": r, "decoded_token": self.decoded(i)}
            if str(tok) not in entry:
                entry[str(tok)] = {"logprob": max(lp, LOGPROB_FLOOR), "rank": int(rank), "decoded_token": self.decoded(tok)}
            out.append(entry)
        return out

    def generate(self, ids: list[int], req: _Request, max_tokens: int) -> list[tuple[str, str, list[int]]]:
        """``n`` continuations of one prompt: ``[(text, finish_reason, token ids)]`` (ids end with the stop token)."""
        if max_tokens == 0:
            return [("", "length", [])] * req.n
        ends = set() if req.ignore_eos else {*self.eos, *(req.stop_token_ids or [])}
        gen = torch.Generator(device="cpu")
        gen.manual_seed(req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:6], "big"))
        new = sample_continuations(
            self.model, self.tokenizer, [ids] * req.n, max_new_tokens=max_tokens,
            sampling_temperature=req.temperature if req.temperature > 0 else 1.0, top_p=req.top_p,
            greedy=req.temperature == 0, eos_token_id=sorted(ends) or None, generator=gen,
        )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        out = []
        for toks in new:
            reason = "stop" if toks and toks[-1] in ends else "length"
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            for s in stops:
                if s and s in text:
                    text, reason = text[: text.index(s)], "stop"
            out.append((text, reason, toks))
        return out


def _prompts(service: TeacherService, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise HTTPException(400, "`prompt` is empty")
    out = []
    for p in items:
        ids = service.tokenizer(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
        service.check_ids(ids)
        out.append(ids)
    return out


def create_app(service: TeacherService, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``service``; ``api_key`` (if set) is required as ``Authorization: Bearer``."""
    app = FastAPI(title="stillroom teacher", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:])}: {e.get('msg')}" for e in exc.errors()[:5]]
        return _error(400, "invalid request: " + "; ".join(parts))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key (send `Authorization: Bearer <key>`)")
        return await call_next(request)

    if service.log_requests:  # added after _auth: the outer middleware, so refused requests are logged too
        @app.middleware("http")
        async def _log(request: Request, call_next):
            t0, status = time.perf_counter(), 500
            try:
                response = await call_next(request)
                status = response.status_code
                return response
            finally:
                _log_request(request, status, 1000 * (time.perf_counter() - t0))

    def check_common(req: _Request) -> None:
        if req.stream:
            raise HTTPException(400, "streaming is not supported by this server; send stream=false")
        if req.model is not None and req.model != service.model_name:
            raise HTTPException(404, f"model {req.model!r} is not served here; this server serves {service.model_name!r}")

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        from stillroom.models.vocab import tokenizer_hash

        return {"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": 0, "owned_by": "stillroom",
            "vocab_size": service.vocab_size, "tokenizer_hash": tokenizer_hash(service.tokenizer),
            "identity": service.identity, "max_top_k": service.max_top_k,
            "weights": service.weights, "reload": service.allow_reload,
            "image_input": service.images.listing() if service.images is not None else None,
        }]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest, request: Request) -> dict:
        _note(request, model=req.model or service.model_name, top_k=req.prompt_logprobs, max_tokens=req.max_tokens)
        check_common(req)
        if req.echo or req.logprobs is not None:
            raise HTTPException(400, "`echo` and `logprobs` (of generated tokens) are not supported; "
                                     "use `prompt_logprobs` for prompt log-probabilities")
        k = req.prompt_logprobs
        if k is not None and k > min(service.max_top_k, service.vocab_size):
            raise HTTPException(400, f"prompt_logprobs={k} exceeds this server's limit of "
                                     f"{min(service.max_top_k, service.vocab_size)} (serve-teacher --max-top-k)")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens > service.max_new_tokens_cap:
            raise HTTPException(400, f"max_tokens={max_tokens} exceeds {service.max_new_tokens_cap}")
        try:
            prompts, pixels = request_pixels(service.images, service.model_name, req.images,
                                             _prompts(service, req.prompt), max_tokens)
        except ImageRequestError as err:
            raise HTTPException(400, str(err)) from None
        _note(request, prompt_tokens=sum(len(ids) for ids in prompts), max_tokens=max_tokens)
        choices, n_prompt, n_gen = [], 0, 0
        with service.lock:
            for p_idx, ids in enumerate(prompts):
                n_prompt += len(ids)
                plp = service.prompt_logprobs(ids, k, pixels) if k is not None else None
                for s_idx, (text, reason, toks) in enumerate(service.generate(ids, req, max_tokens)):
                    n_gen += len(toks)
                    choices.append({"index": p_idx * req.n + s_idx, "text": text, "logprobs": None,
                                     "finish_reason": reason, "prompt_logprobs": plp,
                                     "prompt_token_ids": ids if k is not None or req.return_token_ids else None,
                                     **({"token_ids": toks} if req.return_token_ids else {})})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": service.model_name, "choices": choices, "usage": usage(n_prompt, n_gen),
                "system_fingerprint": service.weights}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest, request: Request) -> dict:
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = 256 if max_tokens is None else max_tokens
        _note(request, model=req.model or service.model_name, max_tokens=max_tokens)
        check_common(req)
        if max_tokens > service.max_new_tokens_cap:
            raise HTTPException(400, f"max_tokens={max_tokens} exceeds {service.max_new_tokens_cap}")
        try:
            ids = prompt_ids(service.tokenizer, [m.model_dump() for m in req.messages], "messages")
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        _note(request, prompt_tokens=len(ids))
        service.check_ids(ids)
        with service.lock:
            outs = service.generate(ids, req, max_tokens)
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                   for i, (text, reason, _) in enumerate(outs)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": service.model_name, "choices": choices,
                "usage": usage(len(ids), sum(len(t) for _, _, t in outs))}

    add_reload_route(app, service)
    return app


_LOG_FIELDS = ("model", "prompt_tokens", "top_k", "max_tokens")


def _note(request: Request, **fields: Any) -> None:
    """Record what a handler learnt about its request for the request's log line (shared through the scope)."""
    request.state.log = {**getattr(request.state, "log", {}), **fields}


def _clean(value: Any, limit: int = 80) -> str:
    """A client-given value fit for one log line: as it is when plain (``[A-Za-z0-9_./:@+-]``), else JSON-quoted
    (no line breaks, no spaces that could pass for another field); at most ``limit`` characters of it."""
    text = str(value)[:limit]
    return text if re.fullmatch(r"[\w./:@+-]+", text, flags=re.ASCII) else json.dumps(text)


def _log_request(request: Request, status: int, ms: float) -> None:
    """``2024-05-01 12:00:00 POST /v1/completions model=tiny prompt_tokens=12 top_k=5 max_tokens=0 -> 200 in 3.1 ms``."""
    noted = getattr(request.state, "log", {})
    fields = "".join(f" {k}={_clean(noted[k])}" for k in _LOG_FIELDS if noted.get(k) is not None)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} {request.method} {_clean(request.url.path)}{fields} -> {status} in {ms:.1f} ms",
          file=sys.stderr, flush=True)


def serve(service: TeacherService, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None) -> None:
    """Run the server in the foreground until interrupted (the ``serve-teacher`` command)."""
    import uvicorn

    if host not in LOOPBACK:
        log.warning("serving on %s: reachable from other machines%s", host,
                    "" if api_key else " WITHOUT an API key (set --api-key-env)")
    uvicorn.run(create_app(service, api_key=api_key), host=host, port=port, log_level="info", access_log=False)
