"""``POST /v1/load_weights``: a served model replaced by the weights of a Hugging Face folder.

On-policy training with ``onpolicy.rollout: server`` writes the student to a folder every few steps and asks the
rollout server to load it (:mod:`stillroom.methods.rollout_server`). The endpoint is always routed but answers
403 unless the server was started with ``stillroom serve-teacher --allow-reload``: loading weights from a path
on the server's disk changes what every client is served, so it is opt-in (and behind the API key when one is
set, like every ``/v1/`` path).

Request ``{"path": "/abs/folder"}``. The folder must hold ``config.json`` and ``*.safetensors`` (only
safetensors are read; no remote code) with the served model's architecture and vocabulary size; anything
else answers 400 naming the path and what differs. The answer ``{"weights": sha256, ...}`` names the weights
now served: :func:`folder_digest` of the folder's safetensors files, which the server also reports as
``weights`` in ``/v1/models`` and as ``system_fingerprint`` of every completion, so a client can check that
its samples come from the weights it wrote. A server that has not loaded any reports ``null``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from stillroom.generate.sampling import eos_token_ids

if TYPE_CHECKING:
    from fastapi import FastAPI

    from stillroom.teachers.server import TeacherService

NOT_ALLOWED = ("this server does not load weights: it was started without --allow-reload; restart it with "
               "`stillroom serve-teacher MODEL --allow-reload` to let a training run sync its student")


class LoadRefused(ValueError):
    """A load request that cannot be served; ``status`` is its HTTP status (400 or 403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def folder_digest(folder: Path) -> str:
    """SHA-256 (hex) over the names and bytes of ``folder``'s ``*.safetensors`` files, in name order."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str


def _check_folder(service: "TeacherService", folder: Path) -> None:
    """Refuse (400, naming ``folder``) unless it holds safetensors weights of the served architecture and vocabulary."""
    if not folder.is_absolute():
        raise LoadRefused(400, f"path {str(folder)!r} is relative; send an absolute path on the server's disk")
    config_path = folder / "config.json"
    if not config_path.is_file() or not any(folder.glob("*.safetensors")):
        raise LoadRefused(400, f"{folder}: not a Hugging Face folder with config.json and *.safetensors weights "
                               "(only safetensors are loaded)")
    try:
        theirs = json.loads(config_path.read_text())
    except ValueError as err:
        raise LoadRefused(400, f"{config_path}: not valid JSON ({err})") from None
    ours = service.model.config
    served = type(service.model).__name__
    if theirs.get("model_type") != ours.model_type or served not in (theirs.get("architectures") or []):
        raise LoadRefused(400, f"{config_path}: model_type {theirs.get('model_type')!r} / architectures "
                               f"{theirs.get('architectures')} differ from the served {ours.model_type!r} {served}")
    if theirs.get("vocab_size") != ours.vocab_size:
        raise LoadRefused(400, f"{config_path}: vocab_size {theirs.get('vocab_size')} differs from the served "
                               f"model's {ours.vocab_size}")


def load_weights(service: "TeacherService", folder: Path) -> str:
    """Load ``folder`` as the served model (checked by :func:`_check_folder`); return its weights digest.

    The new model is built and loaded outside the service lock (requests keep being served by the old
    one), then swapped in under it; it keeps the served model's dtype and device.
    """
    from transformers import AutoModelForCausalLM

    _check_folder(service, folder)
    digest = folder_digest(folder)
    old = next(service.model.parameters())
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=old.dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise LoadRefused(400, f"{folder}: cannot load the weights ({type(err).__name__}: {err})") from None
    model = model.to(old.device).eval()
    with service.lock:
        service.model = model
        service.eos = eos_token_ids(service.tokenizer, model)
        service.weights = digest
    return digest


def add_reload_route(app: FastAPI, service: "TeacherService") -> None:
    """Route ``POST /v1/load_weights`` on ``app`` (see the module docstring)."""
    from starlette.exceptions import HTTPException  # the serve extra; the functions above work without it

    @app.post("/v1/load_weights")
    def load(req: LoadRequest) -> dict:
        try:
            if not service.allow_reload:
                raise LoadRefused(403, NOT_ALLOWED)
            digest = load_weights(service, Path(req.path))
        except LoadRefused as err:
            raise HTTPException(err.status, str(err)) from None
        return {"object": "weights", "model": service.model_name, "path": req.path, "weights": digest}
