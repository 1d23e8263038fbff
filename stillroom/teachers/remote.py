"""A teacher behind an OpenAI-compatible HTTP endpoint (``teacher.source: remote``), for logit distillation.

:meth:`RemoteTeacher.signal` gives top-k prompt log-probabilities from servers that
offer vLLM's ``prompt_logprobs`` (vLLM, SGLang, ``stillroom serve-teacher``). Each
row of the batch is sent as its token ids (exact tokenization; no text round trip),
one request per row. :meth:`RemoteTeacher.store_compute` writes a precomputed store
from the same answers. The HTTP side (URL and key checks, retries, concurrency) is
:class:`stillroom.teachers.http.OpenAIClient`; the resume cache is
:class:`stillroom.teachers.remote_cache.RemoteCache`; black-box text generation for
``stillroom generate`` is :mod:`stillroom.datagen.remote_complete`. A teacher with another
tokenizer than the student's (``teacher.tokenizer_mode: cross``) sends the teacher's tokens
of the same text through :meth:`RemoteTeacher.fetch` (:mod:`stillroom.teachers.remote_cross`). In a VLM run each
row also sends its image (:meth:`RemoteTeacher.row_extras`, :mod:`stillroom.teachers.remote_vlm`).

Alignment: the server's ``prompt_logprobs[j]`` (``j >= 1``) is the distribution
that predicted prompt token ``j`` from tokens ``< j``; the student's position
``t`` predicts token ``t + 1``, so student position ``t`` takes entry ``t + 1``.
A row of ``L`` real tokens fills positions ``0 .. L-2``; position ``L-1`` and the
padding have no teacher distribution (collation never makes them targets; a
target there is an error) and hold a uniform placeholder. Prompt log-probs are
raw (temperature 1), so the signal has ``temperature = 1``.

Resume: with a cache every finished row is appended (and fsynced) as it arrives,
so a rerun after a crash or a failed request does not ask for it again.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stillroom.config.schema import RemoteConfig
from stillroom.data.batch import Batch, Example
from stillroom.teachers.http import OpenAIClient, RemoteError
from stillroom.teachers.remote_cache import RemoteCache, ids_digest
from stillroom.teachers.signal import Fingerprint, TeacherSignal, real_ids, tail_logmass
from stillroom.teachers.store_format import SequenceSignal

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

__all__ = ["STUDENT_VOCAB", "RemoteCache", "RemoteError", "RemoteTeacher", "RowExtra", "parse_prompt_logprobs",
           "remote_cache_path", "remote_from_run", "run_remote"]


# ----------------------------------------------------------------------------- parsing


STUDENT_VOCAB = ("the student's vocabulary", "the server's tokenizer differs from the student's")
"""How an id outside the vocabulary is explained: (whose vocabulary, what is wrong and the fix). A cross-tokenizer
run checks against the teacher's (:mod:`stillroom.teachers.remote_cross`)."""


