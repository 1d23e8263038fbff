"""On-disk format of a precomputed teacher store (see docs/STORE.md).

A store is a folder::

    manifest.json                     identity, counts, one entry (sha256, uids) per shard
    shards/shard-00000.safetensors    per-token tensors of a run of whole sequences
    shards/shard-00001.safetensors    ...

Every shard holds the sequences of consecutive training examples, flattened on
one token axis ``N`` (all positions of every sequence, ``offsets[s]:offsets[s+1]``
for its ``s``-th sequence; position ``t`` of a sequence is the teacher's
distribution over the token that follows input token ``t``, i.e. exactly what the
student's logits at ``t`` are compared with):

=========================  =================  ==========================================
tensor                     shape              dtype
=========================  =================  ==========================================
``offsets``                ``[S + 1]``        int64
``topk_ids``               ``[N, K]``         smallest of uint8 / int16 / uint16 / int32 holding V
``topk_logprobs``          ``[N, K]``         float16 / bfloat16 / float32 (16/32-bit modes)
``topk_logprob_codes``     ``[N, K]``         uint8 (int8 mode): ``lp = max - code * step``
``topk_logprob_nibbles``   ``[N, ceil(K/2)]`` uint8 (int4 mode): two 4-bit codes per byte
``logprob_max``            ``[N]``            ``scale_dtype`` (int8/int4): float16, or float32 in older stores
``logprob_step``           ``[N]``            ``scale_dtype`` (int8/int4)
``tail_logmass``           ``[N]``            float16 (float32 in float32 mode)
``hidden.<layer>``         ``[N, H]``         bfloat16 (float32 in float32 mode)
=========================  =================  ==========================================

Top-k log-probabilities are ``log_softmax(logits / T)`` at the loss temperature
``T`` recorded in the manifest, sorted by decreasing probability. The tail is
``log(sum of the probabilities outside the top k)`` computed from the complement
(no ``log(1 - sum)`` cancellation), ``-inf`` when k = V.

Readers renormalise the K + 1 bins after dequantisation (``lp -= logsumexp(lp,
tail)``), so that the teacher's bins are a proper distribution and every
divergence on them is >= 0 whatever the storage precision.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from stillroom.data.batch import Example
from stillroom.models.builtin import sha256_file  # noqa: F401 (used by the store writer and reader)
from stillroom.models.precision import torch_dtype
from stillroom.teachers.store_codes import LEVELS, SCALE_DTYPES, decode_quantized, encode_logprobs
from stillroom.teachers.store_codes import dequantize_int8, quantize_int8  # noqa: F401 (public names)
from stillroom.teachers.store_sampled import pack_tail_draws
from stillroom.teachers.store_settings import RECORDED, recorded_settings, taken_note  # noqa: F401 (public names)
from stillroom.teachers.store_settings import header_differences  # noqa: F401 (public name)

FORMAT = "stillroom-teacher-store"
FORMAT_VERSION = 3
"""The newest format this stillroom writes and reads: 3 for ``id_code: ranked`` stores (coded ids), 2 for ``draw:
allocated`` stores (packed tail draws), 1 for every other store (:func:`format_version`); an older reader refuses a
newer version instead of misreading it."""
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
LOGPROB_DTYPES = ("float16", "bfloat16", "float32", "int8", "int4")
SIGNALS = ("topk", "sampled", "topk_sampled")


class StoreError(RuntimeError):
    """A teacher store cannot be used; the message names the file/field and the fix.

    ``fix``: what rebuilds the store, for the CLI to print as a full command: ``"resume"`` (run
    ``stillroom cache-teacher`` again with the same recipe and overrides: it finishes or repairs the store,
    taking k, logprob_dtype and shard_tokens from its manifest), ``"overwrite"`` (the same with
    ``--overwrite``: the store is replaced), or ``None`` (rebuilding does not help).
    """

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


class StoreMismatch(StoreError):
    """The store was written for another teacher, tokenizer, data, k or temperature."""


class StoreCorrupted(StoreError):
    """A shard is missing, truncated or fails its sha256."""


RERUN = "rerun `stillroom cache-teacher` with the recipe and overrides that wrote it"
"""The hint of a store to finish or repair (the CLI adds the full command where it knows the recipe)."""
REBUILD = "rebuild it with `stillroom cache-teacher --overwrite` and the recipe and overrides of the run"
"""The hint of a store that does not fit the run (the CLI adds the full command where it knows the recipe)."""


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.safetensors"


def id_dtype_for(vocab_size: int) -> str:
    """Name of the smallest integer dtype that holds every id in ``[0, vocab_size)``."""
    if vocab_size <= 2**8:
        return "uint8"
    if vocab_size <= 2**15:
        return "int16"
    if vocab_size <= 2**16:
        return "uint16"
    return "int32"


def storage_dtypes(logprob_dtype: str) -> tuple[str, str]:
    """``(tail dtype, hidden dtype)`` names used with a given ``logprob_dtype``."""
    if logprob_dtype not in LOGPROB_DTYPES:
        raise StoreError(f"logprob_dtype {logprob_dtype!r}; valid: {', '.join(LOGPROB_DTYPES)}")
    return ("float32", "float32") if logprob_dtype == "float32" else ("float16", "bfloat16")


def data_fingerprint(examples: Iterable[Example]) -> str:
    """sha256 (hex) over the ordered examples' uids, token ids, packed document lengths and images.

    Two runs share it exactly when they train on the same token sequences in the same order with the same
    identities (what a store's rows are keyed by) and the same attention: blocks packed with ``data.attention:
    within_documents`` hash their ``doc_lens`` too, so a store of the same blocks scored with attention across
    documents is refused. A vision-language example hashes its image file's bytes and preprocessing (the teacher
    read the pixels). Examples without ``doc_lens`` or an image hash as before.
    """
    h, images = hashlib.sha256(), {}
    for ex in examples:
        h.update(ex.uid.encode("utf-8"))
        h.update(b"\x00")
        h.update(",".join(map(str, ex.input_ids)).encode("ascii"))
        if ex.doc_lens is not None:
            h.update(("|docs:" + ",".join(map(str, ex.doc_lens))).encode("ascii"))
        if ex.image is not None:
            if ex.image not in images:
                images[ex.image] = f"{sha256_file(ex.image.path)}:{ex.image.size}:{ex.image.mean}:{ex.image.std}"
            h.update(("|image:" + images[ex.image]).encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def parse_identity(identity: str) -> dict:
    """Split a :class:`~stillroom.models.LoadedModel` identity ``name@revision#sha256:hash``."""
    rest, _, weight = identity.rpartition("#sha256:")
    if not rest:
        rest, weight = identity, ""
    name, sep, revision = rest.rpartition("@")
    if not sep:
        name, revision = rest, ""
    return {"identity": identity, "name": name, "revision": revision, "weight_hash": weight}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- manifest


