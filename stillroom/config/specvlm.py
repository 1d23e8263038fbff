"""Settings of ``method: specvlm`` (SpecVLM's online draft distillation; spec 15, docs/methods/specvlm.md).

A draft for speculative decoding of a (vision-)language target is trained online from the target's logits and
last hidden features (the loss terms: soft cross-entropy and ``hidden_smooth_l1`` through a learned projector;
EAGLE's weights 0.1 and 1.0 are the shipped recipe's), while the run measures, every ``eval_every`` steps, how
well the draft serves the target: greedy speculative decoding of the first ``prompts`` held-out prompts (their
images included) with ``gamma`` proposals per round, greedy or sampled (``mode``). The draft is the student
(``draft: model``) or EAGLE's feature-level head over the target's features (``draft: eagle_head``). This section
imports :mod:`stillroom.config.core` only.
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
    draft: Literal["model", "eagle_head"] = Field(
        "model", description="What the run trains as the draft. model: the student (a small model of the target's "
        "class, its own vision tower for a VLM), from the target's logits and features through loss.terms. "
        "eagle_head: EAGLE's feature-level head (stillroom/generate/eagle_head.py): fc([e_{t+1}; f_t]) and "
        "head_layers decoder layers of the target's class predict the target's next last-layer feature, and the "
        "target's frozen LM head turns it into logits; loss.terms apply to the head's predicted features (hidden "
        "terms, layers: last) and logits; the student is not trained; the head is saved as <run>/eagle_head.")
    head_layers: int = Field(1, ge=1, description="Decoder layers of the EAGLE head (draft: eagle_head; EAGLE: 1).")
    head_seed: int = Field(0, description="Seed of the EAGLE head's initial weights (draft: eagle_head).")
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
        if self.draft == "eagle_head":
            if run.teacher.source != "online":
                raise ValueError("specvlm.draft=eagle_head reads the target's features in process: set "
                                 f"teacher.source: online (got {run.teacher.source!r})")
            if run.loss.kernel != "stillroom":
                raise ValueError("specvlm.draft=eagle_head computes its loss terms with loss.kernel: stillroom "
                                 f"(got {run.loss.kernel!r})")
        if run.baseline:
            raise ValueError("method=specvlm measures the distilled draft alone; set baseline: false (compare a "
                             "CE-trained draft with a second run of loss.terms: [{name: ce}])")
