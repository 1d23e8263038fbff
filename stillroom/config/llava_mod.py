"""Settings of ``method: llava_mod`` (LLaVA-MoD, Shu et al. ICLR 2025; spec 14.1, docs/methods/llava_mod.md).

Two stages, one recipe each: ``stage: mimic`` trains the (MoE) student with the recipe's loss terms (forward
KL to the teacher on response tokens + CE) plus the router's load-balancing term; ``stage: preference``
trains it on ``{prompt, chosen, rejected}`` pairs with a DPO-family loss whose frozen reference is the
teacher (or a frozen copy of the student as it starts the stage: the ablation). ``moe`` upcycles a dense
Llama-family student into a Mixtral-layout MoE before step 0.

This section imports :mod:`stillroom.config.core` only (``config.methods`` registers it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class MoeUpcycleConfig(Strict):
    """The sparse student built from the dense one (:mod:`stillroom.models.moe`): every decoder layer's MLP
    becomes ``experts`` copies behind a top-``top_k`` router."""

    upcycle: bool = Field(False, description="Upcycle the dense student (student.from_config, from_teacher or a "
                          "dense student.model) into a MixtralForCausalLM (or a Llava with a Mixtral language "
                          "model) before step 0. false: train the student as it is (dense, or an MoE folder).")
    experts: int = Field(4, ge=2, le=64, description="E: experts per layer, each initialised as a copy of the "
                         "dense MLP (LLaVA-MoD: 4).")
    top_k: int = Field(2, ge=1, description="Experts each token is routed to (LLaVA-MoD: 2); at most `experts`.")
    noise_std: float = Field(0.0, ge=0.0, description="Std of Gaussian noise added to each expert copy (0: exact "
                             "copies, so the upcycled model's logits equal the dense model's at step 0).")
    router_std: float | None = Field(None, gt=0.0, description="Std of the router's Gaussian init (null: the "
                                     "model config's initializer_range).")


class LlavaModConfig(Strict):
    """LLaVA-MoD: mimic distillation, then preference distillation, on an MoE student (module docstring)."""

    method: ClassVar[str] = "llava_mod"

    stage: Literal["mimic", "preference"] = Field(
        "mimic", description="mimic: loss.terms (e.g. forward_kl + ce on response tokens) + the router term; "
        "preference: the pair loss of `loss_type` against `reference` on {prompt, chosen, rejected} records.")
    moe: MoeUpcycleConfig = Field(default_factory=MoeUpcycleConfig, description="Upcycling the dense student.")
    aux_coef: float = Field(0.01, ge=0.0, description="Weight of the switch-style load-balancing term "
                            "E * sum_e f_e P_e, added once per step (LLaVA-MoD: 0.01); unused for a dense student.")
    capacity_factor: float | None = Field(
        1.5, gt=0.0, description="In training, an expert takes at most ceil(cf * top_k * T / E) of a forward "
        "pass's T tokens (DeepSpeed top-2 gating, LLaVA-MoD: 1.5); assignments past it are dropped. null: "
        "dropless. Evaluation and generation are always dropless (the saved Mixtral model).")
    loss_type: Literal["sigmoid", "kto_pair"] = Field(
        "sigmoid", description="Preference stage: sigmoid = DPO, -log sigma(beta (r_w - r_l)); kto_pair = the "
        "KTO-pair variant LLaVA-MoD's released script defaults to (stillroom.losses.preference).")
    beta: float = Field(0.1, gt=0.0, description="Preference stage: beta of the pair loss (LLaVA-MoD: 0.1).")
    reference: Literal["teacher", "student"] = Field(
        "teacher", description="Preference stage: the frozen reference pi_ref: the teacher (LLaVA-MoD) or a "
        "frozen copy of the student as it starts the stage (e.g. after SFT / mimic; the ablation).")
    rejected: Literal["file", "sampled"] = Field(
        "file", description="Preference stage: where the pairs come from. file: {prompt, chosen, rejected} records "
        "(rejected_field); sampled: prompt/completion records, each row made a pair on the way, rejected = the "
        "student's own sampled wrong answer (stillroom.methods.llava_mod_sampled; image prompts too, in a vlm run).")
    chosen: Literal["record", "teacher"] = Field(
        "record", description="Preference stage, rejected=sampled: the chosen answer is the record's completion "
        "(teacher-written data) or the teacher's greedy answer, generated on the way.")
    tries: int = Field(4, ge=1, description="Preference stage, rejected=sampled: student samples per prompt until "
                       "one is wrong; a prompt answered right every time keeps a zero-gradient pair.")
    max_new_tokens: int = Field(16, ge=1, description="Preference stage, rejected=sampled: longest sampled answer.")
    sampling_temperature: float = Field(1.0, gt=0.0, description="Preference stage, rejected=sampled: temperature "
                                        "of the student's samples.")
    rejected_field: str = Field(
        "rejected", description="Preference stage: record field of the rejected answer (the student's own wrong "
        "answer; stillroom.methods.llava_mod_pairs writes such files). The prompt and chosen answer are the data "
        "source's prompt_field and completion_field (set completion_field: chosen).")

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "lm":
            raise ValueError(f"method=llava_mod trains causal LMs and LLaVA-style VLMs: set domain: lm "
                             f"(got {run.domain!r})")
        if self.moe.top_k > self.moe.experts:
            raise ValueError(f"llava_mod.moe.top_k={self.moe.top_k} exceeds llava_mod.moe.experts="
                             f"{self.moe.experts}; route each token to at most every expert")
        if self.stage == "preference":
            self._check_preference(run)

    def _check_preference(self, run: "RunConfig") -> None:
        terms = [t.name for t in run.loss.terms]
        if terms != ["ce"]:
            raise ValueError(f"method=llava_mod stage=preference trains the pair loss llava_mod.loss_type; "
                             f"loss.terms ({terms}) is only the CE baseline's: set loss.terms: [{{name: ce}}]")
        if self.rejected == "file" and run.train.micro_batch_size % 2:
            raise ValueError(f"method=llava_mod stage=preference: train.micro_batch_size="
                             f"{run.train.micro_batch_size} counts sequences and must be even (each pair puts "
                             "its chosen and its rejected answer in the same micro-batch)")