@dataclass
class StoreHeader:
    """Everything fixed before the first shard is computed (compared on resume and before training)."""

    teacher: dict
    tokenizer_hash: str
    vocab_size: int
    k: int
    loss_temperature: float
    logprob_dtype: str
    data_fingerprint: str
    hidden_layers: list[int] = field(default_factory=list)
    hidden_size: int | None = None
    shard_tokens: int = 262144
    sequences: int = 0
    tokens: int = 0
    target_tokens: int = 0
    text_bytes: int = 0
    num_shards: int = 0
    id_dtype: str = ""
    tail_dtype: str = ""
    hidden_dtype: str = ""
    scale_dtype: str = ""
    """Dtype of the per-position ``logprob_max`` / ``logprob_step`` of the int8 and int4 modes: float16
    (default) or float32 (what stores written before the field existed hold; a manifest without the field
    is read as that). Empty for the unquantised modes."""
    tokenizer_mode: str = "same"
    """``cross``: the teacher's top-k at its own positions of the student's text (``teacher.tokenizer_mode:
    cross``); ``tokenizer_hash`` and ``vocab_size`` are then the teacher's. A manifest without it: ``same``."""
    student_tokenizer_hash: str = ""
    """``cross`` stores: the hash of the student's tokenizer, whose sequences the teacher read (else empty)."""
    signal: str = "topk"
    """``sampled``: ``topk_ids`` holds k draws from the teacher per position, sorted, and no log-probs or tail
    (:mod:`~stillroom.teachers.store_sampled`). A manifest without it: ``topk``."""
    tail_draws: int = 0
    """``topk_sampled``: draws per position from the teacher outside its top k (``tail_ids [N, tail_draws]``; with
    ``draw: allocated`` on average: ``tail_counts [N]`` uint8 and ``tail_ids [sum of counts]``)."""
    draw: str = ""
    """How the sampled signals draw (``teacher.store.draw``): ``multinomial`` (independent draws; also what a
    manifest without the field means), ``systematic`` (one uniform offset, evenly spaced points through the
    CDF) or ``allocated`` (``topk_sampled`` only: independent draws, a sequence's shared out over its positions;
    format version 2); empty for ``topk``."""
    draw_seed: int = 0
    """The seed of the sampled signals' draws (with each sequence's uid): another seed, another realisation of
    the same estimator (to measure how much one store's draws move a result). A manifest without it: 0; always
    0 for ``topk``."""
    id_code: str = "plain"
    """``ranked``: each shard codes its ids by their rank in its own frequency table (:mod:`~stillroom.teachers.
    store_ids`; format version 3). A manifest without it: ``plain`` (fixed-width ``id_dtype`` integers)."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.k > self.vocab_size:
            raise StoreError(f"teacher.store.k={self.k} must lie in [1, vocab_size={self.vocab_size}]")
        tail, hidden = storage_dtypes(self.logprob_dtype)
        self.id_dtype = self.id_dtype or id_dtype_for(self.vocab_size)
        self.tail_dtype = self.tail_dtype or tail
        self.hidden_dtype = self.hidden_dtype or hidden
        if self.logprob_dtype in LEVELS:
            self.scale_dtype = self.scale_dtype or "float16"
            if self.scale_dtype not in SCALE_DTYPES:
                raise StoreError(f"scale_dtype {self.scale_dtype!r}; valid: {', '.join(SCALE_DTYPES)}")
        elif self.scale_dtype:
            raise StoreError(f"scale_dtype {self.scale_dtype!r} is only for logprob_dtype int8 or int4, "
                             f"not {self.logprob_dtype!r}")
        if self.signal not in SIGNALS:
            raise StoreError(f"signal {self.signal!r}; valid: {', '.join(SIGNALS)}")
        self.draw = "" if self.signal == "topk" else (self.draw or "multinomial")
        if self.draw not in ("", "multinomial", "systematic", "allocated") or (
                self.draw == "allocated" and self.signal != "topk_sampled"):
            raise StoreError(f"draw {self.draw!r} with signal {self.signal!r}; valid: multinomial, systematic, or "
                             "allocated with signal topk_sampled")
        if self.signal == "topk":
            self.draw_seed = 0
        elif self.draw_seed < 0:
            raise StoreError(f"draw_seed {self.draw_seed} must be >= 0")
        if self.id_code not in ("plain", "ranked"):
            raise StoreError(f"id_code {self.id_code!r}; valid: plain, ranked")
        if self.tokenizer_mode not in ("same", "cross"):
            raise StoreError(f"tokenizer_mode {self.tokenizer_mode!r}; valid: same, cross")
        self.hidden_layers = sorted(set(int(i) for i in self.hidden_layers))
        if self.hidden_layers and self.hidden_size is None:
            raise StoreError("a store with hidden_layers needs hidden_size")

    def as_dict(self) -> dict:
        return asdict(self)


def legacy_fields(manifest: dict) -> dict:
    """``manifest`` with the fields that stores written before they existed imply filled in
    (``scale_dtype``: float32 for int8, empty otherwise; ``tokenizer_mode``: same; no student tokenizer)."""
    if manifest.get("format") != FORMAT:
        return manifest
    implied = {"tokenizer_mode": "same", "student_tokenizer_hash": "", "signal": "topk",
               "draw": "" if manifest.get("signal", "topk") == "topk" else "multinomial", "draw_seed": 0,
               "id_code": "plain"}
    if "scale_dtype" not in manifest:
        implied["scale_dtype"] = "float32" if manifest.get("logprob_dtype") == "int8" else ""
    return {**implied, **manifest}


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON (sorted keys, fixed formatting: byte-stable) via a temp file + fsync + rename."""
    tmp = path.with_name(path.name + ".tmp")
    data = (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode("utf-8")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        import os

        os.fsync(f.fileno())
    tmp.replace(path)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise StoreError(
            f"{path} not found: {folder} is not a teacher store (`stillroom cache-teacher` with the run's recipe "
            "and overrides writes it there, or set teacher.store.path to a store folder)", fix="resume"
        )
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreCorrupted(f"{path}: not valid JSON ({err}); {REBUILD}", fix="overwrite") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{path}: format {got!r} is not {FORMAT!r}: {folder} is not a teacher store; set "
                         "teacher.store.path to another folder")
    if manifest.get("format_version") not in range(1, FORMAT_VERSION + 1):
        raise StoreError(
            f"{path}: format_version {manifest.get('format_version')} is not supported (this stillroom reads "
            f"versions 1 to {FORMAT_VERSION}); {REBUILD}", fix="overwrite"
        )
    return manifest


