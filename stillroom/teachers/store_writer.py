"""Writing a teacher store: deterministic shards, atomic files, resumable.

The public pieces (also used by the remote teacher to store what a server sent):

* :func:`make_header` - the store's identity and counts, from the training examples;
* :class:`StoreWriter` - opens a folder (new, or a partial store of the *same*
  header to resume), says which shards are still :attr:`~StoreWriter.pending`
  and which examples each holds (:meth:`~StoreWriter.shard_examples`), writes one
  shard at a time (:meth:`~StoreWriter.write_shard`), then :meth:`~StoreWriter.finish`;
* :func:`write_store` - the loop above around a ``compute(examples) ->
  list[SequenceSignal]`` callback;
* :func:`model_compute` - that callback for an in-process Hugging Face model.

Determinism: which examples go into which shard depends only on the example
lengths and ``shard_tokens``; each shard is computed from its own examples in
fixed batches; files are serialised byte-stably (sorted JSON, one safetensors
metadata key). So an interrupted run resumed later writes the same bytes as an
uninterrupted one. Each shard is written to a temp file, fsynced and renamed,
then recorded (with its sha256) in ``manifest.json`` (``"complete": false`` until
the last shard); on resume, recorded shards whose sha256 still matches are kept,
everything else is recomputed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from stillroom.data.batch import Example
from stillroom.teachers.store_format import (
    FORMAT,
    MANIFEST,
    SHARD_DIR,
    SequenceSignal,
    StoreError,
    StoreHeader,
    encode_rows,
    format_version,
    header_differences,
    legacy_fields,
    parse_identity,
    sha256_bytes,
    sha256_file,
    shard_name,
    write_json_atomic,
)
from stillroom.teachers.store_ids import encode_ids
from stillroom.teachers.store_sampled import row_signal

Compute = Callable[[list[Example]], list[SequenceSignal]]


def plan_shards(lengths: list[int], shard_tokens: int) -> list[list[int]]:
    """Example indices per shard: consecutive examples until a shard holds >= ``shard_tokens`` positions."""
    shards: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i, n in enumerate(lengths):
        current.append(i)
        tokens += n
        if tokens >= shard_tokens:
            shards.append(current)
            current, tokens = [], 0
    if current:
        shards.append(current)
    return shards


def make_header(
    examples: list[Example], *, teacher_identity: str, tokenizer_hash: str, vocab_size: int, k: int,
    loss_temperature: float, logprob_dtype: str, hidden_layers: list[int] | None = None,
    hidden_size: int | None = None, shard_tokens: int = 262144, tokenizer_mode: str = "same",
    student_tokenizer_hash: str = "", signal: str = "topk", tail_draws: int = 0, draw: str = "multinomial",
    draw_seed: int = 0, id_code: str = "plain",
) -> StoreHeader:
    """The header of a store of ``examples`` (the training split, in order; a ``cross`` store: the student's
    sequences in the teacher's tokens, :func:`stillroom.teachers.store_cross.cross_store_examples`)."""
    from stillroom.teachers.store_format import data_fingerprint

    lengths = [len(e.input_ids) for e in examples]
    return StoreHeader(
        teacher=parse_identity(teacher_identity), tokenizer_hash=tokenizer_hash, vocab_size=int(vocab_size), k=int(k),
        loss_temperature=float(loss_temperature), logprob_dtype=logprob_dtype,
        data_fingerprint=data_fingerprint(examples), hidden_layers=list(hidden_layers or []),
        hidden_size=hidden_size if hidden_layers else None, shard_tokens=int(shard_tokens),
        sequences=len(examples), tokens=sum(lengths), target_tokens=sum(sum(e.target[1:]) for e in examples),
        text_bytes=sum(e.n_bytes for e in examples), num_shards=len(plan_shards(lengths, shard_tokens)),
        tokenizer_mode=tokenizer_mode, student_tokenizer_hash=student_tokenizer_hash, signal=signal,
        tail_draws=tail_draws if signal == "topk_sampled" else 0, draw=draw, draw_seed=int(draw_seed),
        id_code=id_code,
    )


class StoreWriter:
    """Writes the shards of one store; resumes a partial store with the same header.

    ``examples`` are the training examples in order (they fix the shard plan and
    must be the ones ``header`` was made from); the writer reads their ``uid`` and, unless
    ``lengths`` gives the positions of each (an image store: its views), ``len(input_ids)``.
    ``overwrite=True`` deletes an existing store at ``folder`` whose header differs instead of refusing.
    """

    def __init__(self, folder: str | Path, header: StoreHeader, examples: list[Example], *, overwrite: bool = False,
                 log: Callable[[str], None] = print, lengths: list[int] | None = None) -> None:
        self.folder = Path(folder)
        self.header = header
        self.examples = examples
        self.log = log
        self.lengths = lengths if lengths is not None else [len(e.input_ids) for e in examples]
        self.plan = plan_shards(self.lengths, header.shard_tokens)
        if len(self.plan) != header.num_shards or len(examples) != header.sequences:
            raise StoreError("StoreWriter: the examples are not the ones the header was made from")
        self.entries: dict[int, dict] = {}
        self._lock = None
        self._open(overwrite)

    # ------------------------------------------------------------------ opening / resuming
    def _open(self, overwrite: bool) -> None:
        manifest_path = self.folder / MANIFEST
        if manifest_path.exists():
            try:
                old = json.loads(manifest_path.read_text("utf-8"))
            except json.JSONDecodeError:
                old = {}
            old = legacy_fields(old)
            own_scale = self.header.scale_dtype
            if old.get("scale_dtype") == "float32" and old.get("logprob_dtype") == self.header.logprob_dtype:
                # A store written with float32 scales (before float16 became the default) is resumed or
                # repaired with float32 scales, so that its shards stay consistent and byte-stable.
                self.header.scale_dtype = "float32"
            wanted = self.header.as_dict()
            diffs = header_differences(old, wanted, list(wanted)) if old.get("format") == FORMAT else ["format"]
            if old.get("format_version") != format_version(self.header):
                diffs.append(f"format_version (store {old.get('format_version')!r}, run {format_version(self.header)})")
            if diffs:
                self.header.scale_dtype = own_scale  # a replaced store is written with this run's scales
                if not overwrite:
                    raise StoreError(
                        f"{self.folder} already holds a teacher store for another run: {'; '.join(diffs)}. "
                        "Delete it, set teacher.store.path to another folder, or pass --overwrite to replace it",
                        fix="overwrite",
                    )
                self.log(f"overwriting the teacher store at {self.folder} ({'; '.join(diffs)})")
                shutil.rmtree(self.folder)
            else:
                for entry in old.get("shards", []):
                    if self._entry_valid(entry):
                        self.entries[int(entry["index"])] = entry
                kept = len(self.entries)
                if old.get("complete") and kept == self.header.num_shards:
                    self.log(f"teacher store {self.folder} is already complete ({kept} shards)")
                else:
                    self.log(f"resuming teacher store {self.folder}: {kept}/{self.header.num_shards} shards done")
        elif self.folder.exists() and any(self.folder.iterdir()) and not (self.folder / SHARD_DIR).is_dir():
            # Never delete a folder that does not look like a store, even with overwrite.
            raise StoreError(f"{self.folder} exists, is not empty and is not a teacher store; choose another folder")
        (self.folder / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        for tmp in list(self.folder.glob("*.tmp")) + list((self.folder / SHARD_DIR).glob("*.tmp")):
            tmp.unlink()  # left by an interrupted write

    def _acquire_lock(self) -> None:
        import fcntl

        self._lock = open(self.folder / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise StoreError(f"another process is writing the teacher store at {self.folder}") from err

    def _entry_valid(self, entry: dict) -> bool:
        try:
            index = int(entry["index"])
            path = self.folder / entry["file"]
            want_uids = [self.examples[i].uid for i in self.plan[index]]
        except (KeyError, ValueError, IndexError):
            return False
        if entry.get("uids") != want_uids or not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return False
        if sha256_file(path) != entry.get("sha256"):
            self.log(f"{path}: sha256 mismatch; recomputing it")
            return False
        return True

    # ------------------------------------------------------------------ writing
    @property
    def pending(self) -> list[int]:
        """Indices of the shards not written yet, in order."""
        return [i for i in range(len(self.plan)) if i not in self.entries]

    def shard_examples(self, index: int) -> list[Example]:
        """The examples of shard ``index``, in order (compute their signals, then :meth:`write_shard`)."""
        return [self.examples[i] for i in self.plan[index]]

    def write_shard(self, index: int, rows: list[SequenceSignal]) -> dict:
        """Encode, write (atomically) and record shard ``index``. ``rows`` follow :meth:`shard_examples`."""
        from safetensors.torch import save

        expected = self.shard_examples(index)
        if [r.uid for r in rows] != [e.uid for e in expected]:
            raise StoreError(f"shard {index}: rows must be the sequences {expected[0].uid}..{expected[-1].uid} in order")
        for r, i in zip(rows, self.plan[index]):
            if r.length != self.lengths[i]:
                raise StoreError(f"sequence {r.uid}: {r.length} positions computed but it has {self.lengths[i]}")
        tensors = encode_rows(rows, self.header)
        if self.header.id_code == "ranked":
            tensors = encode_ids(tensors, self.header.vocab_size)
        uids = [r.uid for r in rows]
        meta = {"format": FORMAT, "format_version": format_version(self.header), "index": index, "uids": uids,
                "k": self.header.k, "logprob_dtype": self.header.logprob_dtype,
                "loss_temperature": self.header.loss_temperature}
        # One metadata key: safetensors writes several keys in an unstable order.
        data = save(tensors, metadata={"stillroom": json.dumps(meta, sort_keys=True)})
        name = shard_name(index)
        path = self.folder / name
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        entry = {"index": index, "file": name, "sha256": sha256_bytes(data), "bytes": len(data),
                 "sequences": len(rows), "tokens": int(tensors["offsets"][-1]), "uids": uids}
        self.entries[index] = entry
        self._write_manifest(complete=False)
        return entry

    def _manifest(self, complete: bool) -> dict:
        shards = [self.entries[i] for i in sorted(self.entries)]
        return {"format": FORMAT, "format_version": format_version(self.header), "complete": complete, **self.header.as_dict(),
                "store_bytes": sum(e["bytes"] for e in shards), "shards": shards}

    def _write_manifest(self, complete: bool) -> None:
        write_json_atomic(self.folder / MANIFEST, self._manifest(complete))

    def finish(self) -> dict:
        """Mark the store complete (every shard written); returns the manifest."""
        if self.pending:
            raise StoreError(f"cannot finish the store: shards {self.pending[:5]} are not written yet")
        manifest = self._manifest(complete=True)
        write_json_atomic(self.folder / MANIFEST, manifest)
        self.close()
        return manifest

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            (self.folder / ".lock").unlink(missing_ok=True)
            self._lock = None


def write_store(folder: str | Path, header: StoreHeader, examples: list[Example], compute: Compute, *,
                overwrite: bool = False, log: Callable[[str], None] = print, lengths: list[int] | None = None) -> dict:
    """Compute and write every pending shard, then finish; returns the manifest (``lengths``: as
    :class:`StoreWriter`'s)."""
    writer = StoreWriter(folder, header, examples, overwrite=overwrite, log=log, lengths=lengths)
    try:
        todo = writer.pending
        for n, index in enumerate(todo):
            writer.write_shard(index, compute(writer.shard_examples(index)))
            log(f"shard {index + 1}/{header.num_shards} written ({n + 1}/{len(todo)} this run)")
        return writer.finish()
    finally:
        writer.close()


def model_compute(model: torch.nn.Module, *, k: int, loss_temperature: float, vocab_size: int, pad_id: int,
                  hidden_layers: list[int] | None = None, batch_size: int = 8, signal: str = "topk",
                  tail_draws: int = 0, draw: str = "multinomial", draw_seed: int = 0) -> Compute:
    """A :data:`Compute` callback running an in-process HF causal LM (no grad), ``batch_size`` sequences at a time.
    ``signal: sampled``: ``k`` draws per position instead of the top k; ``topk_sampled``: the top k and
    ``tail_draws`` draws outside it (draws seeded by ``draw_seed`` and each sequence's uid, made as ``draw`` says:
    the header's)."""
    from stillroom.data.batch import collate

    device = next(model.parameters()).device
    layers = sorted(set(hidden_layers or []))

    @torch.no_grad()
    def compute(examples: list[Example]) -> list[SequenceSignal]:
        out_rows: list[SequenceSignal] = []
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo : lo + batch_size]
            batch = collate(chunk, pad_id)
            out = model(**batch.to(device).model_inputs(), output_hidden_states=bool(layers), use_cache=False)
            logits = out.logits[..., :vocab_size]
            for b, ex in enumerate(chunk):
                n = len(ex.input_ids)
                ids, lp, tail, extra = row_signal(logits[b, :n], ex.uid, signal=signal, k=k, tail_draws=tail_draws,
                                                  loss_temperature=loss_temperature, draw=draw,
                                                  draw_seed=draw_seed)
                hidden = {i: out.hidden_states[i][b, :n].cpu() for i in layers}
                out_rows.append(SequenceSignal(ex.uid, ids, lp, tail, hidden, extra))
        return out_rows

    return compute
