"""Method sections of the config tree: one per training method that has settings of its own.

A section belongs to one method (``MethodSection.method``). Setting a section while
``method`` names another method is an error that names both (see
:class:`stillroom.config.schema.RunConfig`); the chosen method's section is filled
with its defaults when the recipe leaves it out. ``METHODS`` is the one list of
method names: every name maps to its section class, or ``None`` for methods
whose behaviour the loss terms describe completely (``kd``, ``sft``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict
from stillroom.config.cfg_distill import CfgDistillConfig
from stillroom.config.dd2 import Dd2Config
from stillroom.config.ogen import OgenConfig
from stillroom.config.dho import DhoConfig
from stillroom.config.llava_mod import LlavaModConfig
from stillroom.config.comd import ComdConfig
from stillroom.config.specvlm import SpecVlmConfig
from stillroom.config.copg import CopgConfig
from stillroom.config.masked_diffusion import DParallelConfig
from stillroom.config.mend import MendConfig
from stillroom.config.rollout import RolloutServerConfig
from stillroom.config.dmd import DmdConfig
from stillroom.config.twinflow import TwinFlowConfig
from stillroom.config.mae import DmaeConfig
from stillroom.config.mlm import SelfDistillFptSection
from stillroom.config.pretrained_teacher import FeatureKdConfig
from stillroom.config.unfused import UnfusedConfig
from stillroom.losses import get_term

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class MethodSection(Strict):
    """Settings of one training method; ``method`` is the ``RunConfig.method`` value that uses them."""

    method: ClassVar[str]

    def check_run(self, run: "RunConfig") -> None:
        """Cross-field checks against the whole recipe (raise ``ValueError`` naming the key to change)."""


def _term_names(run: "RunConfig") -> list[str]:
    return [t.name for t in run.loss.terms]


def _uses_teacher(run: "RunConfig") -> bool:
    return any(get_term(t.name).uses_teacher for t in run.loss.terms)


def _structural_terms(run: "RunConfig") -> list[str]:
    return [t.name for t in run.loss.terms if get_term(t.name).kind != "logit"]


def _even_micro_batch(run: "RunConfig", why: str) -> None:
    mbs = run.train.micro_batch_size
    if mbs % 2:
        raise ValueError(f"method={run.method}: train.micro_batch_size={mbs} counts sequences and must be even ({why})")


def _ce_only(run: "RunConfig", why: str) -> None:
    if _term_names(run) != ["ce"]:
        raise ValueError(f"method={run.method} {why} and needs loss.terms to be exactly one 'ce' term; loss.terms "
                         f"are {_term_names(run)}. Set loss.terms: [{{name: ce}}]")


class OnPolicyConfig(MethodSection):
    """Where each micro-batch's sequences come from when ``method: onpolicy`` (GKD / DistillSpec).

    For every micro-batch one source is drawn with probabilities proportional to the
    three weights: ``fixed`` (the data as it is), ``student`` (the student samples a
    continuation of each example's prompt) or ``teacher`` (the in-process teacher model
    samples it). Generated tokens are the only targets of a generated micro-batch. The
    draw and the sampling are seeded from (run seed, step, micro-batch index, rank),
    so a resumed run regenerates exactly what the uninterrupted one did.
    """

    method: ClassVar[str] = "onpolicy"

    student_weight: float = Field(
        1.0, ge=0, description="Weight of student-generated (on-policy) micro-batches; "
        "student_weight / (sum of weights) is GKD's lambda."
    )
    fixed_weight: float = Field(0.0, ge=0, description="Weight of micro-batches used as the data gives them.")
    teacher_weight: float = Field(
        0.0, ge=0, description="Weight of teacher-generated micro-batches (sampled by the loaded teacher model, "
        "whatever teacher.source scores them)."
    )
    sampling_temperature: float = Field(1.0, gt=0, description="Sampling temperature of the generated continuations.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus (top-p) of the generated continuations.")
    max_new_tokens: int = Field(
        64, ge=1, description="Most tokens generated per prompt (also capped so prompt + continuation <= data.seq_len)."
    )
    text_prompt_tokens: int = Field(
        16, ge=1, description="Plain-text examples have no prompt: their first this-many tokens are used as one."
    )
    stop_at_eos: bool = Field(True, description="End a continuation at the tokenizer's/model's EOS (kept as a target).")
    rollout: Literal["local", "server"] = Field(
        "local", description="Where student continuations are sampled: local (in this process) or server (an "
        "OpenAI-compatible server set in onpolicy.server, kept in sync with the student's weights)."
    )
    server: RolloutServerConfig = Field(
        default_factory=RolloutServerConfig, description="The rollout server (onpolicy.rollout=server)."
    )

    @model_validator(mode="after")
    def _some_weight(self) -> "OnPolicyConfig":
        if self.student_weight + self.fixed_weight + self.teacher_weight <= 0:
            raise ValueError("onpolicy: student_weight, fixed_weight and teacher_weight are all 0; give one a weight > 0")
        return self

    def check_run(self, run: "RunConfig") -> None:
        if not _uses_teacher(run):
            raise ValueError("method=onpolicy needs a loss term that uses the teacher (e.g. forward_kl, jsd, tvd_pp); "
                             f"loss.terms are {_term_names(run)}")
        if (self.student_weight > 0 or self.teacher_weight > 0) and run.teacher.source == "store":
            raise ValueError("method=onpolicy generates new sequences every step, which a precomputed teacher store "
                             "cannot score; use teacher.source=online (or remote), or set onpolicy.student_weight=0 "
                             "and onpolicy.teacher_weight=0")
        if self.rollout == "server":
            self.server.check_run(run)


class StepByStepConfig(MethodSection):
    """Distilling step-by-step (Hsieh et al. 2023): label and rationale as two prefixed tasks."""

    method: ClassVar[str] = "step_by_step"

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the label task; 1 - alpha on the rationale task.")
    predict_prefix: str = Field("predict: ", description="Task prefix of the label task (the only one at inference).")
    explain_prefix: str = Field("explain: ", description="Task prefix of the rationale task.")
    prompt_suffix: str = Field(
        "\n", description="Text after the input x, ending every prompt (the boundary before the target; a decoder-only "
        "student needs one). Prompt = prefix + x + prompt_suffix."
    )
    variant: Literal["multi_task", "single_task", "label_only"] = Field(
        "multi_task",
        description="multi_task: the paper's two prefixed tasks (predict + explain) per record, weighted by alpha; "
        "single_task: one target `rationale + single_task_separator + label` after the predict prefix (the paper's "
        "ablation; the rationale must be generated at test time); label_only: the predict task alone (fine-tuning "
        "baseline with the same prefix).",
    )
    input_field: str | None = Field(
        None, description="Record field holding the input x (null: the data source's `prompt_field`)."
    )
    label_field: str | None = Field(
        None, description="Record field holding the label (null: the data source's `completion_field`)."
    )
    rationale_field: str = Field("rationale", description="Record field holding the teacher's rationale.")
    single_task_separator: str = Field(
        " ", description="variant=single_task: text between the rationale and the label in the one target."
    )
    drop_empty: bool = Field(
        True,
        description="Drop (and count) records whose label or rationale is empty or blank (the paper's parse "
        "failures, label or rationale = ' '); false: keep them (their target is then little more than EOS).",
    )
    task_ce_every: int = Field(
        0, ge=0, description="Every this many steps, one extra no-grad student forward over the step's batches logs "
        "step_by_step/ce_predict and step_by_step/ce_explain (mean CE per task; 0: never)."
    )

    def check_run(self, run: "RunConfig") -> None:
        if self.variant != "multi_task":
            return
        _even_micro_batch(run, "each record gives a predict and an explain sequence, drawn together")
        if self.predict_prefix == self.explain_prefix:
            raise ValueError("step_by_step.predict_prefix and explain_prefix are equal; the tasks would be "
                             "indistinguishable")
        if _structural_terms(run):
            raise ValueError(f"step_by_step (variant multi_task) weights tokens per task, which loss terms "
                             f"{_structural_terms(run)} cannot take; use logit terms only (e.g. loss.terms=[{{name: ce}}])")
        if _uses_teacher(run) and run.teacher.source == "store":
            raise ValueError("step_by_step builds its own predict/explain sequences, which a precomputed teacher "
                             "store does not cover; use teacher.source=online (or remote), or loss.terms=[{name: ce}]")


class RediConfig(MethodSection):
    """REDI stage 2 (Xu et al. 2025): length-normalised likelihood up on correct, down on incorrect traces."""

    method: ClassVar[str] = "redi"

    alpha: float = Field(0.8, ge=0.0, le=1.0, description="Weight of the incorrect-trace term (1 = symmetric, 0 = SFT).")
    rejected_field: str = Field(
        "rejected", description="Record field of the incorrect trace. The prompt and the correct trace are the data "
        "source's prompt_field and completion_field (set completion_field: chosen for {prompt, chosen, rejected})."
    )
    monitor_every: int = Field(
        1, ge=0, description="Every n steps, a no-grad forward pass over the step's pairs logs redi/logp_chosen and "
        "redi/logp_rejected (mean log pi(y|x)/|y|; both falling together signals collapse). 0: off."
    )

    def check_run(self, run: "RunConfig") -> None:
        _ce_only(run, "applies signed, length-normalised weights to cross-entropy")
        if run.loss.terms[0].weight != 1.0:
            raise ValueError(f"method=redi: the 'ce' term's weight must be 1 (got {run.loss.terms[0].weight}); "
                             "scale the update with train.lr instead")
        _even_micro_batch(run, "each pair puts its chosen and its rejected trace in the same micro-batch")


class DdkConfig(MethodSection):
    """DDK (Liu et al. 2024): domain sampling weights from student/teacher perplexity ratios."""

    method: ClassVar[str] = "ddk"

    interval_steps: int = Field(50, ge=1, description="K: re-estimate the domain weights every K optimizer steps.")
    smoothing: float = Field(0.5, ge=0.0, le=1.0, description="alpha of the smoothed update (1 - alpha is spread uniformly).")
    smoothing_mode: Literal["smooth", "none"] = Field(
        "smooth",
        description="smooth: the paper's factor smooth updating r' = alpha * psi/sum(psi) + (1 - alpha)/N with "
        "psi = r * exp(ratio); none: the paper's 'without factor smoothing' ablation, r' = softmax(ratio) of the "
        "current estimate only (no history, no floor; `smoothing` is then unused).",
    )
    steer_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Fraction of the records set apart (by the record hash, next to "
        "data.heldout_fraction) to steer the domain weights on: never trained on, and never the held-out split "
        "that the report evaluates."
    )
    val_max_per_domain: int = Field(
        500, ge=1, description="At most this many steering sequences per domain for the perplexity estimates "
        "(the paper: 500)."
    )


class ConditionalConfig(MethodSection):
    """Conditional training (Korbak et al. 2023): control tokens from a scorer's threshold."""

    method: ClassVar[str] = "conditional"

    aligned_token: str = Field("<|aligned|>", description="Control token for segments the scorer accepts.")
    misaligned_token: str = Field("<|misaligned|>", description="Control token for the other segments.")
    drop_token_fraction: float = Field(0.01, ge=0.0, le=1.0, description="Segments left without a control token.")
    scorer: str = Field(
        "stillroom.methods.conditional:bad_word_score",
        description="Misalignment scorer 'package.module:function', called as fn(segment: str) -> float "
        "(imported, never eval'd; higher = worse).",
    )
    threshold: float = Field(
        0.0, description="A segment with score <= threshold gets aligned_token, otherwise misaligned_token."
    )
    splitter: str = Field(
        r"(?<=[.!?])\s+",
        description="Regex whose matches end a segment (the match stays with the segment before it). "
        "Default: sentences.",
    )

    def check_run(self, run: "RunConfig") -> None:
        _ce_only(run, "is plain MLE over the tagged stream")


