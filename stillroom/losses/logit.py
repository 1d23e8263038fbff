"""Logit terms from their specs: binding, the runners, and the generated public functions.

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
import inspect
from typing import Any, Callable

import torch

from stillroom.losses.engine import (
    LogitTerm,
    Plan,
    TeacherLike,
    TeacherRows,
    chunked_loss,
    compute_dtype,
    counted_rows,
    plain_loss,
)
from stillroom.losses.registry import TermSpec, get_term, register, resolve_params

SHARED = {"loss_temperature": 1.0, "scale_by_temperature_squared": False, "chunk_tokens": None}
"""Keyword arguments every public logit function takes, with their defaults."""


def bind(spec: TermSpec, args: dict[str, Any], *, key: str | None = None, weight: float = 1.0,
         loss_temperature: float = 1.0, scale_by_temperature_squared: bool = False) -> LogitTerm:
    """The engine's :class:`LogitTerm` for ``spec`` with validated kernel ``args``: the kernel and
    its batch statistics closed over ``args``, the T^2 scale of a divergence, the weight."""
    scale = loss_temperature**2 if (spec.divergence and scale_by_temperature_squared) else 1.0
    stats = spec.batch_stats(args) if spec.batch_stats is not None else None

    def kernel(ctx, batch_stats):
        return spec.kernel(ctx, batch_stats, **args)

    return LogitTerm(key=key or spec.name, kernel=kernel, weight=weight, scale=scale,
                     prepass=stats.prepass if stats else None, finish=stats.finish if stats else None,
                     temperature=loss_temperature)


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


def run_logit_terms(terms: list[LogitTerm], student_logits: torch.Tensor, teacher: TeacherLike | None,
                    mask: torch.Tensor, *, target_ids: torch.Tensor | None = None,
                    loss_temperature: float | None = None, chunk_tokens: int | None = None,
                    weight_bt: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Evaluate several logit terms in one pass over ``student_logits`` ``[B, T, V]``.

    Returns ``(sum_i weight_i * sum_i, [sum_i], count)``; sums are fp32 scalars. ``weight_bt``
    (``[B, T]`` float, optional) multiplies each counted token's value before the sums. The
    temperature is the one the terms were bound with (``loss_temperature``, if given, must equal it).
    """
    _check_mask(student_logits, mask)
    vocab = student_logits.shape[-1]
    rows = counted_rows(mask)
    temperature = _shared_temperature(terms, loss_temperature)
    plan = Plan(terms, rows, TeacherRows(teacher, vocab, temperature),
                target_ids.reshape(-1) if target_ids is not None else None, temperature,
                chunk_tokens or max(rows.numel(), 1), compute_dtype(student_logits), _flat_weight(weight_bt, mask))
    flat = student_logits.reshape(-1, vocab)
    if rows.numel() == 0:
        zero = flat.sum() * 0.0
        return zero.to(plan.dtype), [zero.detach().to(plan.dtype) for _ in terms], 0
    total, parts = plain_loss(plan, flat) if chunk_tokens is None else chunked_loss(plan, flat)
    return total, parts, int(rows.numel())


def run_fused_logit_terms(terms: list[LogitTerm], hidden_btd: torch.Tensor, head: torch.nn.Linear,
                          teacher: TeacherLike | None, mask: torch.Tensor, *, target_ids: torch.Tensor | None = None,
                          loss_temperature: float | None = None, chunk_tokens: int = 1024,
                          weight_bt: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Like :func:`run_logit_terms` but from the last hidden state ``[B, T, D]`` and the output head:
    logits are computed ``chunk_tokens`` rows at a time and never materialised as ``[B, T, V]``."""
    _check_mask(hidden_btd, mask)
    vocab = head.weight.shape[0]
    rows = counted_rows(mask)
    temperature = _shared_temperature(terms, loss_temperature)
    plan = Plan(terms, rows, TeacherRows(teacher, vocab, temperature),
                target_ids.reshape(-1) if target_ids is not None else None, temperature,
                chunk_tokens, compute_dtype(hidden_btd), _flat_weight(weight_bt, mask))
    flat = hidden_btd.reshape(-1, hidden_btd.shape[-1])
    if rows.numel() == 0:
        zero = flat.sum() * 0.0 + head.weight.sum() * 0.0
        return zero.to(plan.dtype), [zero.detach().to(plan.dtype) for _ in terms], 0
    total, parts = chunked_loss(plan, flat, head.weight, head.bias)
    return total, parts, int(rows.numel())


def _shared_temperature(terms: list[LogitTerm], given: float | None) -> float:
    temps = {t.temperature for t in terms}
    if len(temps) > 1:
        raise ValueError(f"logit terms evaluated in one pass share one loss_temperature; got {sorted(temps)}")
    temperature = temps.pop() if temps else (1.0 if given is None else given)
    if given is not None and given != temperature:
        raise ValueError(f"loss_temperature={given} but the terms were bound with {temperature}")
    return temperature


def _flat_weight(weight_bt: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    if weight_bt is None:
        return None
    if tuple(weight_bt.shape) != tuple(mask.shape):
        raise ValueError(f"token weights of shape {tuple(weight_bt.shape)} do not match the mask's {tuple(mask.shape)}")
    return weight_bt.reshape(-1)


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> None:
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the student's [B, T] = {tuple(x.shape[:2])}")


# ---------------------------------------------------------------- public functions


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
