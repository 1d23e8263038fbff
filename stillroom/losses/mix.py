"""LossMix: the weighted sum of a recipe's loss terms, the one object the training loop calls.

``total = sum_i weight_i * term_i`` where every term is a sum over the counted
tokens of this micro-batch; the loop divides once by the global token count.
All logit terms share one pass over each chunk of rows (one student
log-softmax per chunk). The mix knows no term by name: it asks each term's
spec what it needs. It owns the state that must be trained or checkpointed
with the student: per-run term state (``TermSpec.state``, e.g. TAID's schedule
buffers) and the learned projections of terms with ``TermSpec.projects`` (add
``mix.parameters()`` to the optimizer when there are any).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from stillroom.losses import hidden as H
from stillroom.losses.engine import run_fused_logit_terms, run_logit_terms
from stillroom.losses.liger import LigerLoss
from stillroom.losses.logit import bind, kernel_args
from stillroom.losses.registry import get_term, resolve_params
from stillroom.teachers.signal import TeacherSignal

if TYPE_CHECKING:  # the config layer sits above the losses: no import at run time
    from stillroom.config.core import LossConfig


@dataclass
class OutputHead:
    """The student's output projection restricted to the shared vocabulary (views, no copies)."""

    weight: torch.Tensor
    """``[V, D]``."""
    bias: torch.Tensor | None = None
    """``[V]`` or ``None``."""
    matmul_dtype: torch.dtype | None = None
    """The dtype of the head's matmuls in the fused loss: the autocast dtype when the student's forward ran
    under autocast (the plain path's head would run in it too), else ``None`` (the weight's dtype)."""
    tied: "TiedHeadGrad | None" = None
    """Set when ``weight`` is also the input embedding's: the fused loss's weight gradient goes here, for the
    embedding's backward to add its rows into (:class:`TiedHeadGrad`)."""


class TiedHeadGrad:
    """The fused loss's ``[V, D]`` head gradient on its way to the input embedding's backward, when the two share
    one weight: the embedding adds its rows into it and returns the sum, so autograd gets one gradient for the
    weight. (Otherwise the embedding's backward zero-fills a ``[V, D]`` of its own and autograd adds the two: at a
    256k vocabulary about 150 ms of fresh pages and a 35 ms sum per micro-batch on a 2-core CPU.) The loss's
    backward always runs first: the embedding's output feeds the hidden state the head reads."""

    def __init__(self):
        self.grad: torch.Tensor | None = None

    def put(self, grad: torch.Tensor) -> None:
        self.grad = grad if self.grad is None else self.grad.add_(grad)

    def take(self) -> torch.Tensor | None:
        grad, self.grad = self.grad, None
        return grad


@dataclass
class StudentOutput:
    logits_btv: torch.Tensor | None = None
    """Plain path: student logits ``[B, T, V]``."""
    hidden_btd: torch.Tensor | None = None
    """Fused path: last hidden state after the final norm ``[B, T, D]``."""
    head: OutputHead | torch.nn.Linear | None = None
    """Fused path: the output projection (anything with ``weight [V, D]`` and ``bias [V]`` or None)."""
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)
    """HF hidden_states index -> ``[B, T, H]`` (0 = embeddings, i = output of block i-1)."""
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    """Block index (0-based) -> ``[B, heads, T, T]`` attention probabilities."""


@dataclass
class LossResult:
    total: torch.Tensor
    """Scalar fp32, differentiable: sum_i weight_i * sum_i."""
    count: int
    """Counted tokens (``mask.sum()``), shared by every term."""
    parts: dict[str, float]
    """Per-term unweighted sums (detached), keyed by term name (``name[i]`` if a name repeats)."""