def parse_prompt_logprobs(entries: Any, n_tokens: int, k: int, vocab_size: int, where: str,
                          vocabulary: tuple[str, str] = STUDENT_VOCAB) -> tuple[np.ndarray, np.ndarray]:
    """vLLM ``prompt_logprobs`` of one prompt -> ``(ids [n-1, k] int32, logprobs [n-1, k] float32)``.

    Row ``t`` is entry ``t + 1`` (see the module docstring), its k most likely
    tokens by decreasing log-prob (ties broken by ``rank``). Entry values may be
    ``{"logprob": x, ...}`` dicts or bare numbers. ``where`` prefixes errors; ids must lie in
    ``[0, vocab_size)`` of ``vocabulary`` (:data:`STUDENT_VOCAB`: its name, and the fix when they do not).
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
                raise RemoteError(f"{where}: token id {tid} at prompt_logprobs[{j}] is outside {vocabulary[0]} "
                                  f"[0, {vocab_size}); {vocabulary[1]}")
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


# ----------------------------------------------------------------------------- teacher


@dataclass(frozen=True)
class RowExtra:
    """What one row sends beside its token ids (a VLM row: its image, :mod:`stillroom.teachers.remote_vlm`).

    ``payload``: request fields added to (or replacing) the text request's; ``digest``: what they send, hashed
    into the row's cache key, so a cached answer is reused only for the same ids *and* the same extra input.
    """

    payload: dict
    digest: str


class RemoteTeacher:
    """The teacher source of a remote server (see the module docstring); settings from ``cfg``.

    ``cache``: a :class:`RemoteCache`, a file path for one, or None (then ``cfg.cache`` if set, else no
    cache). ``client``: an :class:`OpenAIClient` to share; by default one is made from ``cfg`` with
    ``sleep`` (injectable for tests). ``resume_hint`` is appended to a request failure in
    :meth:`signal`, so whoever runs it learns how to go on (a run says ``stillroom run ... --resume``).
    ``vocabulary``: whose vocabulary ``vocab_size`` is, for errors (:data:`STUDENT_VOCAB`).
    """

    def __init__(self, cfg: RemoteConfig, *, vocab_size: int, fingerprint: Fingerprint | None = None,
                 cache: RemoteCache | str | os.PathLike | None = None, client: OpenAIClient | None = None,
                 sleep: Callable[[float], None] = time.sleep, resume_hint: str | None = None,
                 vocabulary: tuple[str, str] = STUDENT_VOCAB) -> None:
        self.cfg, self.vocab_size, self.fingerprint, self.resume_hint = cfg, vocab_size, fingerprint, resume_hint
        self.vocabulary = vocabulary
        self._owns_client = client is None
        self.client = client if client is not None else OpenAIClient(cfg, sleep=sleep)
        self._checked = False
        if cache is None and cfg.cache is not None:
            cache = cfg.cache
        try:
            if cfg.top_k > vocab_size:
                raise RemoteError(f"teacher.remote.top_k={cfg.top_k} exceeds the vocabulary size {vocab_size}")
            self.cache = cache if isinstance(cache, RemoteCache) or cache is None else \
                RemoteCache(cache, model=cfg.model, top_k=cfg.top_k)
        except BaseException:
            self.close()
            raise

    @property
    def requests_sent(self) -> int:
        """HTTP requests made so far by the client (every attempt counts)."""
        return self.client.requests_sent

    @property
    def checked(self) -> bool:
        """Whether :meth:`check_server` has passed for this teacher (model and, with a fingerprint, tokenizer)."""
        return self._checked

    def check_server(self) -> dict | None:
        """Ask ``/models``: the model must be served and, with a fingerprint, share the student's tokenizer.

        Returns the model's entry (None without a listing) and records that the check passed, so
        :meth:`signal` does not ask again. A refused connection here fails at once (no server).
        """
        entry = self.client.check_server(self.fingerprint.tokenizer_hash if self.fingerprint is not None else None)
        self._checked = True
        return entry

    def _fetch_row(self, ids: list[int], extra: RowExtra | None = None) -> tuple[np.ndarray, np.ndarray]:
        payload = {"prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": self.cfg.top_k}
        if self.cfg.model is not None:
            payload["model"] = self.cfg.model
        if extra is not None:
            payload.update(extra.payload)
        body = self.client.request("POST", "/completions", payload)
        where = f"POST {self.client.shown_base}/completions"
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise RemoteError(f"{where}: the response has no `choices` list: {str(body)[:160]!r}")
        entries = choices[0].get("prompt_logprobs", body.get("prompt_logprobs"))
        return parse_prompt_logprobs(entries, len(ids), self.cfg.top_k, self.vocab_size, where, self.vocabulary)

    def fetch(self, uids: Sequence[str], rows: Sequence[list[int]],
              extras: Sequence[RowExtra | None] | None = None) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Each row's top-k ``(ids [L-1, K] int32, logprobs [L-1, K] float32)`` (None for a row of < 2 tokens).

        ``rows[b]``: token ids sent as they are (the student's, or a cross-tokenizer teacher's); ``extras[b]``: what
        else row ``b`` sends (:class:`RowExtra`, e.g. its image), or None; ``uids[b]`` with the digest of both keys
        the cache. Cached rows are not asked again; fetched rows are cached as they arrive, so rows finished before
        a failure survive it (the failure then carries ``resume_hint``).
        """
        extras = list(extras) if extras is not None else [None] * len(rows)
        salts = [x.digest if x is not None else None for x in extras]
        keys = [(uid, ids_digest(ids, salt)) for uid, ids, salt in zip(uids, rows, salts)]
        out = [self.cache.get(uid, ids, salt) if self.cache is not None else None
               for uid, ids, salt in zip(uids, rows, salts)]
        todo: dict[tuple[str, str], tuple[list[int], RowExtra | None]] = {}
        for key, ids, extra, got in zip(keys, rows, extras, out):
            if got is None and len(ids) > 1:
                todo.setdefault(key, (list(ids), extra))
        fetched: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

        def keep(key: tuple[str, str], result: tuple[np.ndarray, np.ndarray]) -> None:
            fetched[key] = result
            if self.cache is not None:
                ids, extra = todo[key]
                self.cache.put(key[0], ids, *result, salt=extra.digest if extra is not None else None)

        try:
            self.client.parallel(lambda key: self._fetch_row(*todo[key]), list(todo), keep)
        except RemoteError as err:
            if self.resume_hint is None:
                raise
            stopped = RemoteError(f"{err}. {self.resume_hint}")
            stopped.fix = "resume_run"  # the CLI prints the exact `stillroom run ... --resume` line
            raise stopped from err
        return [got if got is not None else fetched.get(key) for key, got in zip(keys, out)]

    def row_extras(self, batch: Batch) -> list[RowExtra | None] | None:
        """What each row of ``batch`` sends beside its token ids: nothing for a text teacher (a subclass that sends
        images overrides it)."""
        return None

    def signal(self, batch: Batch) -> TeacherSignal:
        """Top-k teacher signal for ``batch`` aligned with the student's positions (``[B, T, K]``).

        Rows must be right-padded (``attention_mask`` = ones then zeros). Cached rows are not asked again;
        fetched rows are cached as they arrive, so rows finished before a failure survive it.
        """
        if self.fingerprint is not None and not self.checked:
            self.check_server()
        bsz, width = batch.input_ids.shape
        k = self.cfg.top_k
        rows = self.fetch(batch.uids, real_ids(batch), self.row_extras(batch))
        ids_btk = torch.arange(k, dtype=torch.long).expand(bsz, width, k).clone()
        lp_btk = torch.full((bsz, width, k), -math.log(self.vocab_size), dtype=torch.float32)
        known_bt = torch.zeros((bsz, width), dtype=torch.bool)
        for b, row in enumerate(rows):
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

    def generate(self, prompts: Sequence[str | list[dict]], n: int = 1, **settings: Any) -> list[list[str]]:
        """``n`` sampled texts per prompt from this teacher's server, for one-off use.

        Kept for callers that hold a :class:`RemoteTeacher`; the implementation (and ``stillroom generate``)
        is :func:`stillroom.datagen.remote_complete.generate`, on this same client.
        """
        from stillroom.datagen.remote_complete import generate

        return generate(self.client, prompts, n, **settings)

    def close(self) -> None:
        """Close the cache, and the client unless it was handed in (then its owner closes it)."""
        if self._owns_client:
            self.client.close()
        if getattr(self, "cache", None) is not None:
            self.cache.close()


