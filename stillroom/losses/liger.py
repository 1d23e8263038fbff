"""``loss.kernel: liger``: the logit terms through Liger-Kernel's fused linear distillation loss (GPU only).

``LigerFusedLinearJSDLoss`` (liger-kernel 0.8.5, ``liger_kernel.chunked_loss``) takes the student's last hidden
state and head and the teacher's, computes both sides' logits a chunk of rows at a time and returns

    loss = weight_hard * CE_sum / N + weight_soft * JSD_beta_sum / N,

where ``JSD_beta`` is the generalised JSD over ``log_softmax(z / temperature)`` of both sides (beta = 0: KL(p||q),
forward; beta = 1: KL(q||p), reverse; else beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q, p the
teacher: the ``jsd`` term's own convention), CE is taken at temperature 1 (as the ``ce`` term), and
``N = max(1, number of labels != ignore_index)`` over the whole call. Our contract is ``(sum, count)``: only the
counted rows are handed over, each with a valid label, so Liger's ``N`` is exactly their count and the sums are
``N`` times its means (``return_soft_hard_loss`` gives each term's mean when the mix has two).

Supported: one divergence (``forward_kl``, ``reverse_kl``, ``jsd``) and optionally ``ce``, over a dense online
teacher with the same tokenizer, no per-token weights, on the fused path. Anything else is refused before step 0
(:func:`plan_liger`; the teacher source: :func:`stillroom.domains.lm.head_teacher.liger_teacher`), as is a machine without CUDA or without the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from stillroom.losses.registry import resolve_params
from stillroom.teachers.signal import TeacherHidden  # noqa: F401 (re-exported: what the Liger path reads)

if TYPE_CHECKING:  # the config layer sits above the losses
    from stillroom.config.core import LossConfig

DIVERGENCE_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}
"""Divergence terms Liger computes -> its ``beta`` (``jsd``: the term's own ``beta`` param)."""
SUPPORTED = "one of forward_kl, reverse_kl, jsd (any beta), optionally with ce"
EXTRA = "pip install 'stillroom[gpu]' (liger-kernel==0.8.5, on a CUDA build of torch)"
IGNORE = -100


@dataclass(frozen=True)
class LigerPlan:
    """The mix's terms as the arguments of one ``LigerFusedLinearJSDLoss``."""

    divergence: str
    """Key of the divergence term (as in ``LossResult.parts``)."""
    beta: float
    divergence_weight: float
    divergence_scale: float
    """``loss_temperature ** 2`` with ``scale_by_temperature_squared``, else 1 (in the part, not the weight)."""
    ce: str | None
    """Key of the ``ce`` term, or ``None``."""
    ce_weight: float
    temperature: float
    chunk_tokens: int

    @property
    def split(self) -> bool:
        """Ask Liger for each term's mean: two terms, or a zero weight (the part is not ``total / weight``)."""
        return self.ce is not None or self.divergence_weight == 0.0

    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``LigerFusedLinearJSDLoss(...)``."""
        return dict(weight_hard_loss=self.ce_weight, weight_soft_loss=self.divergence_weight * self.divergence_scale,
                    beta=self.beta, ignore_index=IGNORE, temperature=self.temperature, compiled=True,
                    chunk_size=self.chunk_tokens, return_soft_hard_loss=self.split)


def plan_liger(cfg: "LossConfig") -> LigerPlan:
    """The plan of ``cfg``'s terms, or ``ValueError`` naming what Liger does not compute (checked before step 0)."""
    if not cfg.fused:
        raise ValueError("loss.kernel=liger runs on the last hidden state and the head; set loss.fused=true")
    keys = [t.name if [u.name for u in cfg.terms].count(t.name) == 1 else f"{t.name}[{i}]"
            for i, t in enumerate(cfg.terms)]  # as LossMix names them
    divergences = [i for i, t in enumerate(cfg.terms) if t.name in DIVERGENCE_BETA]
    ces = [i for i, t in enumerate(cfg.terms) if t.name == "ce"]
    other = [t.name for t in cfg.terms if t.name not in DIVERGENCE_BETA and t.name != "ce"]
    if other or len(divergences) != 1 or len(ces) > 1:
        raise ValueError(f"loss.kernel=liger computes {SUPPORTED}; loss.terms has "
                         f"{[t.name for t in cfg.terms]}. Use loss.kernel=stillroom for this mix")
    d = cfg.terms[divergences[0]]
    beta = DIVERGENCE_BETA[d.name]
    if beta is None:
        beta = float(resolve_params(d.name, d.params)["beta"])
    scale = cfg.loss_temperature**2 if cfg.scale_by_temperature_squared else 1.0
    ce = cfg.terms[ces[0]] if ces else None
    return LigerPlan(divergence=keys[divergences[0]], beta=beta, divergence_weight=d.weight, divergence_scale=scale,
                     ce=keys[ces[0]] if ces else None, ce_weight=ce.weight if ce is not None else 0.0,
                     temperature=cfg.loss_temperature, chunk_tokens=cfg.chunk_tokens)


def liger_module_class() -> type:
    """``LigerFusedLinearJSDLoss``, or ``RuntimeError`` naming the extra when CUDA or the package is missing."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"loss.kernel=liger needs a CUDA GPU (torch.cuda.is_available() is False here) and {EXTRA}; "
                           "use loss.kernel=stillroom on this machine")
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as err:
        raise RuntimeError(f"loss.kernel=liger needs the package liger-kernel ({err}): {EXTRA}") from None
    return LigerFusedLinearJSDLoss


class LigerLoss:
    """The mix's logit terms as one Liger call: ``(student, teacher, targets, mask) -> (total sum, parts)``.

    ``module``: a ``LigerFusedLinearJSDLoss`` built from ``plan.module_kwargs()`` (anything with its call).
    """

    def __init__(self, plan: LigerPlan, module: torch.nn.Module):
        self.plan, self.module = plan, module

    @classmethod
    def from_config(cls, cfg: "LossConfig") -> "LigerLoss":
        plan = plan_liger(cfg)
        return cls(plan, liger_module_class()(**plan.module_kwargs()))

    def __call__(self, student, teacher, target_ids_bt: torch.Tensor, mask_bt: torch.Tensor,
                 weight_bt: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``student``: a ``StudentOutput`` with ``hidden_btd`` ``[B, T, D]`` and ``head``; ``teacher``: a
        :class:`TeacherHidden`; ``target_ids_bt``/``mask_bt``: ``[B, T]``. Returns the fp32 weighted sum over the
        counted tokens (differentiable in the student's hidden state, head weight and bias) and the per-term
        unweighted sums (``loss.scale_by_temperature_squared`` included), keyed as in ``LossResult.parts``."""
        plan = self.plan
        if weight_bt is not None:
            raise ValueError("loss.kernel=liger takes no per-token weights (the method set Batch.target_weight); "
                             "use loss.kernel=stillroom with this method")
        if not isinstance(teacher, TeacherHidden) or student.hidden_btd is None or student.head is None:
            raise ValueError("loss.kernel=liger needs the student's hidden state and head (loss.fused=true) and the "
                             "teacher's (stillroom.domains.lm.head_teacher.liger_teacher gives the teacher source)")
        head = student.head
        dtype = getattr(head, "matmul_dtype", None) or head.weight.dtype
        rows = mask_bt.reshape(-1).nonzero().squeeze(1)
        n = rows.numel()
        hidden = student.hidden_btd.reshape(-1, student.hidden_btd.shape[-1])
        keys = [plan.divergence] + ([plan.ce] if plan.ce else [])
        if n == 0:  # nothing counted: a zero connected to the inputs (their gradient is 0)
            zero = hidden.sum() * 0.0 + head.weight.sum() * 0.0
            return zero.float(), {k: 0.0 for k in keys}
        labels = target_ids_bt.reshape(-1)[rows]
        if plan.ce is None:
            labels = torch.zeros_like(labels)  # any valid id: every handed row counts, and no CE is taken
        elif bool((labels < 0).any()):
            raise ValueError("loss.kernel=liger: the loss mask counts a position whose target is ignored (-100); "
                             "the ce term needs a target at every counted position")
        # Both heads' matmuls run in the student head's matmul dtype (Liger takes the divergence in it too).
        t_hidden = teacher.hidden_btd.reshape(-1, teacher.hidden_btd.shape[-1])[rows].to(dtype)
        bias, t_bias = (None if b is None else b.to(dtype) for b in (head.bias, teacher.bias))
        out = self.module(hidden[rows].to(dtype), head.weight.to(dtype), t_hidden, teacher.weight.to(dtype), labels,
                          bias, t_bias)
        # Liger divides every sum by N = (labels != ignore_index).sum().clamp_min(1) = n here: multiply back.
        if plan.split:
            mean, soft, hard = out
            parts = {plan.divergence: float(soft.detach()) * n * plan.divergence_scale}
            if plan.ce is not None:
                parts[plan.ce] = float(hard.detach()) * n
        else:
            mean = out
            parts = {plan.divergence: float(mean.detach()) * n / plan.divergence_weight}
        return mean.float() * n, parts