class LossMix(torch.nn.Module):
    def __init__(self, cfg: "LossConfig", *, student_hidden: int | None = None, teacher_hidden: int | None = None,
                 student_layers: int | None = None, teacher_layers: int | None = None):
        super().__init__()
        self.cfg = cfg
        if not cfg.terms:
            raise ValueError("loss.terms is empty: give at least one term, e.g. [{name: forward_kl}]")
        names = Counter(t.name for t in cfg.terms)
        self.keys = [t.name if names[t.name] == 1 else f"{t.name}[{i}]" for i, t in enumerate(cfg.terms)]
        self.specs = [get_term(t.name) for t in cfg.terms]
        self.params = [resolve_params(t.name, t.params) for t in cfg.terms]  # validated, defaults filled in
        self.weights = [t.weight for t in cfg.terms]
        # Bound once: every logit term of the mix shares these.
        self.loss_temperature = cfg.loss_temperature
        self.scale_by_temperature_squared = cfg.scale_by_temperature_squared
        self.chunk_tokens = cfg.chunk_tokens
        self.fused = cfg.fused
        # loss.kernel=liger: the logit terms in one Liger call (terms, CUDA and the package checked here, before step 0)
        self.liger = LigerLoss.from_config(cfg) if cfg.kernel == "liger" else None
        self.states = torch.nn.ModuleDict()  # term key -> per-run state (TermSpec.state)
        self.projections = torch.nn.ModuleDict()  # f"t{i}_s{s}" -> Linear(student_hidden, teacher_hidden)
        self.layer_maps: dict[int, H.LayerMap] = {}
        self._term_kwargs: dict[int, dict] = {}  # hidden/attention term i -> its keyword params
        for i, (key, spec, p) in enumerate(zip(self.keys, self.specs, self.params)):
            if spec.state is not None:
                if names[spec.name] > 1:
                    raise ValueError(f"loss.terms: at most one {spec.name!r} term (it owns per-run state, "
                                     "logged and checkpointed under fixed names)")
                self.states[key] = spec.state(p)
            if spec.kind == "logit":
                continue
            lmap = H.resolve_layer_map(spec.name, p["layers"], student_layers, teacher_layers,
                                       include_embeddings=bool(p.get("include_embeddings", False)),
                                       attention=spec.kind == "attention")
            self.layer_maps[i] = lmap
            self._term_kwargs[i] = {k: v for k, v in p.items() if k not in H.LAYER_PARAMS}
            if spec.projects and student_hidden and teacher_hidden and student_hidden != teacher_hidden:
                # imported here: stillroom.models' package __init__ imports the config, which imports the losses
                from stillroom.models.projectors import build_projector

                for s, _t in lmap:
                    self.projections[f"t{i}_s{s}"] = build_projector("linear", student_hidden, teacher_hidden,
                                                                     bias=False)
        self._logit = [i for i, s in enumerate(self.specs) if s.kind == "logit"]
        self._structural = [i for i, s in enumerate(self.specs) if s.kind != "logit"]
        # Stateless logit terms are bound once; a stateful one is re-bound per forward from its state.
        self._bound = {i: self._bind(i) for i in self._logit if self.keys[i] not in self.states}
        self._register_load_state_dict_pre_hook(self._rename_old_state_keys)

        self.needs_teacher = any(s.uses_teacher for s in self.specs)
        self.needs_logits = bool(self._logit)
        self.accepts_token_weights = not self._structural
        """Per-token weights (``weight_bt``) apply to logit terms only."""
        self.student_hidden_layers = sorted({s for i, m in self.layer_maps.items()
                                             if self.specs[i].kind == "hidden" for s, _ in m})
        self.teacher_hidden_layers = sorted({t for i, m in self.layer_maps.items()
                                             if self.specs[i].kind == "hidden" for _, t in m})
        self.needs_attentions = any(s.kind == "attention" for s in self.specs)

    def _bind(self, i: int):
        key, spec = self.keys[i], self.specs[i]
        args = kernel_args(spec, self.params[i], self.states[key] if key in self.states else None)
        return bind(spec, args, key=key, weight=self.weights[i], loss_temperature=self.loss_temperature,
                    scale_by_temperature_squared=self.scale_by_temperature_squared)

    def forward(self, student: StudentOutput, teacher: TeacherSignal | torch.Tensor | None,
                target_ids_bt: torch.Tensor, mask_bt: torch.Tensor,
                weight_bt: torch.Tensor | None = None) -> LossResult:
        """``target_ids_bt``/``mask_bt``: ``[B, T]``; ``weight_bt`` (``[B, T]`` float, optional):
        per-token weights on the logit terms (refused when the mix has hidden-state or attention
        terms, see :attr:`accepts_token_weights`)."""
        if self.needs_teacher and teacher is None:
            raise ValueError(f"loss terms {[k for k, s in zip(self.keys, self.specs) if s.uses_teacher]} "
                             "need a teacher signal, got None")
        if weight_bt is not None and not self.accepts_token_weights:
            name = self.specs[self._structural[0]].name
            raise ValueError(f"loss term {name!r} does not take per-token weights (the method set "
                             "Batch.target_weight); use logit terms only with this method")
        count = int(mask_bt.sum())
        parts: dict[str, float] = {}
        total = torch.zeros((), dtype=torch.float32, device=mask_bt.device)
        if self.liger is not None:
            lt, lparts = self.liger(student, teacher, target_ids_bt, mask_bt, weight_bt)
            total = total + lt
            parts.update(lparts)
        elif self.needs_logits:
            terms = [self._bound[i] if i in self._bound else self._bind(i) for i in self._logit]
            common = dict(target_ids=target_ids_bt, chunk_tokens=self.chunk_tokens, weight_bt=weight_bt)
            if self.fused and student.hidden_btd is not None and student.head is not None:
                lt, lparts, _ = run_fused_logit_terms(terms, student.hidden_btd, student.head, teacher, mask_bt,
                                                      **common)
            elif student.logits_btv is not None:
                lt, lparts, _ = run_logit_terms(terms, student.logits_btv, teacher, mask_bt, **common)
            else:
                raise ValueError("logit loss terms need StudentOutput.logits_btv, or hidden_btd and head "
                                 "(with loss.fused=true)")
            total = total + lt.float()
            parts.update({t.key: float(p) for t, p in zip(terms, lparts)})
        for i in self._structural:
            value = self._structural_value(i, student, teacher, mask_bt)
            total = total + self.weights[i] * value
            parts[self.keys[i]] = float(value.detach())
        return LossResult(total=total, count=count, parts=parts)

    def _structural_value(self, i: int, student: StudentOutput, teacher, mask_bt) -> torch.Tensor:
        spec, lmap = self.specs[i], self.layer_maps[i]
        if not isinstance(teacher, TeacherSignal):
            raise ValueError(f"loss term {spec.name!r} needs a TeacherSignal carrying hidden states/attentions")
        states = student.attentions if spec.kind == "attention" else student.hidden_states
        kwargs = dict(self._term_kwargs[i])
        if spec.projects:
            kwargs["projections"] = {s: self.projections[f"t{i}_s{s}"] for s, _ in lmap
                                     if f"t{i}_s{s}" in self.projections}
        value, _ = spec.kernel(states, teacher, mask_bt, layer_map=lmap, **kwargs)
        return value

    def log_state(self) -> dict[str, float]:
        """Per-run state worth logging per step (TAID's ``taid_t``)."""
        out: dict[str, float] = {}
        for state in self.states.values():
            out.update(state.log_state())
        return out

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        """Once per optimizer step: advance per-run term state (TAID's t; a no-op without any).

        ``per_target``: term key (as in ``LossResult.parts``) -> that term's unweighted sum over the
        step divided by the global target count (all-reduced by the loop). Each stateful term is fed
        its own value (TAID's schedule follows the TAID loss, not the whole mix's).
        """
        if not isinstance(per_target, Mapping):
            raise TypeError("LossMix.after_step(per_target, step, total_steps): per_target must map each term key "
                            f"{self.keys} to its loss per target, got {type(per_target).__name__}")
        for key, state in self.states.items():
            if key not in per_target:
                raise KeyError(f"LossMix.after_step: per_target has no value for term {key!r} (got {sorted(per_target)})")
            state.update(float(per_target[key]), step, total_steps)

    def _rename_old_state_keys(self, state_dict, prefix, *_args) -> None:
        """Checkpoints written before ``states`` existed hold a term's state as ``<key>.<buffer>``."""
        for key in self.states:
            for old in [k for k in state_dict if k.startswith(f"{prefix}{key}.")]:
                state_dict[f"{prefix}states.{old[len(prefix):]}"] = state_dict.pop(old)
