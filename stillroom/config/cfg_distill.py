"""Config section of ``method: cfg_distill`` (diversity-rewarded CFG distillation, Cideron et al. ICLR 2025;
spec 9; docs/methods/cfg_distill.md).

This module imports :mod:`stillroom.config.core` only (``config.methods`` registers the section).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class CfgDistillConfig(Strict):
    """``method: cfg_distill`` (domain autoregressive, ``dataset: markov_modes``): the student starts as a copy of
    the teacher and learns, without CFG, the teacher's CFG distribution on its own samples (two per condition),
    plus with ``beta > 0`` a REINFORCE diversity reward between the two samples."""

    method: ClassVar[str] = "cfg_distill"

    gamma: float = Field(3.0, ge=1, description="CFG strength of the teacher's target: log_softmax(gamma * l(c, y<t) "
                         "+ (1 - gamma) * l(null, y<t)); 1: the plain conditional teacher.")
    kl_direction: Literal["forward", "reverse"] = Field("forward", description="forward: KL(p_cfg || p_student) per "
                                                         "position; reverse: KL(p_student || p_cfg). Closed form "
                                                         "over the vocabulary, summed over positions.")
    beta: float = Field(0.0, ge=0, description="Weight of the diversity reward r = 1 - cos(E(y1), E(y2)) (E: "
                        "normalised bag-of-bigrams) optimised by REINFORCE with the batch-mean baseline; 0: "
                        "the quality model.")

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "autoregressive" or run.autoregressive is None \
                or run.autoregressive.dataset != "markov_modes":
            raise ValueError("method=cfg_distill distils a conditional autoregressive teacher with CFG; set domain: "
                             "autoregressive and autoregressive.dataset: markov_modes")
