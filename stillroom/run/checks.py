"""What can be checked about a run before any model loads (``stillroom validate`` and the start of every run)."""

from __future__ import annotations

from stillroom.config.schema import RunConfig
from stillroom.methods import METHODS, Method


def check_run(cfg: RunConfig) -> Method:
    """What can be checked without loading a model, beyond the config's own validators; returns the method."""
    method = METHODS[cfg.method]
    if method.domains is not None and cfg.domain not in method.domains:
        raise ValueError(f"method {cfg.method!r} works in the {', '.join(method.domains)} domain(s), not in "
                         f"domain {cfg.domain!r}")
    return method
