"""Logit terms from their specs: binding them to their arguments, and the generated public functions.

Every public logit term has the signature
``term(student_logits, teacher, mask, *, <its arguments>, loss_temperature=1.0,
scale_by_temperature_squared=False, chunk_tokens=None) -> (sum, count)``:

* ``student_logits``: ``[B, T, V]`` (any float dtype; math runs in fp32, fp64 if given fp64);
* ``teacher``: dense logits ``[B, T, V]``, a :class:`~stillroom.teachers.signal.TeacherSignal`
  (dense or top-k with tail mass), or a list of dense logits (their probabilities are averaged);
* ``mask``: ``[B, T]`` bool, True where a token counts. Positions are already aligned.

It returns the fp32 scalar **sum** over counted tokens and the ``int`` count (``mask.sum()``);
it never averages. ``loss_temperature`` T divides both logits before the softmax;
``scale_by_temperature_squared`` multiplies divergences by T^2 (Hinton's gradient-scale
convention); ``chunk_tokens`` None is one plain autograd pass, an int the bounded-memory path.

The functions are not written by hand: :func:`define` makes one from a :class:`TermSpec`
(signature and docstring included) when the term is registered.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import torch

from stillroom.losses.closed_bins import on_bins
from stillroom.losses.engine import LogitTerm, run_fused_logit_terms, run_logit_terms
from stillroom.losses.registry import TermSpec, get_term, register, resolve_params

SHARED = {"loss_temperature": 1.0, "scale_by_temperature_squared": False, "chunk_tokens": None}
"""Keyword arguments every public logit function takes, with their defaults."""


def bind(spec: TermSpec, args: dict[str, Any], *, key: str | None = None, weight: float = 1.0,
         loss_temperature: float = 1.0, scale_by_temperature_squared: bool = False) -> LogitTerm:
    """The engine's :class:`LogitTerm` for ``spec`` with validated kernel ``args``: the kernel and
    its batch statistics closed over ``args``, the T^2 scale of a divergence, the weight."""
    scale = loss_temperature**2 if (spec.divergence and scale_by_temperature_squared) else 1.0
    stats = spec.batch_stats(args) if spec.batch_stats is not None else None

    closed = functools.partial(spec.closed_form, **args) if spec.closed_form is not None else None
    return LogitTerm(key=key or spec.name, kernel=functools.partial(spec.kernel, **args), weight=weight, scale=scale,
                     prepass=stats.prepass if stats else None, finish=stats.finish if stats else None,
                     temperature=loss_temperature, uses_teacher=spec.uses_teacher, vocab_free=spec.vocab_free,
                     closed_form=closed, on_bins=on_bins if spec.sparse_ok and spec.uses_teacher else None)


def kernel_args(spec: TermSpec, params: dict[str, Any], state: Any = None) -> dict[str, Any]:
    """Validated kernel arguments of ``spec`` from resolved recipe ``params``: the params themselves,
    or, for a term with per-run state, the spec's ``args`` updated with ``state.kernel_args()``
    (a fresh state from ``params`` when ``state`` is None)."""
    if spec.state is None:
        return params
    if state is None:
        state = spec.state(params)
    return spec.validate({**spec.arg_defaults, **state.kernel_args()})


def make_logit_term(name: str, params: dict, *, key: str | None = None, weight: float = 1.0,
                    loss_temperature: float = 1.0, scale_by_temperature_squared: bool = False) -> LogitTerm:
    """Bind the registered logit term ``name`` to its recipe ``params`` (validated; defaults filled in).

    A term with per-run state (TAID) is bound to its state's initial arguments (TAID: t = t_start).
    """
    spec = get_term(name)
    if spec.kind != "logit":
        raise ValueError(f"loss term {name!r} is a {spec.kind} term, not a logit term")
    args = kernel_args(spec, resolve_params(name, params))
    return bind(spec, args, key=key, weight=weight, loss_temperature=loss_temperature,
                scale_by_temperature_squared=scale_by_temperature_squared)


# ---------------------------------------------------------------- runners


def _signature(spec: TermSpec) -> inspect.Signature:
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD) for n in ("student_logits", "teacher", "mask")]
    if spec.uses_targets:
        params.append(P("target_ids", P.KEYWORD_ONLY))
    params += [P(n, P.KEYWORD_ONLY, default=d) for n, d in {**spec.arg_defaults, **SHARED}.items()]
    return inspect.Signature(params)


def define(spec: TermSpec) -> Callable:
    """Register the logit term ``spec`` and return its public function (see the module docstring):
    signature ``(student_logits, teacher, mask, *, [target_ids,] <spec args>, loss_temperature,
    scale_by_temperature_squared, chunk_tokens)``, docstring ``spec.doc``."""
    if spec.kind != "logit":
        raise ValueError(f"define() makes logit terms; {spec.name!r} is a {spec.kind} term")
    if spec.args is not None and spec.state is None:
        raise ValueError(f"loss term {spec.name!r}: kernel args differ from its params only with a state")
    signature = _signature(spec)

    def term(*args, **kwargs) -> tuple[torch.Tensor, int]:
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        bound = bind(spec, spec.validate({k: given[k] for k in spec.arg_defaults}),
                     loss_temperature=given["loss_temperature"],
                     scale_by_temperature_squared=given["scale_by_temperature_squared"])
        total, _parts, count = run_logit_terms([bound], given["student_logits"], given["teacher"], given["mask"],
                                               target_ids=given.get("target_ids"),
                                               chunk_tokens=given["chunk_tokens"])
        return total, count

    term.__name__ = term.__qualname__ = spec.name
    term.__module__ = spec.kernel.__module__
    term.__doc__ = spec.doc
    term.__signature__ = signature
    register(dataclasses.replace(spec, fn=term))
    return term
