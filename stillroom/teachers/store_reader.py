"""Reading a teacher store: manifest checks before step 0, random access by uid, checksums.

:class:`StoreReader` opens a store folder, checks that it is complete and that
every shard file exists with the recorded size (cheap, at open), and serves
sequences by uid. A shard is read whole the first time one of its sequences is
asked for, its sha256 compared with the manifest's (a corrupted or truncated
shard raises :class:`StoreCorrupted` naming the file), and kept in an LRU cache
bounded by ``cache_bytes`` (stores smaller than that are held in RAM entirely,
so a shuffling sampler costs one read per shard per run).

:class:`StoreTeacher` is the teacher source for ``teacher.source: store``: its
``signal(batch)`` returns a top-k :class:`TeacherSignal` for ``batch.uids``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch

from stillroom.data.batch import Batch
from stillroom.models.precision import torch_dtype
from stillroom.teachers.signal import Fingerprint, TeacherSignal
from stillroom.teachers.store_format import (
    FORMAT,
    REBUILD,
    RERUN,
    StoreCorrupted,
    StoreError,
    StoreMismatch,
    decode_logprobs,
    header_differences,
    id_dtype_for,
    legacy_fields,
    read_manifest,
    sha256_bytes,
    sha256_file,
)
from stillroom.teachers.store_ids import decode_ids
from stillroom.teachers.store_sampled import loss_rows, unpack_tail_draws

# Fields a run must agree on with the store (in the order they are reported).
RUN_FIELDS = ("tokenizer_mode", "tokenizer_hash", "student_tokenizer_hash", "vocab_size", "teacher",
              "data_fingerprint", "signal", "k", "loss_temperature", "logprob_dtype")


def run_expectation(*, fingerprint: Fingerprint, data_fingerprint: str, k: int, loss_temperature: float,
                    logprob_dtype: str, tokenizer_mode: str = "same", student_tokenizer_hash: str = "",
                    signal: str = "topk") -> dict:
    """What a run expects of its store (compared field by field with the manifest). A ``cross`` run passes the
    teacher's tokenizer hash and vocabulary in ``fingerprint`` and the student's hash separately."""
    from stillroom.teachers.store_format import parse_identity

    return {"teacher": parse_identity(fingerprint.teacher), "tokenizer_hash": fingerprint.tokenizer_hash,
            "vocab_size": fingerprint.vocab_size, "data_fingerprint": data_fingerprint, "k": int(k),
            "loss_temperature": float(loss_temperature), "logprob_dtype": logprob_dtype,
            "tokenizer_mode": tokenizer_mode, "student_tokenizer_hash": student_tokenizer_hash, "signal": signal}


_HINTS = {
    "tokenizer_mode": "a cross store holds the teacher's top-k at its own positions of the student's text, a same "
    "store at the shared tokens: write the store with the run's teacher.tokenizer_mode",
    "student_tokenizer_hash": "the teacher read sequences of another student tokenizer (student.tokenizer or "
    "student.new_tokenizer changed)",
    "tokenizer_hash": "the store was written with another tokenizer",
    "vocab_size": "the store was written for another vocabulary",
    "teacher": "the store was written by another teacher (or the same one in another teacher.dtype)",
    "data_fingerprint": "the store covers other training data (data.sources, seq_len, pack, limit, "
    "heldout_fraction or the tokenizer changed)",
    "signal": "teacher.store.signal differs from the store's (topk: top-k log-probs; sampled: drawn tokens; "
    "topk_sampled: both); set it to the store's",
    "k": "teacher.store.k differs from the store's k (leave it unset to use the store's)",
    "loss_temperature": "top-k log-probs cannot be re-tempered: loss.loss_temperature must equal the store's",
    "logprob_dtype": "teacher.store.logprob_dtype differs from the store's (leave it unset to use the store's)",
}


class StoreReader:
    def __init__(self, folder: str | Path, *, cache_bytes: int = 2 << 30) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        m = self.manifest
        if not m.get("complete"):
            raise StoreError(
                f"teacher store {self.folder} is incomplete ({len(m.get('shards', []))}/{m.get('num_shards')} "
                "shards): the `stillroom cache-teacher` that wrote it was interrupted; run it again with the same "
                "recipe and overrides to finish it (finished shards are kept)", fix="resume"
            )
        self.k = int(m["k"])
        self.vocab_size = int(m["vocab_size"])
        self.temperature = float(m["loss_temperature"])
        self.signal = m.get("signal", "topk")
        self.id_dtype = torch_dtype(m.get("id_dtype") or id_dtype_for(int(m["vocab_size"])))
        self.width = self.k + int(m.get("tail_draws") or 0)
        """Slots per position a read gives: k, plus the tail's draws of a ``topk_sampled`` store."""
        self.hidden_layers = [int(i) for i in m.get("hidden_layers", [])]
        self.shards = sorted(m["shards"], key=lambda e: e["index"])
        if [e["index"] for e in self.shards] != list(range(int(m["num_shards"]))):
            raise StoreCorrupted(f"{self.folder / 'manifest.json'}: shard list is not 0..{m['num_shards'] - 1}; "
                                 f"{REBUILD}", fix="overwrite")
        self.index: dict[str, tuple[int, int]] = {}
        for e in self.shards:
            path = self.folder / e["file"]
            if not path.is_file():
                raise StoreCorrupted(f"teacher store shard {path} is missing; {RERUN} to rewrite it", fix="resume")
            size = path.stat().st_size
            if size != e["bytes"]:
                raise StoreCorrupted(
                    f"teacher store shard {path} is truncated or altered: {size} bytes, manifest says {e['bytes']}; "
                    f"{RERUN} to rewrite it", fix="resume"
                )
            for row, uid in enumerate(e["uids"]):
                self.index[uid] = (int(e["index"]), row)
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._cached_bytes = 0

    # ------------------------------------------------------------------ checks
    def check_run(self, expected: dict, *, hidden_layers: list[int] | None = None) -> None:
        """Raise :class:`StoreMismatch` naming every field where the store and the run differ."""
        stored = dict(legacy_fields(self.manifest))  # a field a manifest predates: its implied value
        wanted = dict(expected)
        # The teacher is compared by its identity string (name, revision and weight hash together).
        stored["teacher"] = self.manifest.get("teacher", {}).get("identity")
        wanted["teacher"] = expected["teacher"]["identity"] if isinstance(expected.get("teacher"), dict) else expected.get("teacher")
        diffs = header_differences(stored, wanted, [f for f in RUN_FIELDS if f in wanted])
        missing = sorted(set(hidden_layers or []) - set(self.hidden_layers))
        if missing:
            diffs.append(f"hidden_layers (store {self.hidden_layers}, the loss terms need teacher layers {missing}; "
                         "add them to teacher.store.hidden_layers and rebuild)")
        if diffs:
            lines = [f"  - {d}" + (f": {_HINTS[d.split(' ')[0]]}" if d.split(" ")[0] in _HINTS else "") for d in diffs]
            raise StoreMismatch(
                f"teacher store {self.folder} does not match this run:\n" + "\n".join(lines)
                + f"\n{REBUILD[0].upper() + REBUILD[1:]} (it replaces this store), or point teacher.store.path at a "
                "matching store", fix="overwrite"
            )

    def verify(self) -> int:
        """Check every shard's sha256 now (reads the whole store); returns the number of bytes checked."""
        total = 0
        for e in self.shards:
            path = self.folder / e["file"]
            if sha256_file(path) != e["sha256"]:
                raise StoreCorrupted(f"teacher store shard {path} fails its sha256 check (corrupted); "
                                     f"{RERUN} to rewrite it", fix="resume")
            total += e["bytes"]
        return total

    # ------------------------------------------------------------------ access
    def shard(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors of shard ``index`` (read and sha256-checked on first use, then LRU-cached)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        from safetensors.torch import load

        e = self.shards[index]
        path = self.folder / e["file"]
        data = path.read_bytes()
        if len(data) != e["bytes"]:
            raise StoreCorrupted(f"teacher store shard {path} is truncated: {len(data)} of {e['bytes']} bytes; "
                                 f"{RERUN} to rewrite it", fix="resume")
        if sha256_bytes(data) != e["sha256"]:
            raise StoreCorrupted(f"teacher store shard {path} fails its sha256 check (corrupted); "
                                 f"{RERUN} to rewrite it", fix="resume")
        tensors = load(data)
        offsets = tensors["offsets"]
        if offsets.numel() != len(e["uids"]) + 1 or int(offsets[-1]) != e["tokens"]:
            raise StoreCorrupted(f"teacher store shard {path}: offsets do not match the manifest; {REBUILD}",
                                 fix="overwrite")
        tensors = decode_ids(tensors, self.id_dtype)  # id_code: ranked: the plain ids back, once per load
        self._cache[index] = tensors
        self._cached_bytes += _nbytes(tensors)
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= _nbytes(old)
        return tensors

    def locate(self, uid: str) -> tuple[dict[str, torch.Tensor], int, int]:
        """``(shard tensors, lo, hi)``: the token rows of sequence ``uid``."""
        try:
            shard_i, row = self.index[uid]
        except KeyError:
            raise StoreMismatch(
                f"sequence {uid!r} is not in the teacher store {self.folder}; the store covers other data: {REBUILD}",
                fix="overwrite"
            ) from None
        tensors = self.shard(shard_i)
        offsets = tensors["offsets"]
        return tensors, int(offsets[row]), int(offsets[row + 1])

    def sequence(self, uid: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """``(ids [T, K] int64, logprobs [T, K] fp32, tail [T] fp32, {layer: [T, H] fp32})`` of ``uid``."""
        tensors, lo, hi = self.locate(uid)
        ids = tensors["topk_ids"][lo:hi].long()
        lp, tail = (None, None) if self.signal == "sampled" else decode_logprobs(tensors, lo, hi)
        tail_ids = None
        if self.signal == "topk_sampled":
            packed = "tail_counts" in tensors  # draw: allocated
            tail_ids = unpack_tail_draws(tensors, lo, hi) if packed else tensors["tail_ids"][lo:hi].long()
        ids, lp, tail = loss_rows(self.signal, ids, lp, tail, tail_ids)
        hidden = {i: tensors[f"hidden.{i}"][lo:hi].float() for i in self.hidden_layers}
        return ids, lp, tail, hidden

    def summary(self) -> str:
        m = self.manifest
        bpt = m["store_bytes"] / max(m["tokens"], 1)
        return (f"teacher store {self.folder}: {m['sequences']} sequences, {m['tokens']} positions, "
                f"{m['num_shards']} shard(s), {m['store_bytes'] / 2**20:.1f} MiB ({bpt:.1f} bytes/position); "
                + (f"{m['k']} tokens drawn per position from V={m['vocab_size']} at T={m['loss_temperature']}, "
                   if self.signal == "sampled" else
                   f"k={m['k']} of V={m['vocab_size']}, {m['logprob_dtype']} log-probs at T={m['loss_temperature']}, "
                   + (f"{m['tail_draws']} tail tokens drawn per position"
                      + (" on average (allocated), " if m.get("draw") == "allocated" else ", ")
                      if self.signal == "topk_sampled" else ""))
                + ("ids coded by rank (id_code ranked); " if m.get("id_code") == "ranked" else "")
                + f"hidden layers {m['hidden_layers'] or 'none'}; teacher {m['teacher']['identity']}"
                + ("; teacher positions of the student's text (tokenizer_mode cross)"
                   if m.get("tokenizer_mode") == "cross" else ""))


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes a cached shard holds in memory (decoded: more than its file for a ``ranked`` store)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class StoreTeacher:
    """Teacher source reading a store: ``signal(batch)`` -> top-k :class:`TeacherSignal` for ``batch.uids``.

    Padding positions get a harmless uniform distribution on k ids (the losses never read them).
    """

    def __init__(self, reader: StoreReader, *, fingerprint: Fingerprint | None = None,
                 hidden_layers: list[int] | None = None, output_device: torch.device | str = "cpu") -> None:
        self.reader = reader
        self.fingerprint = fingerprint
        self.hidden_layers = sorted(set(hidden_layers or []))
        missing = set(self.hidden_layers) - set(reader.hidden_layers)
        if missing:
            raise StoreMismatch(f"teacher store {reader.folder} has no hidden states for layers {sorted(missing)}")
        self.output_device = torch.device(output_device)

    def signal(self, batch: Batch) -> TeacherSignal:
        lengths = batch.attention_mask.sum(-1).tolist()
        rows = []
        for b, uid in enumerate(batch.uids):
            row = self.reader.sequence(uid)
            if row[0].shape[0] != int(lengths[b]):
                raise StoreMismatch(f"sequence {uid!r}: {row[0].shape[0]} positions in the teacher store "
                                    f"{self.reader.folder} but {int(lengths[b])} in the batch; the store covers "
                                    f"other data: {REBUILD}", fix="overwrite")
            rows.append(row)
        return batch_signal(batch, rows, width=self.reader.width, vocab_size=self.reader.vocab_size,
                            temperature=self.reader.temperature, hidden_layers=self.hidden_layers,
                            fingerprint=self.fingerprint, device=self.output_device)


def batch_signal(batch: Batch, rows: list, *, width: int, vocab_size: int, temperature: float,
                 hidden_layers: list[int], fingerprint: Fingerprint | None, device: torch.device) -> TeacherSignal:
    """The top-k :class:`TeacherSignal` ``[B, T, W]`` of ``batch`` from one row per sequence, ``(ids [n, W_b],
    log-probs [n, W_b], tail [n], {layer: [n, H]})`` over its ``n`` real positions (a store's rows, or the memo's);
    ``W``: ``width``, or the widest row's (allocated tail draws), narrower rows padded with zero-mass entries.
    Padding positions get a harmless uniform distribution on ``W`` ids (the losses never read them)."""
    bsz, length = batch.input_ids.shape
    width = max([width] + [row[0].shape[1] for row in rows])  # draw: allocated: each sequence's rows their own
    ids_btk = torch.arange(width, dtype=torch.long).remainder(vocab_size).expand(bsz, length, width).clone()
    lp_btk = torch.full((bsz, length, width), -math.log(width), dtype=torch.float32)
    tail_bt = torch.full((bsz, length), float("-inf"), dtype=torch.float32)
    hidden: dict[int, torch.Tensor] = {}
    for b, (ids, lp, tail, hs) in enumerate(rows):
        n, w = ids.shape
        ids_btk[b, :n, :w] = ids
        lp_btk[b, :n, :w] = lp
        lp_btk[b, :n, w:] = float("-inf")
        tail_bt[b, :n] = tail
        for i in hidden_layers:
            if i not in hidden:
                hidden[i] = torch.zeros(bsz, length, hs[i].shape[-1], dtype=torch.float32)
            hidden[i][b, :n] = hs[i]
    return TeacherSignal(
        topk_ids_btk=ids_btk.to(device), topk_logprobs_btk=lp_btk.to(device), tail_logmass_bt=tail_bt.to(device),
        temperature=temperature, hidden_states={i: h.to(device) for i, h in hidden.items()}, fingerprint=fingerprint,
    )


def describe_store(folder: str | Path) -> str:
    """One-paragraph summary of a store (for the CLI)."""
    return StoreReader(folder).summary()


__all__ = ["FORMAT", "RUN_FIELDS", "StoreReader", "StoreTeacher", "describe_store", "run_expectation"]