class MealV2Config(MethodSection):
    """MEAL V2 (Shen & Savvides 2020) on a classifier: soft cross-entropy against the teachers' ensemble
    (``classifier.teachers``, combined by ``classifier.ensemble_reduce``) plus an optional output discriminator.

    The student's similarity loss is ``loss.terms`` (MEAL V2's: ``[{name: soft_ce}]``, temperature 1, no hard
    labels; add ``{name: ce, weight: w}`` for the hard-label ablation). The discriminator D is an MLP on the
    ``[B, C]`` logits, ``C -> C/8 -> C/64 -> 2`` with ReLU after every layer (widths clamped to >= 1), trained
    with BCE-with-logits: student logits labelled "student", the teachers' mean logits labelled "teacher".
    """

    method: ClassVar[str] = "meal_v2"

    discriminator: Literal["off", "official", "adversarial"] = Field(
        "off",
        description="off: no discriminator. official: the released code's rule, L = L_sim + L_D, student and D "
        "stepped together on that one objective by one optimizer (D at `d_lr`), so the student is NOT trained to "
        "fool D. adversarial: the paper's min-max reading, D a second player minimising its BCE with its own "
        "optimizer; the student minimises L_sim + lambda_adv * BCE(D(student logits), 'teacher') (non-saturating).",
    )
    d_lr: float = Field(1e-4, gt=0, description="Peak learning rate of the discriminator (official code: 1e-4); the "
                        "`train` warm-up and decay apply to it as to the student.")
    lambda_adv: float = Field(1.0, ge=0, description="adversarial: weight of the student's fool-D term.")
    d_updates_per_step: int = Field(1, ge=1, description="adversarial: discriminator updates per training step.")
    optimizer: Literal["adamw", "sgd"] = Field(
        "sgd", description="Optimizer of the student (and of D): sgd with `momentum`, as the released code, or the "
        "core's adamw (train.weight_decay on matrices, train.betas). Both follow the `train` lr schedule.")
    momentum: float = Field(0.9, ge=0, lt=1, description="optimizer=sgd: momentum (the released code: 0.9).")

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "classifier":
            raise ValueError(f"method=meal_v2 distils image classifiers; set domain: classifier (got {run.domain!r})")
        if _structural_terms(run):
            raise ValueError(f"method=meal_v2 compares logits only; loss.terms {_structural_terms(run)} compare "
                             "hidden states. MEAL V2's term is loss.terms: [{name: soft_ce}]")


