"""``method: twinflow`` (Cheng et al., TwinFlow, spec 13): teacher-free one-step generation with self-adversarial
flows, in the ``generative`` domain. The student is a ``twinflow`` network (``generative.student.arch.kind:
twinflow``) copied from a stage-0 rectified-flow model (``generative.teacher`` with ``convention: {name: rf}``);
no teacher is read at training time. docs/methods/twinflow.md has the formulas.

This module imports :mod:`stillroom.config.core` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field, model_validator

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class TwinFlowConfig(Strict):
    """Settings of TwinFlow's objective (spec 13.2; the defaults are the released code's)."""

    method: ClassVar[str] = "twinflow"

    adversarial: bool = Field(True, description="The fake branch: an `adv` group (flow matching of the model's own "
                              "one-step samples at negative time) and the self-adversarial rectification of the "
                              "e2e samples. false: any-step training only (groups e2e/mul/any; spec 13.5 arm B).")
    enhance: bool = Field(True, description="Target enhancement: classifier-free guidance baked into the velocity "
                          "target with the EMA copy (false: spec 13.5 arm D).")
    enhanced_ratio: float = Field(0.5, ge=0, description="enr: v <- v + enr * (F_ema(x_t, t, t | c) - F_ema(x_t, t, "
                                  "t | null)).")
    enhanced_range: tuple[float, float] = Field((0.0, 1.0), description="Open interval of t where the target is "
                                                "enhanced (the released default (0, 1) leaves the e2e samples, "
                                                "t = 1, unenhanced).")
    consistency_ratio: float = Field(1.0, gt=0, le=1, description="cor: the `any` group's target time is tt = t - u * "
                                     "cor * t, u ~ U(0, 1).")
    estimate_order: int = Field(2, ge=1, le=8, description="N: EMA sub-steps of the RCGM any-step target.")
    rcgm_delta: float = Field(0.01, gt=0, lt=0.5, description="The finite-difference step of the RCGM target "
                              "(released: 0.01).")
    dist_match_cof: float = Field(0.5, ge=0, description="Weight of the self-adversarial rectification loss on the "
                                  "e2e samples.")
    ema_decay: float = Field(0.99, gt=0, lt=1, description="The EMA copy's decay ramps toward this (decay_{k+1} = "
                             "decay_k + (1 - decay_k)(ema_decay - decay_k)/2, from 0), updated every step.")
    time_beta: tuple[float, float] = Field((1.0, 1.0), description="t ~ Beta(a, b) (time_dist_ctrl; (1, 1): "
                                           "uniform).")
    barron_alpha: float = Field(1.0, description="alpha of the Barron-reweighted L2 (2: plain MSE / c).")
    barron_c: float = Field(1e-3, gt=0, description="c of the Barron-reweighted L2.")

    @model_validator(mode="after")
    def _range_ordered(self) -> "TwinFlowConfig":
        lo, hi = self.enhanced_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"twinflow.enhanced_range {list(self.enhanced_range)} must satisfy 0 <= lo < hi <= 1")
        if min(self.time_beta) <= 0:
            raise ValueError(f"twinflow.time_beta {list(self.time_beta)}: Beta parameters must be > 0")
        return self

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "generative":
            raise ValueError(f"method=twinflow trains one-step generators; set domain: generative (got {run.domain!r})")
        sec = run.generative
        if sec is None:
            return
        if sec.dataset not in ("rings", "moons"):
            raise ValueError(f"method=twinflow: the twinflow network takes 2-D points; generative.dataset is "
                             f"{sec.dataset!r}: use rings or moons")
        if sec.teacher.path is None and sec.teacher.convention.name != "rf":
            raise ValueError(f"method=twinflow starts from a rectified-flow model: generative.teacher.convention.name "
                             f"is {sec.teacher.convention.name!r}; set generative.teacher.convention.name: rf")
        if sec.student.path is None and sec.student.arch.kind != "twinflow":
            raise ValueError(f"method=twinflow trains a twinflow network: generative.student.arch.kind is "
                             f"{sec.student.arch.kind!r}; set generative.student.arch.kind: twinflow")
        groups = 4 if self.adversarial else 3
        if run.train.micro_batch_size < groups:
            raise ValueError(f"method=twinflow splits each micro-batch into {groups} groups; train.micro_batch_size="
                             f"{run.train.micro_batch_size} is too small (need >= {groups})")
