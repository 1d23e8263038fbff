"""A teacher behind an OpenAI-compatible HTTP endpoint (``teacher.source: remote``).

Two uses:

* :meth:`RemoteTeacher.signal` - top-k prompt log-probabilities for logit
  distillation, from servers that offer vLLM's ``prompt_logprobs`` (vLLM,
  SGLang, ``stillroom serve-teacher``). Each row of the batch is sent as its
  token ids (exact tokenization; no text round trip), one request per row.
* :meth:`RemoteTeacher.generate` - sampled texts for black-box methods, from
  ``/v1/chat/completions`` (or ``/v1/completions`` with ``chat=False``).

Alignment: the server's ``prompt_logprobs[j]`` (``j >= 1``) is the distribution
that predicted prompt token ``j`` from tokens ``< j``; the student's position
``t`` predicts token ``t + 1``, so student position ``t`` takes entry ``t + 1``.
A row of ``L`` real tokens fills positions ``0 .. L-2``; position ``L-1`` and the
padding have no teacher distribution (collation never makes them targets; a
target there is an error) and hold a uniform placeholder. Prompt log-probs are
raw (temperature 1), so the signal has ``temperature = 1``.

Robustness: at most ``concurrency`` requests in flight; 429, 5xx, timeouts,
broken connections and unparseable bodies are retried up to ``max_retries``
times with exponential backoff and jitter (``Retry-After`` honoured, capped);
other 4xx fail at once. Errors name the URL path and what was wrong. The API
key is read from the environment variable ``api_key_env``, sent only as an
``Authorization`` header, and scrubbed from every message this module emits.

Resume: with a :class:`RemoteCache` every finished row is appended (and
fsynced) as it arrives, keyed by uid and a hash of its token ids, so a rerun
after a crash or a failed request does not ask for it again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch

from stillroom.config.schema import RemoteConfig
from stillroom.data.batch import Batch, Example
from stillroom.teachers.signal import Fingerprint, TeacherSignal, tail_logmass
from stillroom.teachers.store_format import SequenceSignal

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_FORMAT = "stillroom-remote-cache"


class RemoteError(RuntimeError):
    """A remote teacher request failed or its answer cannot be used; the message says where and why."""


# ----------------------------------------------------------------------------- cache


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _unb64(s: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).reshape(shape)


def ids_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode("ascii")).hexdigest()[:32]


class RemoteCache:
    """Append-only JSONL file of finished rows: ``uid -> (top-k ids [L-1, K], log-probs [L-1, K])``.

    Line 1 is a header ``{"format", "version", "model", "top_k"}``; reopening with
    another model or top_k is an error. Each further line is one row (arrays as
    base64 little-endian int32/float32, exact). Every :meth:`put` writes one line
    and fsyncs. A torn last line (crash mid-write) is dropped on open; a bad line
    before it is corruption and raises naming ``file:line``. One writer at a time
    (``flock``). A row is reused only when its token ids hash matches.
    """

    def __init__(self, path: str | os.PathLike, *, model: str | None, top_k: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.header = {"format": CACHE_FORMAT, "version": 1, "model": model, "top_k": top_k}
        self._rows: dict[str, tuple[str, str, str, int]] = {}
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise RemoteError(f"remote cache {self.path} is open for writing elsewhere (another process or RemoteTeacher); close it or use another path") from None
        self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        if not data:
            self._write(json.dumps(self.header, sort_keys=True))
            return
        lines = data.split(b"\n")
        complete, torn = lines[:-1], lines[-1]
        keep = len(data) - len(torn)
        for i, raw in enumerate(complete):
            try:
                rec = json.loads(raw)
                if i > 0:
                    self._rows[rec["uid"]] = (rec["digest"], rec["ids"], rec["logprobs"], int(rec["n"]))
            except (ValueError, KeyError, TypeError) as err:
                if i == len(complete) - 1 and not torn and i > 0:
                    keep -= len(raw) + 1
                    break
                raise RemoteError(f"{self.path}:{i + 1}: not a remote-cache record ({err}); delete the file "
                                  "to start over (its rows will be asked again)") from None
            if i == 0:
                stored = {k: rec.get(k) for k in self.header}
                if stored != self.header:
                    raise RemoteError(f"{self.path}:1: cache was written for {stored}, this run asks {self.header}; "
                                      "use another cache path or delete this one")
        if keep != len(data):
            log.warning("%s: dropping a torn last line left by an interrupted write", self.path)
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)

    def _write(self, line: str) -> None:
        os.write(self._fd, (line + "\n").encode("utf-8"))
        os.fsync(self._fd)

    def get(self, uid: str, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """``(ids [L-1, K] int32, logprobs [L-1, K] float32)`` if ``uid`` is cached for these token ids."""
        row = self._rows.get(uid)
        if row is None or row[0] != ids_digest(ids):
            return None
        digest, ids_b64, lp_b64, n = row
        k = self.header["top_k"]
        return _unb64(ids_b64, "<i4", (n, k)), _unb64(lp_b64, "<f4", (n, k))

    def put(self, uid: str, ids: Sequence[int], top_ids: np.ndarray, top_lp: np.ndarray) -> None:
        rec = {"uid": uid, "digest": ids_digest(ids), "n": int(top_ids.shape[0]),
               "ids": _b64(top_ids.astype("<i4")), "logprobs": _b64(top_lp.astype("<f4"))}
        self._write(json.dumps(rec))
        self._rows[uid] = (rec["digest"], rec["ids"], rec["logprobs"], rec["n"])

    def __len__(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------- parsing


def parse_prompt_logprobs(entries: Any, n_tokens: int, k: int, vocab_size: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """vLLM ``prompt_logprobs`` of one prompt -> ``(ids [n-1, k] int32, logprobs [n-1, k] float32)``.

    Row ``t`` is entry ``t + 1`` (see the module docstring), its k most likely
    tokens by decreasing log-prob (ties broken by ``rank``). Entry values may be
    ``{"logprob": x, ...}`` dicts or bare numbers. ``where`` prefixes errors.
    """
    if not isinstance(entries, list):
        raise RemoteError(f"{where}: the response has no `prompt_logprobs` list; this server does not offer prompt "
                          "log-probabilities (vLLM, SGLang and `stillroom serve-teacher` do). Use an online or store "
                          "teacher for logit distillation, or a black-box method that only needs generations")
    if len(entries) != n_tokens:
        raise RemoteError(f"{where}: prompt_logprobs has {len(entries)} entries for a prompt of {n_tokens} tokens "
                          "(the server did not take the token ids as given)")
    ids_out = np.zeros((max(n_tokens - 1, 0), k), dtype=np.int32)
    lp_out = np.zeros((max(n_tokens - 1, 0), k), dtype=np.float32)
    for j in range(1, n_tokens):
        entry = entries[j]
        if not isinstance(entry, dict):
            raise RemoteError(f"{where}: prompt_logprobs[{j}] is {type(entry).__name__}, expected an object")
        items = []
        for key, value in entry.items():
            try:
                tid = int(key)
                lp = float(value["logprob"] if isinstance(value, dict) else value)
                rank = int(value.get("rank") or 0) if isinstance(value, dict) else 0
            except (TypeError, ValueError, KeyError) as err:
                raise RemoteError(f"{where}: prompt_logprobs[{j}][{key!r}] cannot be read ({err!r})") from None
            if not 0 <= tid < vocab_size:
                raise RemoteError(f"{where}: token id {tid} at prompt_logprobs[{j}] is outside the student's "
                                  f"vocabulary [0, {vocab_size}); the server's tokenizer differs from the student's")
            if math.isnan(lp) or lp > 1e-3:
                raise RemoteError(f"{where}: prompt_logprobs[{j}][{key!r}] = {lp} is not a log-probability")
            items.append((-lp, rank, tid))
        if len(items) < k:
            raise RemoteError(f"{where}: prompt_logprobs[{j}] holds {len(items)} tokens but top_k={k} was asked; "
                              "the server caps prompt log-probs: lower teacher.remote.top_k or raise its limit")
        items.sort()
        ids_out[j - 1] = [t for _, _, t in items[:k]]
        lp_out[j - 1] = [min(-nlp, 0.0) for nlp, _, _ in items[:k]]
    return ids_out, lp_out


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _server_message(r: httpx.Response) -> str:
    try:
        body = r.json()
        err = body.get("error") if isinstance(body, dict) else None
        msg = err.get("message") if isinstance(err, dict) else (err or (body.get("detail") if isinstance(body, dict) else None))
        if msg:
            return str(msg)[:300]
    except ValueError:
        pass
    return r.text[:200] or r.reason_phrase


# ----------------------------------------------------------------------------- client


class RemoteTeacher:
    """Client of an OpenAI-compatible teacher server (see the module docstring).

    ``cache``: a :class:`RemoteCache`, a file path for one, or None. ``backoff_s``
    is the first retry delay (doubling each retry, capped at ``max_backoff_s``,
    with jitter in ``[d/2, d]``); a ``Retry-After`` is honoured up to
    ``max_retry_after_s``. ``sleep`` is injectable for tests.
    """

    def __init__(self, cfg: RemoteConfig, *, vocab_size: int, fingerprint: Fingerprint | None = None,
                 cache: RemoteCache | str | os.PathLike | None = None, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, max_retry_after_s: float = 120.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not cfg.url:
            raise RemoteError("teacher.remote.url is not set; e.g. teacher.remote.url=http://127.0.0.1:8000/v1")
        parts = urlsplit(cfg.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"teacher.remote.url must be an http(s) URL such as http://127.0.0.1:8000/v1 "
                              f"(got scheme {parts.scheme!r})")
        if cfg.top_k > vocab_size:
            raise RemoteError(f"teacher.remote.top_k={cfg.top_k} exceeds the vocabulary size {vocab_size}")
        self.cfg, self.vocab_size, self.fingerprint = cfg, vocab_size, fingerprint
        self._key = self._read_key(cfg.api_key_env)
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self._shown_base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"  # never the userinfo
        if self._key and parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("sending the API key over plain http to %s", parts.hostname)
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._client = httpx.Client(
            base_url=cfg.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
            trust_env=False,
        )
        self.cache = cache if isinstance(cache, RemoteCache) or cache is None else \
            RemoteCache(cache, model=cfg.model, top_k=cfg.top_k)
        self.backoff_s, self.max_backoff_s, self.max_retry_after_s = backoff_s, max_backoff_s, max_retry_after_s
        self._sleep = sleep
        self._checked = False
        self._count_lock = threading.Lock()
        self.requests_sent = 0
        """HTTP requests made so far (every attempt counts)."""

    @staticmethod
    def _read_key(env: str | None) -> str | None:
        if env is None:
            return None
        key = os.environ.get(env)
        if not key:
            raise RemoteError(f"teacher.remote.api_key_env names the environment variable {env!r}, which is not set "
                              "or empty; export it before running (the key itself never goes in a recipe)")
        return key

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    # ------------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, payload: dict | None = None) -> Any:
        """JSON body of ``method path`` with bounded retries; raises :class:`RemoteError`."""
        where = f"{method} {self._shown_base}{path}"
        problem = ""
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            try:
                with self._count_lock:
                    self.requests_sent += 1
                r = self._client.request(method, path, json=payload)
            except httpx.TimeoutException as err:
                problem = f"no answer within timeout_s={self.cfg.timeout_s} ({type(err).__name__})"
            except httpx.TransportError as err:
                problem = f"connection failed ({type(err).__name__}: {err})"
            else:
                if 200 <= r.status_code < 300:
                    try:
                        return r.json()
                    except ValueError as err:
                        problem = f"the response body is not valid JSON ({err}); it starts with {r.text[:80]!r}"
                elif r.status_code == 429 or r.status_code >= 500:
                    problem = f"HTTP {r.status_code}: {_server_message(r)}"
                    retry_after = _retry_after(r.headers)
                else:
                    hint = {401: " (check the API key in the environment variable teacher.remote.api_key_env)",
                            403: " (the API key lacks access)",
                            404: " (check teacher.remote.url, which should end in /v1, and teacher.remote.model)"}
                    raise RemoteError(self._redact(f"{where}: HTTP {r.status_code}: {_server_message(r)}"
                                                   f"{hint.get(r.status_code, '')}"))
            if attempt == self.cfg.max_retries:
                break
            delay = self._delay(attempt, retry_after)
            log.warning("%s", self._redact(f"{where}: {problem}; retry {attempt + 1}/{self.cfg.max_retries} "
                                           f"in {delay:.2f}s"))
            self._sleep(delay)
        raise RemoteError(self._redact(f"{where}: failed after {self.cfg.max_retries + 1} attempt(s); "
                                       f"last problem: {problem}"))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        d = d / 2 + random.uniform(0, d / 2)
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_retry_after_s))
        return d

    def _parallel(self, fn: Callable[[Any], Any], items: list, on_result: Callable[[Any, Any], None]) -> None:
        """Run ``fn`` over ``items`` with at most ``concurrency`` in flight; ``on_result(item, result)`` runs in
        this thread as results arrive. On the first failure, unstarted work is cancelled, running work
        finishes (and is still handed to ``on_result``), then the error is raised."""
        if not items:
            return
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(items))) as pool:
            futures = {pool.submit(fn, it): it for it in items}
            pending, error = set(futures), None
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.cancelled():
                        continue
                    if f.exception() is not None:
                        error = error or f.exception()
                    else:
                        on_result(futures[f], f.result())
                if error is not None:
                    for f in pending:
                        f.cancel()
            if error is not None:
                raise error

    def check_server(self) -> dict | None:
        """Ask ``/models``; check the model is served and (if both sides know it) the tokenizer hash.

        Returns the model's entry, or None when the server has no ``/models`` listing.
        """
        try:
            body = self._request("GET", "/models")
        except RemoteError as err:
            if "HTTP 404" in str(err):
                log.warning("%s: no /models listing; skipping the compatibility check", self._shown_base)
                return None
            raise
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise RemoteError(f"GET {self._shown_base}/models: expected a `data` list, got {str(body)[:120]!r}")
        entry = next((m for m in data if isinstance(m, dict) and m.get("id") == self.cfg.model), None)
        if self.cfg.model is not None and entry is None:
            names = [m.get("id") for m in data if isinstance(m, dict)]
            raise RemoteError(f"{self._shown_base}: model {self.cfg.model!r} is not served (served: {names}); "
                              "fix teacher.remote.model")
        entry = entry or (data[0] if data and isinstance(data[0], dict) else {})
        theirs = entry.get("tokenizer_hash")
        if self.fingerprint is not None and theirs and theirs != self.fingerprint.tokenizer_hash:
            raise RemoteError(f"{self._shown_base}: the served model's tokenizer ({theirs[:12]}) differs from the "
                              f"student's ({self.fingerprint.tokenizer_hash[:12]}); logit distillation needs the "
                              "same tokenizer")
        return entry

    # ------------------------------------------------------------------ top-k signal

    def _fetch_row(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        payload = {"prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": self.cfg.top_k}
        if self.cfg.model is not None:
            payload["model"] = self.cfg.model
        body = self._request("POST", "/completions", payload)
        where = f"POST {self._shown_base}/completions"
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise RemoteError(f"{where}: the response has no `choices` list: {str(body)[:160]!r}")
        entries = choices[0].get("prompt_logprobs", body.get("prompt_logprobs"))
        return parse_prompt_logprobs(entries, len(ids), self.cfg.top_k, self.vocab_size, where)

    def signal(self, batch: Batch) -> TeacherSignal:
        """Top-k teacher signal for ``batch`` aligned with the student's positions (``[B, T, K]``).

        Rows must be right-padded (``attention_mask`` = ones then zeros). Cached rows are not asked again;
        fetched rows are cached as they arrive, so rows finished before a failure survive it.
        """
        if self.fingerprint is not None and not self._checked:
            self.check_server()
            self._checked = True
        bsz, width = batch.input_ids.shape
        k = self.cfg.top_k
        rows: list[tuple[np.ndarray, np.ndarray] | None] = [None] * bsz
        keys: list[tuple[str, str]] = []
        todo: dict[tuple[str, str], list[int]] = {}
        for b in range(bsz):
            n = int(batch.attention_mask[b].sum())
            if not bool(batch.attention_mask[b, :n].all()):
                raise ValueError(f"row {b} (uid {batch.uids[b]}) is not right-padded; the remote teacher needs "
                                 "attention_mask = ones then zeros")
            ids = batch.input_ids[b, :n].tolist()
            keys.append((batch.uids[b], ids_digest(ids)))
            rows[b] = self.cache.get(batch.uids[b], ids) if self.cache is not None else None
            if rows[b] is None and n > 1:
                todo.setdefault(keys[b], ids)
        fetched: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

        def keep(key: tuple[str, str], result: tuple[np.ndarray, np.ndarray]) -> None:
            fetched[key] = result
            if self.cache is not None:
                self.cache.put(key[0], todo[key], *result)

        self._parallel(lambda key: self._fetch_row(todo[key]), list(todo), keep)

        ids_btk = torch.arange(k, dtype=torch.long).expand(bsz, width, k).clone()
        lp_btk = torch.full((bsz, width, k), -math.log(self.vocab_size), dtype=torch.float32)
        known_bt = torch.zeros((bsz, width), dtype=torch.bool)
        for b in range(bsz):
            row = rows[b] if rows[b] is not None else fetched.get(keys[b])
            if row is None:
                continue
            n = row[0].shape[0]
            ids_btk[b, :n] = torch.from_numpy(row[0].astype(np.int64))
            lp_btk[b, :n] = torch.from_numpy(row[1].copy())
            known_bt[b, :n] = True
        unknown = batch.loss_mask.cpu() & ~known_bt
        if bool(unknown.any()):
            b, t = (int(x) for x in unknown.nonzero()[0])
            raise ValueError(f"row {b} (uid {batch.uids[b]}) has a target at position {t}, where the remote teacher "
                             "has no distribution (the last real token and padding have none)")
        device = batch.input_ids.device
        return TeacherSignal(topk_ids_btk=ids_btk.to(device), topk_logprobs_btk=lp_btk.to(device),
                             tail_logmass_bt=tail_logmass(lp_btk).to(device), temperature=1.0,
                             fingerprint=self.fingerprint)

    def store_compute(self, batch_size: int = 32) -> Callable[[list[Example]], list[SequenceSignal]]:
        """A ``compute(examples)`` callback for :func:`stillroom.teachers.store_writer.write_store`.

        Writes a precomputed store from the server (the store's ``loss_temperature`` must be 1:
        prompt log-probs are raw). The last position of each sequence holds the uniform placeholder
        (no next token; never a target). The store writer resumes by shard; give the teacher a
        :class:`RemoteCache` too and rows of an unfinished shard are not asked again either.
        """
        from stillroom.data.batch import collate

        def compute(examples: list[Example]) -> list[SequenceSignal]:
            out = []
            for lo in range(0, len(examples), batch_size):
                chunk = examples[lo : lo + batch_size]
                sig = self.signal(collate(chunk, pad_id=0))
                for b, ex in enumerate(chunk):
                    n = len(ex.input_ids)
                    out.append(SequenceSignal(ex.uid, sig.topk_ids_btk[b, :n].cpu(), sig.topk_logprobs_btk[b, :n].cpu(),
                                              sig.tail_logmass_bt[b, :n].cpu()))
            return out

        return compute

    # ------------------------------------------------------------------ generations

    def generate(self, prompts: Sequence[str | list[dict]], n: int = 1, *, max_new_tokens: int = 256,
                 sampling_temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, chat: bool = True) -> list[list[str]]:
        """``n`` sampled texts per prompt (``[len(prompts)][n]``), requests bounded by ``concurrency``.

        A prompt is a user message (str) or a list of chat messages; ``chat=False`` sends str prompts to
        ``/completions`` as raw text. With ``seed``, each prompt gets ``seed + crc32(prompt)`` so the same
        prompt gets the same seed however prompts are batched. Servers that return fewer than ``n``
        choices per request are asked again for the rest (at most ``n`` requests per prompt).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        path = "/chat/completions" if chat else "/completions"

        def one(i: int) -> list[str]:
            prompt = prompts[i]
            payload: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": sampling_temperature,
                                       "top_p": top_p}
            if self.cfg.model is not None:
                payload["model"] = self.cfg.model
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
                texts += self._texts(self._request("POST", path, payload), chat, path)
                if len(texts) >= n:
                    return texts[:n]
            return texts

        out: list[list[str] | None] = [None] * len(prompts)

        def store(i: int, texts: list[str]) -> None:
            out[i] = texts

        self._parallel(one, list(range(len(prompts))), store)
        return [o or [] for o in out]

    def _texts(self, body: Any, chat: bool, path: str) -> list[str]:
        where = f"POST {self._shown_base}{path}"
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

    def complete_fn(self, **settings: Any) -> Callable[[list[str], int], list[list[str]]]:
        """A ``complete_fn(prompts, n)`` for :func:`stillroom.datagen.complete.generate_with`."""
        return lambda prompts, n: self.generate(prompts, n, **settings)

    def close(self) -> None:
        self._client.close()
        if self.cache is not None:
            self.cache.close()


def remote_from_run(cfg: "RunConfig", *, vocab_size: int, fingerprint: Fingerprint | None) -> RemoteTeacher:
    """The remote teacher of a run (``teacher.source: remote``), checked before step 0.

    Its rows are cached in ``<output_dir>/<name>/remote_cache.jsonl`` (a rerun or ``--resume`` asks
    only what is missing). Prompt log-probs are at temperature 1, so ``loss.loss_temperature`` must be 1.
    """
    if abs(cfg.loss.loss_temperature - 1.0) > 1e-9:
        raise RemoteError(f"teacher.source=remote gives prompt log-probs at temperature 1, but loss.loss_temperature "
                          f"is {cfg.loss.loss_temperature}; top-k log-probs cannot be re-tempered: set it to 1")
    cache = Path(cfg.output_dir).expanduser() / cfg.name / "remote_cache.jsonl"
    teacher = RemoteTeacher(cfg.teacher.remote, vocab_size=vocab_size, fingerprint=fingerprint, cache=cache)
    teacher.check_server()
    teacher._checked = True
    return teacher