class FerKDConfig(MethodSection):
    """FerKD (Shen 2023) on a store-fed classifier: each stored crop's soft label adapted by the teacher's
    confidence on the true class, ``c_r = p_T(r)[y]`` (docs/methods/ferkd.md).

    Per image its ``R`` stored views are ranked by ``c_r``: the most confident are discarded (weight 0), the
    least confident calibrated (their target becomes the smoothed ground truth ``(1 - eps) onehot(y) + eps/C``),
    the rest keep the stored soft label (top-k rebuilt by marginal smoothing). Computed once from the store,
    before step 0. SelfMix CutMixes two stored crops of the same image and mixes their targets.
    """

    method: ClassVar[str] = "ferkd"

    calibrate_bottom_frac: float = Field(0.25, ge=0, le=1, description="Fraction of each image's stored views with "
                                         "the lowest c_r whose target is calibrated (floor(frac * R) views).")
    tau_low: float | None = Field(None, ge=0, le=1, description="Also calibrate every view with c_r < tau_low "
                                  "(null: the fraction alone).")
    discard_top_frac: float = Field(0.1, ge=0, lt=1, description="Fraction of each image's stored views with the "
                                    "highest c_r that are dropped (weight 0; floor(frac * R) views).")
    tau_high: float | None = Field(None, gt=0, le=1, description="Also drop every view with c_r >= tau_high "
                                   "(null: the fraction alone).")
    eps: float = Field(0.1, ge=0, le=1, description="Label smoothing of the calibrated target "
                       "(1 - eps) onehot(y) + eps / C.")
    calibrate_target: Literal["smoothed_gt", "mix"] = Field(
        "smoothed_gt", description="smoothed_gt: calibrated views learn the smoothed ground truth. mix: "
        "mix_weight * smoothed_gt + (1 - mix_weight) * p_T(view).")
    mix_weight: float = Field(0.5, ge=0, le=1, description="calibrate_target=mix: weight of the smoothed ground truth.")
    selfmix: bool = Field(False, description="SelfMix: CutMix each training crop with another stored, not dropped "
                          "crop of the same image; target = lambda t(r1) + (1 - lambda) t(r2), lambda area-corrected.")
    selfmix_alpha: float = Field(1.0, gt=0, description="SelfMix: lambda ~ Beta(alpha, alpha) before the area "
                                 "correction (1.0: uniform, as CutMix).")

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "classifier" or run.classifier is None or run.classifier.teacher_source != "store":
            raise ValueError("method=ferkd adapts the soft labels of an image soft-label store: set domain: classifier "
                             "and classifier.teacher_source: store (write the store with `stillroom cache-teacher`)")
        if self.discard_top_frac + self.calibrate_bottom_frac > 1:
            raise ValueError(f"ferkd.discard_top_frac ({self.discard_top_frac}) + ferkd.calibrate_bottom_frac "
                             f"({self.calibrate_bottom_frac}) exceed 1: lower one of them")
        if _structural_terms(run) or not _uses_teacher(run):
            raise ValueError(f"method=ferkd trains on adapted soft targets through the logit terms; loss.terms "
                             f"{_term_names(run)} need a teacher term and no hidden-state term: use "
                             "loss.terms: [{name: soft_ce}]")

