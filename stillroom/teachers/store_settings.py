"""Settings a store records (``k``, ``logprob_dtype``, ``shard_tokens``) that a recipe may leave at their defaults:
they are then read from the store's manifest, and the log says which (docs/STORE.md, "Settings the store
records")."""

from __future__ import annotations

import math
from typing import Iterable

RECORDED = ("k", "logprob_dtype", "shard_tokens")
"""Settings a store records that a recipe may leave at their defaults: they are then read from the manifest."""


def recorded_settings(store_cfg, manifest: dict | None, names: Iterable[str] = RECORDED) -> tuple[dict, list[str]]:
    """``({name: value}, taken)``: for each of ``names`` (fields of ``teacher.store``) the recipe's value where
    it changed it from the default, else the value ``manifest`` records; ``taken`` names the values read from
    the manifest that differ from the recipe's.

    A value equal to the default counts as left at the default (a dumped config, such as config.resolved.yaml,
    repeats every default), so only an explicit, different value can disagree with the store.
    """
    values, taken = {}, []
    for name in names:
        mine = getattr(store_cfg, name)
        default = type(store_cfg).model_fields[name].get_default(call_default_factory=True)
        explicit = name in store_cfg.model_fields_set and mine != default
        stored = (manifest or {}).get(name)
        values[name] = mine if explicit or stored is None else stored
        if values[name] != mine:
            taken.append(name)
    return values, taken


def taken_note(prefix: str, taken: list[str]) -> str:
    """The log's ``; <prefix>.k read from its manifest (...)`` for the settings :func:`recorded_settings` took."""
    if not taken:
        return ""
    return (f"; {' and '.join(f'{prefix}.{n}' for n in taken)} read from its manifest (the recipe leaves "
            f"{'it' if len(taken) == 1 else 'them'} at the default)")


def header_differences(stored: dict, wanted: dict, fields: Iterable[str]) -> list[str]:
    """``"field (store X, run Y)"`` for each of ``fields`` whose values differ."""
    out = []
    for name in fields:
        a, b = stored.get(name), wanted.get(name)
        if name == "loss_temperature" and a is not None and b is not None:
            same = math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
        else:
            same = a == b
        if not same:
            out.append(f"{name} (store {_short(a)}, run {_short(b)})")
    return out


def _short(value) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    if isinstance(value, dict) and "identity" in value:
        return repr(value["identity"])
    return repr(value)
