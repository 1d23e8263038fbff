"""The one HTTP client of an OpenAI-compatible server, shared by every remote use.

Logit distillation (:mod:`stillroom.teachers.remote`) and black-box generation
(:mod:`stillroom.datagen.remote_complete`) both talk to the server through
:class:`OpenAIClient`, so URL checks, the API key, retries and the concurrency
bound are written (and tested) once.

Robustness: at most ``concurrency`` requests in flight; 429, 5xx, timeouts,
broken connections and unparseable bodies are retried up to ``max_retries``
times with exponential backoff and jitter (``backoff_s`` doubling up to
``max_backoff_s``; ``Retry-After`` honoured up to ``max_retry_after_s``);
other 4xx fail at once. A refused connection at the first server check is not
retried: nothing is listening, and waiting ~30 s to say so helps nobody.
Errors name the method and URL path and what was wrong.

The API key is read from the environment variable ``api_key_env``, sent only as
an ``Authorization`` header, and scrubbed from every message this module emits
(server error bodies that echo it included).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from stillroom.config.schema import RemoteConfig

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RemoteError(RuntimeError):
    """A remote teacher request failed or its answer cannot be used; the message says where and why."""


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds asked by a ``Retry-After`` header (seconds or HTTP date), or None."""
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


def server_message(r: httpx.Response) -> str:
    """The server's own words for an error (OpenAI ``error.message``, FastAPI ``detail``, or the body)."""
    try:
        body = r.json()
        err = body.get("error") if isinstance(body, dict) else None
        msg = err.get("message") if isinstance(err, dict) else (err or (body.get("detail") if isinstance(body, dict) else None))
        if msg:
            return str(msg)[:300]
    except ValueError:
        pass
    return r.text[:200] or r.reason_phrase


