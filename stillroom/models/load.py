"""Load a model + tokenizer from a :class:`~stillroom.config.schema.ModelSource`.

Three origins, exactly one per source:

* ``path``: a local Hugging Face folder (``config.json`` + ``*.safetensors`` +
  tokenizer files) or a hub id. Hub ids honour ``HF_HUB_OFFLINE`` /
  ``TRANSFORMERS_OFFLINE``: offline, only the local HF cache is used. A path that
  does not exist is a hub id only when it has a hub id's shape (:func:`local_reason`
  states the rule); anything else is a missing folder, reported as such (with the
  nearest folder that exists) instead of a hub download hint.
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
import re
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


_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_MODEL_FILES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")


def local_reason(path: str) -> str | None:
    """Why a ``model.path`` that does not exist here is read as a local path; ``None`` for a hub id.

    A hub id is ``name`` or ``owner/name``: letters, digits, ``-``, ``_`` and ``.``, each part starting
    with a letter or digit, no ``..`` or ``--``, at most 96 characters. Everything else is local: a
    path starting with ``.``, ``/`` or ``~``, an absolute path, one with ``\\`` or more than one ``/``
    (``runs/NAME/student``), one ending in a model file's suffix; and so is an ``owner/name`` whose
    ``owner`` is a folder here (``runs/x`` next to a ``runs/`` folder).
    """
    if path.startswith((".", "/", "~")) or os.path.isabs(path):
        return "it starts with '.', '/' or '~'"
    if "\\" in path or path.count("/") > 1:
        return "a hub id is `name` or `owner/name`, with at most one '/'"
    if path.lower().endswith(_MODEL_FILES):
        return "it ends like a file name"
    if not _HUB_ID.match(path) or ".." in path or "--" in path or len(path) > 96:
        return "it is not a valid hub id"
    owner, sep, _ = path.partition("/")
    if sep and Path(owner).is_dir():
        return f"the folder {owner}/ exists here"
    return None


RUN_HINT = "check the run name or the path (a run saves its student in <output_dir>/<name>/student)"


def missing_path_message(path: str, key: str = "model.path", *, what: str = "folder", hint: str = RUN_HINT) -> str:
    """``KEY: no such folder: PATH (resolved to ABS)``, the nearest folder that exists and ``hint``."""
    absolute = Path(path).expanduser().resolve()
    near = absolute.parent
    while not near.is_dir() and near != near.parent:
        near = near.parent
    entries = sorted(p.name for p in near.iterdir() if p.is_dir() and not p.name.startswith("."))[:8] \
        if near.is_dir() else []
    holds = f" (holding: {', '.join(entries)})" if entries else " (it holds no folders)"
    return (f"{key}: no such {what}: {path} (resolved to {absolute}); the path does not exist. The nearest "
            f"folder that exists is {near}{holds}: {hint}")


def model_problem(src: ModelSource, key: str = "model") -> str | None:
    """What keeps ``src`` from loading that can be told without loading it (a missing local folder or GGUF
    file, not exactly one origin), naming ``key``; ``None`` when nothing can be told yet."""
    given = [k for k in ("path", "gguf", "builtin") if getattr(src, k) is not None]
    if len(given) != 1:
        return (f"{key}: give exactly one of `path`, `gguf`, `builtin` (got {', '.join(given) or 'none'}); "
                f"e.g. {key}.path=./my-model or {key}.builtin=smollm2-135m-instruct")
    if src.gguf is not None and not Path(src.gguf).expanduser().is_file():
        return missing_path_message(src.gguf, f"{key}.gguf", what="file")
    if src.path is not None and not Path(src.path).expanduser().exists() and local_reason(src.path):
        return missing_path_message(src.path, f"{key}.path")
    return None


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
    if local_reason(path):
        raise ModelLoadError(missing_path_message(path) + f" (read as a local path: {local_reason(path)})")
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
        model = model_class(name, common).from_pretrained(name, dtype=dtype, use_safetensors=True, **common)
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


def model_class(name: str, common: dict | None = None):
    """The auto class that loads folder/hub id ``name``: ``AutoModelForCausalLM``, or for a vision-language
    folder (a LLaVA-style config with a ``vision_config``) ``AutoModelForImageTextToText``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(name, **(common or {}))
    except (OSError, ValueError):
        return AutoModelForCausalLM  # its own loading error names the problem
    vision = getattr(config, "vision_config", None) is not None
    return AutoModelForImageTextToText if vision and hasattr(config, "image_token_index") else AutoModelForCausalLM


def model_source(spec: str) -> ModelSource:
    """``builtin:NAME``, a ``.gguf`` file, or an HF folder / hub id -> ``ModelSource``."""
    if spec.startswith("builtin:"):
        return ModelSource(builtin=spec.split(":", 1)[1])
    if spec.lower().endswith(".gguf"):
        return ModelSource(gguf=spec)
    return ModelSource(path=spec)