class LelpConfig(MethodSection):
    """LELP (Loo et al. 2024): S pseudo-subclasses per class from the teacher's embedding (docs/methods/lelp.md);
    ``loss.terms`` compare the student's S x C outputs with ``p_T(c, s|x)`` (:mod:`stillroom.methods.lelp`)."""

    method: ClassVar[str] = "lelp"

    subclasses: int = Field(4, ge=2, le=64, description="S: pseudo-subclasses per class (the student's head has S "
                            "x classes outputs; the paper: 2..10). At most the teacher's embedding width.")
    beta: float = Field(1.0, gt=0, description="Subclass temperature: softmax_s(u_{c,s}(x) / beta) splits p_T(c|x) "
                        "among the class's subclasses (small: near one-hot subclasses; large: even).")
    pca_by: Literal["label", "teacher"] = Field(
        "label", description="Which training images form each class's PCA: those labelled c, or those the teacher "
        "predicts as c.")
    standardize: bool = Field(True, description="Divide each subclass coordinate u_{c,s} by its standard deviation "
                              "over the class's images (so beta means the same for every class and direction).")
    rotation_seed: int | None = Field(None, description="Seed of the random orthogonal rotation of each class's "
                                      "principal directions (null: the run's seed).")
    alpha: float = Field(0.0, ge=0, description="Weight of cross-entropy with the labels on the aggregated class "
                         "log-probabilities (logsumexp over each class's subclass logits); the paper's main runs: 0.")

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "classifier":
            raise ValueError(f"method=lelp distils image classifiers; set domain: classifier (got {run.domain!r})")
        if "ce" in _term_names(run) or not _uses_teacher(run) or _structural_terms(run):
            raise ValueError(f"method=lelp: loss.terms {_term_names(run)} must be logit terms against the teacher's "
                             "subclass distribution only (e.g. [{name: forward_kl}] or [{name: soft_ce}]); the "
                             "labels are classes, not subclasses: put their cross-entropy in lelp.alpha instead of 'ce'")
        sec = run.classifier
        if sec.teacher_source != "online" or sec.teachers is not None:
            raise ValueError("method=lelp projects one teacher's embeddings: use classifier.teacher (not `teachers`) "
                             "and classifier.teacher_source: online")


METHODS: dict[str, type[MethodSection] | None] = {
    "kd": None,
    "sft": None,
    "onpolicy": OnPolicyConfig,
    "step_by_step": StepByStepConfig,
    "redi": RediConfig,
    "ddk": DdkConfig,
    "conditional": ConditionalConfig,
    "meal_v2": MealV2Config,
    "ferkd": FerKDConfig,
    "unfused": UnfusedConfig,
    "lelp": LelpConfig,
    "dmae": DmaeConfig,
    "self_distill_fpt": SelfDistillFptSection,
    "tsm": None,
    "dmd": DmdConfig,
    "twinflow": TwinFlowConfig,
    "dd2": Dd2Config,
    "cfg_distill": CfgDistillConfig,
    "ogen": OgenConfig,
    "dho": DhoConfig,
    "llava_mod": LlavaModConfig,
    "comd": ComdConfig,
    "specvlm": SpecVlmConfig,
    "copg": CopgConfig,
    "dparallel": DParallelConfig,
    "mend": MendConfig,
    "feature_kd": FeatureKdConfig,
}
"""Every training method by name: its section, or ``None`` (kd: the loss terms against the teacher; sft:
cross-entropy on the data only, no teacher at training time). :mod:`stillroom.methods` implements each."""
