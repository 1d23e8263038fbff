"""LossMix: the weighted sum of a recipe's loss terms, the one object the training loop calls.

``total = sum_i weight_i * term_i`` where every term is a sum over the counted
tokens of this micro-batch; the loop divides once by the global token count.
All logit terms share one pass over each chunk of rows (one student
log-softmax per chunk). The mix owns the state that must be trained or
checkpointed with the student: TAID's schedule buffers and the learned
projections of ``hidden_mse`` / ``hidden_cosine`` (add ``mix.parameters()`` to
the optimizer when there are any).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from stillroom.losses import hidden as H
from stillroom.losses.registry import get_term, resolve_params
from stillroom.losses.schedule import TaidSchedule
from stillroom.losses.terms import make_logit_term, run_fused_logit_terms, run_logit_terms
from stillroom.teachers.signal import TeacherSignal

if TYPE_CHECKING:  # the config layer sits above the losses: no import at run time
    from stillroom.config.core import LossConfig


@dataclass
class StudentOutput:
    logits_btv: torch.Tensor | None = None
    """Plain path: student logits ``[B, T, V]``."""
    hidden_btd: torch.Tensor | None = None
    """Fused path: last hidden state after the final norm ``[B, T, D]``."""
    head: torch.nn.Linear | None = None
    """Fused path: the output projection (``lm_head``)."""
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
        self.params = [resolve_params(t.name, t.params) for t in cfg.terms]
        self.layer_maps: dict[int, H.LayerMap] = {}
        self.projections = torch.nn.ModuleDict()
        self.taid: TaidSchedule | None = None
        for i, (term, spec, p) in enumerate(zip(cfg.terms, self.specs, self.params)):
            if spec.name == "taid":
                if self.taid is not None:
                    raise ValueError("loss.terms: at most one 'taid' term (it owns one schedule)")
                self.taid = TaidSchedule(float(p["t_start"]), float(p["t_end"]), float(p["alpha"]),
                                         float(p["beta"]), bool(p["adaptive"]))
            elif spec.kind == "logit":
                make_logit_term(spec.name, term.params)  # validate values now, not at step 0
            else:
                lmap = H.resolve_layer_map(spec.name, p["layers"], student_layers, teacher_layers,
                                           include_embeddings=bool(p.get("include_embeddings", False)),
                                           attention=spec.kind == "attention")
                self.layer_maps[i] = lmap
                if spec.name in ("hidden_mse", "hidden_cosine") and student_hidden and teacher_hidden \
                        and student_hidden != teacher_hidden:
                    for s, _t in lmap:
                        self.projections[f"t{i}_s{s}"] = torch.nn.Linear(student_hidden, teacher_hidden, bias=False)

        logit = [s for s in self.specs if s.kind == "logit"]
        self.needs_teacher = any(s.uses_teacher for s in self.specs)
        self.needs_logits = bool(logit)
        self.student_hidden_layers = sorted({s for i, m in self.layer_maps.items()
                                             if self.specs[i].kind == "hidden" for s, _ in m})
        self.teacher_hidden_layers = sorted({t for i, m in self.layer_maps.items()
                                             if self.specs[i].kind == "hidden" for _, t in m})
        self.needs_attentions = any(s.kind == "attention" for s in self.specs)

    def _logit_terms(self):
        scale = self.cfg.scale_by_temperature_squared
        out = []
        for key, term, spec in zip(self.keys, self.cfg.terms, self.specs):
            if spec.kind != "logit":
                continue
            params = {} if spec.name == "taid" else term.params
            out.append(make_logit_term(spec.name, params, key=key, weight=term.weight,
                                       loss_temperature=self.cfg.loss_temperature,
                                       scale_by_temperature_squared=scale,
                                       taid_t=self.taid.value if spec.name == "taid" else None))
        return out

    def forward(self, student: StudentOutput, teacher: TeacherSignal | torch.Tensor | None,
                target_ids_bt: torch.Tensor, mask_bt: torch.Tensor,
                weight_bt: torch.Tensor | None = None) -> LossResult:
        """``weight_bt`` (``[B, T]`` float, optional): per-token weights on the logit terms
        (hidden-state and attention terms refuse them)."""
        if self.needs_teacher and teacher is None:
            raise ValueError(f"loss terms {[k for k, s in zip(self.keys, self.specs) if s.uses_teacher]} "
                             "need a teacher signal, got None")
        count = int(mask_bt.sum())
        parts: dict[str, float] = {}
        total = torch.zeros((), dtype=torch.float32)
        if self.needs_logits:
            terms = self._logit_terms()
            common = dict(target_ids=target_ids_bt, loss_temperature=self.cfg.loss_temperature, weight_bt=weight_bt)
            if self.cfg.fused and student.hidden_btd is not None and student.head is not None:
                lt, lparts, _ = run_fused_logit_terms(terms, student.hidden_btd, student.head, teacher, mask_bt,
                                                      chunk_tokens=self.cfg.chunk_tokens, **common)
            elif student.logits_btv is not None:
                lt, lparts, _ = run_logit_terms(terms, student.logits_btv, teacher, mask_bt,
                                                chunk_tokens=self.cfg.chunk_tokens, **common)
            else:
                raise ValueError("logit loss terms need StudentOutput.logits_btv, or hidden_btd and head "
                                 "(with loss.fused=true)")
            total = total + lt.float()
            parts.update({t.key: float(p) for t, p in zip(terms, lparts)})
        for i, (key, term, spec) in enumerate(zip(self.keys, self.cfg.terms, self.specs)):
            if spec.kind == "logit":
                continue
            if weight_bt is not None:
                raise ValueError(f"loss term {spec.name!r} does not take per-token weights (the method set "
                                 "Batch.target_weight); use logit terms only with this method")
            value = self._structural(i, spec, student, teacher, mask_bt)
            total = total + term.weight * value
            parts[key] = float(value.detach())
        return LossResult(total=total, count=count, parts=parts)

    def _structural(self, i, spec, student: StudentOutput, teacher, mask_bt) -> torch.Tensor:
        if not isinstance(teacher, TeacherSignal):
            raise ValueError(f"loss term {spec.name!r} needs a TeacherSignal carrying hidden states/attentions")
        lmap = self.layer_maps[i]
        if spec.kind == "attention":
            value, _ = H.attention_mse(student.attentions, teacher, mask_bt, layer_map=lmap)
        elif spec.name == "squarehead":
            value, _ = H.squarehead(student.hidden_states, teacher, mask_bt, layer_map=lmap,
                                    eps=float(self.params[i]["eps"]))
        else:
            proj = {s: self.projections[f"t{i}_s{s}"] for s, _ in lmap if f"t{i}_s{s}" in self.projections}
            value, _ = spec.fn(student.hidden_states, teacher, mask_bt, layer_map=lmap, projections=proj)
        return value

    def log_state(self) -> dict[str, float]:
        """Schedule values worth logging per step (TAID's t)."""
        return {} if self.taid is None else {"taid_t": float(self.taid.value)}

    def after_step(self, loss_per_token: float, step: int, total_steps: int) -> None:
        """Once per optimizer step: advance TAID's t (no-op without a taid term)."""
        if self.taid is not None:
            self.taid.update(loss_per_token, step, total_steps)