def format_version(header: "StoreHeader") -> int:
    """The format version a store of ``header`` is written with (see :data:`FORMAT_VERSION`)."""
    return 3 if header.id_code == "ranked" else 2 if header.draw == "allocated" else 1


# ---------------------------------------------------------------- per-token encoding


@dataclass
class SequenceSignal:
    """The teacher's signal for one sequence of ``T`` positions (what a shard row holds).

    ``topk_ids_tk`` ``[T, K]`` int; ``topk_logprobs_tk`` ``[T, K]`` float log-probs at
    the store temperature, sorted descending; ``tail_logmass_t`` ``[T]``;
    ``hidden`` ``{layer: [T, H]}``; ``extra`` ``{name: [T, ...]}``: further per-position tensors a store kind
    keeps as they are (an image store's crop boxes and flips), concatenated on the position axis into the
    shard tensor ``name``.
    """

    uid: str
    topk_ids_tk: torch.Tensor
    topk_logprobs_tk: torch.Tensor
    tail_logmass_t: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.topk_ids_tk.shape[0])


def encode_rows(rows: list[SequenceSignal], header: StoreHeader) -> dict[str, torch.Tensor]:
    """The shard tensors for ``rows`` (concatenated on the token axis)."""
    if not rows:
        raise StoreError("a shard needs at least one sequence")
    k = header.k
    for r in rows:
        if r.topk_ids_tk.shape[-1] != k or r.topk_logprobs_tk.shape != r.topk_ids_tk.shape:
            raise StoreError(
                f"sequence {r.uid}: top-k tensors {tuple(r.topk_ids_tk.shape)} / {tuple(r.topk_logprobs_tk.shape)} "
                f"do not match k={k}"
            )
        if r.tail_logmass_t.shape != r.topk_ids_tk.shape[:1]:
            raise StoreError(f"sequence {r.uid}: tail_logmass shape {tuple(r.tail_logmass_t.shape)} is not [T]")
        missing = set(header.hidden_layers) - set(r.hidden)
        if missing:
            raise StoreError(f"sequence {r.uid}: hidden states of layers {sorted(missing)} are missing")
    lengths = torch.tensor([0] + [r.length for r in rows], dtype=torch.int64)
    ids = torch.cat([r.topk_ids_tk.reshape(-1, k) for r in rows]).long()
    if int(ids.min()) < 0 or int(ids.max()) >= header.vocab_size:
        raise StoreError(f"top-k ids outside [0, {header.vocab_size}) in sequences {rows[0].uid}..{rows[-1].uid}")
    lp = torch.cat([r.topk_logprobs_tk.reshape(-1, k) for r in rows]).float()
    tail = torch.cat([r.tail_logmass_t.reshape(-1) for r in rows]).float()
    out = {"offsets": lengths.cumsum(0), "topk_ids": ids.to(torch_dtype(header.id_dtype)).contiguous()}
    if header.signal == "topk_sampled" and header.draw == "allocated":  # rows of their own widths, packed
        out.update(pack_tail_draws([r.extra["tail_ids"] for r in rows], torch_dtype(header.id_dtype)))
    elif header.signal == "topk_sampled":  # the head as a topk store, the tail's draws beside it
        out["tail_ids"] = torch.cat([r.extra["tail_ids"] for r in rows]).to(torch_dtype(header.id_dtype)).contiguous()
    if header.signal != "sampled":  # a sampled store's draws are its signal: no log-probs, no tail
        if header.logprob_dtype in LEVELS:
            out.update(encode_logprobs(lp, header.logprob_dtype, header.scale_dtype))
        else:
            out["topk_logprobs"] = lp.to(torch_dtype(header.logprob_dtype)).contiguous()
        out["tail_logmass"] = tail.to(torch_dtype(header.tail_dtype)).contiguous()
    for layer in header.hidden_layers:
        h = torch.cat([r.hidden[layer].reshape(r.length, -1) for r in rows])
        if h.shape[-1] != header.hidden_size:
            raise StoreError(f"hidden layer {layer}: width {h.shape[-1]} is not hidden_size={header.hidden_size}")
        out[f"hidden.{layer}"] = h.to(torch_dtype(header.hidden_dtype)).contiguous()
    for name in sorted(set(rows[0].extra) - {"tail_ids"}):
        if name in out or any(name not in r.extra or r.extra[name].shape[:1] != (r.length,) for r in rows):
            raise StoreError(f"extra tensor {name!r}: every sequence needs one row per position (and a name that is "
                             "not a top-k or hidden tensor)")
        out[name] = torch.cat([r.extra[name] for r in rows]).contiguous()
    return out


LOGPROB_TENSORS = ("topk_logprobs", "topk_logprob_codes", "topk_logprob_nibbles", "logprob_max", "logprob_step",
                   "tail_logmass")
"""The shard tensors :func:`decode_logprobs` may read (which of them a shard holds depends on ``logprob_dtype``;
the int4 mode also reads the width of ``topk_ids``)."""


def decode_logprobs(tensors: dict[str, torch.Tensor], lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(topk_logprobs [n, K], tail_logmass [n])`` of token rows ``lo:hi``, renormalised.

    The K + 1 bins are renormalised to sum to one (``logsumexp`` over the k
    log-probs and the tail subtracted from each), which removes the drift that
    16-bit rounding or 8/4-bit quantisation adds to the total.
    """
    if "topk_logprobs" in tensors:
        lp = tensors["topk_logprobs"][lo:hi].float()
    else:
        lp = decode_quantized(tensors, lo, hi)
    tail = tensors["tail_logmass"][lo:hi].float()
    total = torch.logsumexp(torch.cat([lp, tail.unsqueeze(-1)], dim=-1), dim=-1)
    return lp - total.unsqueeze(-1), tail - total
