"""The registry of loss terms a recipe refers to by name.

Each :class:`TermSpec` records the public function, the kind of inputs it needs,
the parameters a recipe may set (with defaults) and whether it is a divergence
(zero iff the distributions are equal; multiplied by T^2 when
``scale_by_temperature_squared`` is on).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

Kind = Literal["logit", "hidden", "attention"]


@dataclass(frozen=True)
class TermSpec:
    name: str
    kind: Kind
    fn: Callable
    params: dict[str, Any] = field(default_factory=dict)
    """Parameters a recipe may set in ``LossTerm.params``, with their defaults."""
    divergence: bool = False
    uses_teacher: bool = True
    sparse_ok: bool = False
    """Accepts a top-k teacher (K + 1 bin estimator)."""

    @property
    def summary(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


REGISTRY: dict[str, TermSpec] = {}


def register(spec: TermSpec) -> TermSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"loss term {spec.name!r} is registered twice")
    REGISTRY[spec.name] = spec
    return spec


def _nearest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def get_term(name: str) -> TermSpec:
    """The spec of a registered term; ValueError with the nearest name otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        names = sorted(REGISTRY)
        raise ValueError(
            f"unknown loss term {name!r}.{_nearest(name, names)} Registered terms: {', '.join(names)}"
        ) from None


def resolve_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Defaults of term ``name`` updated with ``params``; ValueError naming any unknown parameter."""
    spec = get_term(name)
    for key in params:
        if key not in spec.params:
            valid = ", ".join(sorted(spec.params)) or "(none)"
            raise ValueError(
                f"loss term {name!r} has no parameter {key!r}.{_nearest(key, list(spec.params))} "
                f"Valid parameters of {name!r}: {valid}"
            )
    return {**spec.params, **params}


def list_terms() -> list[TermSpec]:
    return [REGISTRY[k] for k in sorted(REGISTRY)]