def remote_cache_path(cfg: "RunConfig") -> Path:
    """``teacher.remote.cache`` (``~`` expanded), or ``<run folder>/remote_cache.jsonl`` when it is null."""
    if cfg.teacher.remote.cache:
        return Path(cfg.teacher.remote.cache).expanduser()
    return cfg.run_dir / "remote_cache.jsonl"


def remote_from_run(cfg: "RunConfig", *, vocab_size: int, fingerprint: Fingerprint | None) -> RemoteTeacher:
    """The remote teacher of a run (``teacher.source: remote``), checked before step 0.

    Its rows are cached in :func:`remote_cache_path` (a rerun or ``--resume`` asks only what is
    missing), and a request failure during training says so. Prompt log-probs are at temperature 1,
    so ``loss.loss_temperature`` must be 1.
    """
    check_remote_temperature(cfg)
    return checked_server(run_remote(cfg, vocab_size=vocab_size, fingerprint=fingerprint))


def checked_server(teacher):
    """``teacher`` once its server has answered :meth:`check_server`; closed (its cache lock released) when not."""
    try:
        teacher.check_server()
    except BaseException:
        teacher.close()
        raise
    return teacher


def run_remote(cfg: "RunConfig", *, vocab_size: int, fingerprint: Fingerprint | None,
               vocabulary: tuple[str, str] = STUDENT_VOCAB) -> RemoteTeacher:
    """A run's :class:`RemoteTeacher` on ``cfg.teacher.remote``, cached in :func:`remote_cache_path`, whose request
    failures say how to resume; the server is not asked yet (:func:`remote_from_run` checks it)."""
    cache = remote_cache_path(cfg)
    return RemoteTeacher(cfg.teacher.remote, vocab_size=vocab_size, fingerprint=fingerprint, cache=cache,
                         resume_hint=resume_hint(cache), vocabulary=vocabulary)


def check_remote_temperature(cfg: "RunConfig") -> None:
    """Prompt log-probs are at temperature 1 and cannot be re-tempered: ``loss.loss_temperature`` must be 1."""
    if abs(cfg.loss.loss_temperature - 1.0) > 1e-9:
        raise RemoteError(f"teacher.source=remote gives prompt log-probs at temperature 1, but loss.loss_temperature "
                          f"is {cfg.loss.loss_temperature}; top-k log-probs cannot be re-tempered: set it to 1")


def resume_hint(cache: Path) -> str:
    """What a request failure during a run adds: where the answered rows are and how to go on."""
    return (f"The run stopped; rows answered so far are kept in {cache}. Once the server answers again, continue "
            "with `stillroom run` and the same recipe and overrides plus --resume: only the missing rows are asked")
