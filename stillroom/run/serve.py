"""``stillroom serve-teacher`` as a function: load a model and serve it over an OpenAI-compatible API.

:func:`make_service` builds the :class:`~stillroom.teachers.server.TeacherService` from a
:class:`~stillroom.config.commands.ServeTeacherConfig`; :func:`serve_teacher` serves it in the
foreground (:func:`stillroom.teachers.server.serve`) until interrupted.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

from stillroom.config.commands import ServeTeacherConfig
from stillroom.config.load import ConfigError

Log = Callable[[str], None]
say: Log = functools.partial(print, flush=True)


def served_name(cfg: ServeTeacherConfig) -> str:
    """The name clients send as ``model``: ``served_model_name``, else the last part of the model reference."""
    return cfg.served_model_name or cfg.model.split(":", 1)[-1].rstrip("/").split("/")[-1]


def api_key_of(cfg: ServeTeacherConfig) -> str | None:
    """The API key clients must send (read from the variable ``api_key_env`` names), or None."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ConfigError(f"api_key_env (--api-key-env) names {cfg.api_key_env!r}, which is not set or empty")
    return key


def make_service(cfg: ServeTeacherConfig, *, log: Log = say):
    """``(TeacherService, api_key or None)``: the model loaded as ``cfg`` says."""
    from stillroom.models import load_model, model_source
    from stillroom.models.precision import weights_dtype
    from stillroom.teachers.server import TeacherService

    api_key = api_key_of(cfg)  # before loading: a missing key fails in a second, not after the model loads
    t0 = time.perf_counter()
    log(f"loading {cfg.model} ...")
    source = model_source(cfg.model)
    loaded = load_model(source, dtype=weights_dtype(cfg.dtype, cfg.device), cache_dir=cfg.cache_dir)
    model = loaded.model.to(cfg.device)
    service = TeacherService(model, loaded.tokenizer, model_name=served_name(cfg), max_top_k=cfg.max_top_k,
                             identity=loaded.identity, log_requests=cfg.log_requests, allow_reload=cfg.allow_reload,
                             images=served_images(model, source.path, log))
    log(f"  loaded in {time.perf_counter() - t0:.1f} s")
    return service, api_key


def served_images(model, path: str | None, log: Log = say):
    """How a served VLM (a LLaVA folder) reads the request field ``images``: its image size, placeholder count
    and the mean/std of the folder's ``preprocessor_config.json`` (what the online teacher uses), or None for a
    text model. A VLM named by hub id has no local folder to read them from: CLIP's mean/std, said in the log."""
    from pathlib import Path

    from stillroom.teachers.remote_images import image_input

    folder = str(Path(path).expanduser()) if path is not None and Path(path).expanduser().is_dir() else None
    spec = image_input(model, folder)
    if spec is not None:
        pre = Path(folder) / "preprocessor_config.json" if folder is not None else None
        origin = str(pre) if pre is not None and pre.is_file() else "OpenAI CLIP's mean/std (no preprocessor_config)"
        log(f"  a VLM: requests may send `images` ({spec.tokens_per_image} image tokens per image, "
            f"{spec.size}-pixel images, normalised by {origin})")
    return spec


def serve_teacher(cfg: ServeTeacherConfig, *, log: Log = say) -> None:
    """Serve ``cfg.model`` at ``http://host:port/v1`` in the foreground until interrupted."""
    from stillroom.teachers import server

    service, api_key = make_service(cfg, log=log)
    log(f"serving {service.model_name} ({service.identity}) at http://{cfg.host}:{cfg.port}/v1 "
        f"(prompt log-probs up to top-{service.max_top_k}{', API key required' if api_key else ''}; "
        f"{'one line per request on stderr' if cfg.log_requests else 'requests not logged'}"
        f"{'; POST /v1/load_weights allowed' if cfg.allow_reload else ''})")
    server.serve(service, cfg.host, cfg.port, api_key=api_key)
