"""Load a model + tokenizer from a :class:`~stillroom.config.schema.ModelSource`.

Three origins, exactly one per source:

* ``path``: a local Hugging Face folder (``config.json`` + ``*.safetensors`` +
  tokenizer files) or a hub id. Hub ids honour ``HF_HUB_OFFLINE`` /
  ``TRANSFORMERS_OFFLINE``: offline, only the local HF cache is used.
* ``gguf``: a GGUF file, dequantized to fp32 by transformers and then *re-homed*
  into a plain model of the same class (no quantization config), so that it can
  be trained and ``save_pretrained`` writes an ordinary safetensors folder.
* ``builtin``: a model shipped in a Python package, converted once into the
  stillroom cache (see :mod:`stillroom.models.builtin`).

Weights are read from safetensors only (``use_safetensors=True``): a folder with
only ``pytorch_model.bin`` (a pickle) is refused with a conversion hint.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from stillroom.config.core import ModelSource
from stillroom.models.builtin import ensure_builtin
from stillroom.models.errors import ModelLoadError
from stillroom.models.gguf import fix_special_tokens, load_gguf

_TRUE = {"1", "true", "yes", "on"}


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer.

    ``identity``: ``<name>@<revision>#sha256:<16 hex of the weight hash>``, stable
    across loads of the same weights in the same dtype (it goes into teacher
    fingerprints). ``source``: ``local``, ``hub``, ``gguf`` or ``builtin``.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: str
    source: str


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (read at call time)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def weight_hash(model: torch.nn.Module) -> str:
    """sha256 over the state dict (sorted names, dtypes, shapes and raw bytes).

    Reads every weight once (about 1 s per GB on CPU). Depends on the dtype the
    weights are held in: the same checkpoint in bf16 and fp32 hashes differently,
    which is intended (the two give different logits).
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def load_model(src: ModelSource, dtype: torch.dtype = torch.float32, cache_dir: str | None = None) -> LoadedModel:
    """Load ``src`` as a causal LM in ``dtype`` plus its tokenizer.

    ``cache_dir`` is stillroom's cache (used for ``builtin`` models), not the HF
    hub cache. The tokenizer always has a pad token afterwards when it has an eos
    token (pad = eos if none was set). Raises :class:`ModelLoadError` with a fix.
    """
    given = [k for k in ("path", "gguf", "builtin") if getattr(src, k) is not None]
    if len(given) != 1:
        raise ModelLoadError(
            f"a model source needs exactly one of `path`, `gguf`, `builtin` (got {given or 'none'}); "
            "e.g. `model: {path: ./my-model}` or `model: {builtin: smollm2-135m-instruct}`"
        )
    if src.builtin is not None:
        folder = ensure_builtin(src.builtin, cache_dir)
        model, tok = _from_pretrained(str(folder), dtype, revision=None, trust_remote_code=False, local_only=True)
        name, kind = f"builtin:{src.builtin}", "builtin"
    elif src.gguf is not None:
        if src.revision is not None:
            raise ModelLoadError(f"model.revision={src.revision!r} only applies to hub ids, not to gguf files; remove it")
        model, tok = load_gguf(src.gguf, dtype)
        name, kind = f"gguf:{Path(src.gguf).expanduser().resolve()}", "gguf"
    else:
        model, tok, name, kind = _load_path(src, dtype)
    fix_special_tokens(tok, model)
    revision = src.revision or getattr(model.config, "_commit_hash", None) or "local"
    identity = f"{name}@{revision}#sha256:{weight_hash(model)[:16]}"
    return LoadedModel(model=model, tokenizer=tok, identity=identity, source=kind)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(path) or path.endswith(
        (".gguf", ".safetensors", ".bin")
    )


def _load_path(src: ModelSource, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str, str]:
    path = src.path
    assert path is not None
    local = Path(path).expanduser()
    if local.exists():
        if src.revision is not None:
            raise ModelLoadError(
                f"model.revision={src.revision!r} only applies to hub ids, but {path!r} is a local path; remove it"
            )
        if local.is_file() and local.suffix == ".gguf":
            raise ModelLoadError(f"{path} is a GGUF file: give it as `model: {{gguf: {path}}}` instead of `path`")
        if not local.is_dir() or not (local / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a Hugging Face model folder (expected a directory with config.json and "
                "*.safetensors, as written by `save_pretrained`); for a GGUF file use `model: {gguf: FILE}`"
            )
        model, tok = _from_pretrained(str(local.resolve()), dtype, None, src.trust_remote_code, local_only=True)
        return model, tok, f"local:{local.resolve()}", "local"
    if _looks_local(path):
        raise ModelLoadError(
            f"model path {path!r} does not exist (resolved to {local.resolve()}); check the path, "
            "or give a hub id such as `HuggingFaceTB/SmolLM2-135M`, or `builtin: smollm2-135m-instruct`"
        )
    offline = hub_offline()
    try:
        model, tok = _from_pretrained(path, dtype, src.revision, src.trust_remote_code, local_only=offline)
    except ModelLoadError as err:
        if offline:
            raise ModelLoadError(
                f"hub id {path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
                f"Download it once while online (`hf download {path}`), point `path` at a local folder, "
                f"or unset HF_HUB_OFFLINE. ({err})"
            ) from err
        raise ModelLoadError(
            f"could not load hub id {path!r}: {err}. Check the id and network access; to work offline, "
            "download it once and set HF_HUB_OFFLINE=1, or point `path` at a local folder"
        ) from err
    return model, tok, f"hub:{path}", "hub"


def _from_pretrained(
    name: str, dtype: torch.dtype, revision: str | None, trust_remote_code: bool, local_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    common = dict(revision=revision, trust_remote_code=trust_remote_code, local_files_only=local_only)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True, **common)
    except (OSError, ValueError) as err:
        msg = str(err)
        if "safetensors" in msg.lower() and Path(name).is_dir() and any(Path(name).glob("*.bin")):
            raise ModelLoadError(
                f"{name} holds only pickle weights (*.bin); stillroom loads safetensors only. Convert once in a "
                "trusted environment: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)`"
            ) from err
        raise ModelLoadError(f"{name}: cannot load the model: {msg}") from err
    try:
        tok = AutoTokenizer.from_pretrained(name, **common)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(
            f"{name}: cannot load its tokenizer ({err}); save the tokenizer next to the model "
            "(`tokenizer.save_pretrained(folder)`)"
        ) from err
    return model, tok


def model_source(spec: str) -> ModelSource:
    """``builtin:NAME``, a ``.gguf`` file, or an HF folder / hub id -> ``ModelSource``."""
    if spec.startswith("builtin:"):
        return ModelSource(builtin=spec.split(":", 1)[1])
    if spec.lower().endswith(".gguf"):
        return ModelSource(gguf=spec)
    return ModelSource(path=spec)