def is_refused(err: BaseException) -> bool:
    """Whether ``err`` (an httpx error) comes from a refused connection: nothing listens at that port."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError) or any(isinstance(a, ConnectionRefusedError) for a in cur.args):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class OpenAIClient:
    """Client of an OpenAI-compatible server (see the module docstring); settings from ``cfg``.

    ``sleep`` is injectable so tests can record the retry delays instead of waiting them out.
    ``server_checked`` turns true once :meth:`check_server` has passed; before that a refused
    connection is reported at once (the server was never up), after it a refused connection is
    retried like any broken connection (a server restarting mid-run).
    """

    def __init__(self, cfg: RemoteConfig, *, sleep: Callable[[float], None] = time.sleep,
                 key: str = "teacher.remote") -> None:
        self.key = key  # the config section the settings came from: every message names its keys
        if not cfg.url:
            raise RemoteError(f"{key}.url is not set; e.g. {key}.url=http://127.0.0.1:8000/v1")
        parts = urlsplit(cfg.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"{key}.url must be an http(s) URL such as http://127.0.0.1:8000/v1 "
                              f"(got scheme {parts.scheme!r})")
        self.cfg = cfg
        self._key = self._read_key(cfg.api_key_env)
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.shown_base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
        """The base URL as shown in messages: never the userinfo."""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._loopback = parts.hostname in LOOPBACK
        if self._key and parts.scheme == "http" and not self._loopback:
            log.warning("sending the API key over plain http to %s", parts.hostname)
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._client = httpx.Client(
            base_url=cfg.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
            trust_env=False,
        )
        self._sleep = sleep
        self._count_lock = threading.Lock()
        self.server_checked = False
        self.requests_sent = 0
        """HTTP requests made so far (every attempt counts)."""

    def _read_key(self, env: str | None) -> str | None:
        if env is None:
            return None
        key = os.environ.get(env)
        if not key:
            raise RemoteError(f"{self.key}.api_key_env names the environment variable {env!r}, which is not set "
                              "or empty; export it before running (the key itself never goes in a recipe)")
        return key

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``***`` (servers may echo it back in error bodies)."""
        return text.replace(self._key, "***") if self._key else text

    # ------------------------------------------------------------------ requests

    def request(self, method: str, path: str, payload: dict | None = None, *, refused_is_fatal: bool = False) -> Any:
        """JSON body of ``method path`` with bounded retries; raises :class:`RemoteError`.

        ``refused_is_fatal``: a refused connection raises at once with how to start a server.
        """
        where = f"{method} {self.shown_base}{path}"
        problem = ""
        for attempt in range(self.cfg.max_retries + 1):
            wait_at_least = None
            try:
                with self._count_lock:
                    self.requests_sent += 1
                r = self._client.request(method, path, json=payload)
            except httpx.TimeoutException as err:
                problem = f"no answer within timeout_s={self.cfg.timeout_s} ({type(err).__name__})"
            except httpx.TransportError as err:
                if refused_is_fatal and is_refused(err):
                    raise RemoteError(self.redact(self._refused_message(where))) from None
                problem = f"connection failed ({type(err).__name__}: {err})"
            else:
                if 200 <= r.status_code < 300:
                    try:
                        return r.json()
                    except ValueError as err:
                        problem = f"the response body is not valid JSON ({err}); it starts with {r.text[:80]!r}"
                elif r.status_code == 429 or r.status_code >= 500:
                    problem = f"HTTP {r.status_code}: {server_message(r)}"
                    wait_at_least = retry_after(r.headers)
                else:
                    hint = {401: f" (check the API key in the environment variable {self.key}.api_key_env)",
                            403: " (the API key lacks access)",
                            404: f" (check {self.key}.url, which should end in /v1, and {self.key}.model)"}
                    raise RemoteError(self.redact(f"{where}: HTTP {r.status_code}: {server_message(r)}"
                                                  f"{hint.get(r.status_code, '')}"))
            if attempt == self.cfg.max_retries:
                break
            delay = self.delay(attempt, wait_at_least)
            log.warning("%s", self.redact(f"{where}: {problem}; retry {attempt + 1}/{self.cfg.max_retries} "
                                          f"in {delay:.2f}s"))
            self._sleep(delay)
        raise RemoteError(self.redact(f"{where}: failed after {self.cfg.max_retries + 1} attempt(s); "
                                      f"last problem: {problem}"))

    def _refused_message(self, where: str) -> str:
        start = f"stillroom serve-teacher MODEL --port {self._port}"
        if not self._loopback:
            start += " --host 0.0.0.0"
        return (f"{where}: connection refused: nothing is listening at {self.shown_base}. Start the teacher server "
                f"first (e.g. `{start}`, or vLLM/SGLang on that port) or fix {self.key}.url")

    def delay(self, attempt: int, wait_at_least: float | None = None) -> float:
        """Delay before retry ``attempt + 1``: ``backoff_s * 2**attempt`` capped at ``max_backoff_s``, drawn in
        ``[d/2, d]`` (jitter keeps many clients from retrying in step), raised to a ``Retry-After`` up to
        ``max_retry_after_s``."""
        d = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2**attempt)
        d = d / 2 + random.uniform(0, d / 2)
        if wait_at_least is not None:
            d = max(d, min(wait_at_least, self.cfg.max_retry_after_s))
        return d

    def parallel(self, fn: Callable[[Any], Any], items: list, on_result: Callable[[Any, Any], None]) -> None:
        """Run ``fn`` over ``items`` with at most ``concurrency`` in flight; ``on_result(item, result)`` runs in
        this thread as results arrive. On the first failure, unstarted work is cancelled, running work
        finishes (and is still handed to ``on_result``, so a cache keeps it), then the error is raised."""
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

    # ------------------------------------------------------------------ server check

    def check_server(self, tokenizer_hash: str | None = None) -> dict | None:
        """Ask ``/models``; check ``<key>.model`` is served and (if both sides know it) the tokenizer.

        Returns the model's entry, or None when the server has no ``/models`` listing. On success
        :attr:`server_checked` becomes true. Until then a refused connection fails at once.
        """
        try:
            body = self.request("GET", "/models", refused_is_fatal=not self.server_checked)
        except RemoteError as err:
            if "HTTP 404" not in str(err):
                raise
            log.warning("%s: no /models listing; skipping the compatibility check", self.shown_base)
            self.server_checked = True
            return None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise RemoteError(f"GET {self.shown_base}/models: expected a `data` list, got {str(body)[:120]!r}")
        entry = next((m for m in data if isinstance(m, dict) and m.get("id") == self.cfg.model), None)
        if self.cfg.model is not None and entry is None:
            names = [m.get("id") for m in data if isinstance(m, dict)]
            raise RemoteError(f"{self.shown_base}: model {self.cfg.model!r} is not served (served: {names}); "
                              f"fix {self.key}.model")
        entry = entry or (data[0] if data and isinstance(data[0], dict) else {})
        theirs = entry.get("tokenizer_hash")
        if tokenizer_hash is not None and theirs and theirs != tokenizer_hash:
            raise RemoteError(f"{self.shown_base}: the served model's tokenizer ({theirs[:12]}) differs from the "
                              f"student's ({tokenizer_hash[:12]}); logit distillation needs the same tokenizer")
        self.server_checked = True
        return entry

    def close(self) -> None:
        self._client.close()
