"""Settings of ``method: specvlm`` (SpecVLM's online draft distillation; spec 15, docs/methods/specvlm.md).

A draft for speculative decoding of a (vision-)language target is trained online from the target's logits and
last hidden features (the loss terms: soft cross-entropy and ``hidden_smooth_l1`` through a learned projector;
EAGLE's weights 0.1 and 1.0 are the shipped recipe's), while the run measures, every ``eval_every`` steps, how
well the draft serves the target: greedy speculative decoding of the first ``prompts`` held-out prompts (their
images included) with ``gamma`` proposals per round, greedy or sampled (``mode``). This section imports :mod:`stillroom.config.core` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class SpecVlmConfig(Strict):
    """When and how the acceptance of the draft is measured during training (module docstring)."""

    method: ClassVar[str] = "specvlm"

    eval_every: int = Field(25, ge=1, description="Training steps between acceptance measurements (also measured "
                            "before the first step).")
    gamma: int = Field(3, ge=1, description="Draft tokens proposed per speculative round.")
    prompts: int = Field(16, ge=1, description="Held-out prompts decoded per measurement (the first N).")
    max_new_tokens: int = Field(8, ge=1, description="Tokens generated per prompt (stops at EOS).")
    mode: Literal["greedy", "sampling"] = Field(
        "greedy", description="greedy: a proposal is accepted when it is the target's argmax; sampling (temperature "
        "1, prompt i drawn with seed i at every measurement): accepted with probability min(1, p/q), so the measure "
        "follows how closely the draft's distribution matches the target's, not only their argmaxes.")

    def check_run(self, run: "RunConfig") -> None:
        from stillroom.losses import get_term

        if not any(get_term(t.name).uses_teacher for t in run.loss.terms):
            raise ValueError("method=specvlm distils a draft from the target online; loss.terms has no term that "
                             "reads the teacher: use e.g. [{name: soft_ce, weight: 0.1}, {name: hidden_smooth_l1, "
                             "weight: 1.0, params: {layers: last}}]")
        if run.baseline:
            raise ValueError("method=specvlm measures the distilled draft alone; set baseline: false (compare a "
                             "CE-trained draft with a second run of loss.terms: [{name: ce}])")
