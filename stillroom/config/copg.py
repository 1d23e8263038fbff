"""Settings of ``method: copg`` (CoPG, contrastive policy gradient, Flet-Berliac et al. 2024; spec 14d,
docs/methods/copg.md).

Offline records ``{prompt, completions: [y_1 .. y_k], rewards: [R_1 .. R_k]}`` (a pair is ``k = 2``); the
student minimises, per prompt, ``(1 / (k - 1)) sum_{i>j} (R_beta(y_i) - R_beta(y_j))^2 / (2 beta)`` with
``R_beta(y) = R(y) - beta log(pi(y|x) / pi_ref(y|x))`` (:func:`stillroom.losses.preference.copg_group`).

This section imports :mod:`stillroom.config.core` only (``config.methods`` registers it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class CopgConfig(Strict):
    """CoPG on offline completions with scalar rewards (module docstring)."""

    method: ClassVar[str] = "copg"

    beta: float = Field(0.1, gt=0.0, description="beta: weight of the KL regulariser log(pi / pi_ref) in the "
                        "regularised reward; the fixed point is pi_ref exp(R / beta) / Z (smaller beta: greedier).")
    group_size: int = Field(2, ge=2, le=64, description="k: completions per prompt, drawn together into one "
                            "micro-batch (2 = pairs). Every record must hold exactly k completions and k rewards.")
    reference: Literal["student", "teacher"] = Field(
        "student", description="The frozen pi_ref: student = a copy of the student as the run starts (the policy "
        "the regulariser keeps it near, e.g. an SFT checkpoint; the usual RL fine-tuning choice); teacher = the "
        "teacher model (same tokenizer), so the fixed point is teacher exp(R / beta) / Z.")
    completions_field: str = Field("completions", description="Record field holding the list of k completions "
                                   "(strings) of the prompt (the data source's prompt_field).")
    rewards_field: str = Field("rewards", description="Record field holding the k scalar rewards, one per "
                               "completion, in the same order (any real numbers; not only 0/1).")

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "lm":
            raise ValueError(f"method=copg trains causal language models: set domain: lm (got {run.domain!r})")
        terms = [t.name for t in run.loss.terms]
        if terms != ["ce"]:
            raise ValueError(f"method=copg trains the CoPG loss on sequence log-probs; loss.terms ({terms}) is only "
                             "the CE baseline's: set loss.terms: [{name: ce}]")
        mbs = run.train.micro_batch_size
        if mbs % self.group_size:
            raise ValueError(f"method=copg: train.micro_batch_size={mbs} counts sequences and must be a multiple of "
                             f"copg.group_size={self.group_size} (the k completions of a prompt share a micro-batch)")
