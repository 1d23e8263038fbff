"""The one typed config tree: :class:`RunConfig`, assembled from its sections.

* :mod:`stillroom.config.core`: teacher, student, data, loss, train, eval (every run);
* :mod:`stillroom.config.methods`: one section per training method with settings
  (``onpolicy``, ``step_by_step``, ``redi``, ``ddk``, ``conditional``);
* :mod:`stillroom.config.commands`: sections of the commands other than ``run``.

Every default lives in those modules, documented on its field. Models are strict
(``extra="forbid"``): an unknown key is an error, reported by
:mod:`stillroom.config.load` with the nearest valid name. The section classes are
re-exported here, so ``from stillroom.config.schema import DataConfig`` works.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from stillroom.config.commands import GenerateConfig, GenerateExport, GenerateInput, SelectConfig
from stillroom.config.prune import PruneConfig
from stillroom.config.cross import check_cross_run
from stillroom.config.store import check_store_run
from stillroom.config.dataset_distill import AstConfig
from stillroom.config.domains import DOMAINS, ClassifierConfig, DomainSection
from stillroom.config.autoregressive import AutoregressiveConfig
from stillroom.config.cfg_distill import CfgDistillConfig
from stillroom.config.dd2 import Dd2Config
from stillroom.config.dho import DhoConfig
from stillroom.config.llava_mod import LlavaModConfig
from stillroom.config.comd import ComdConfig
from stillroom.config.specvlm import SpecVlmConfig
from stillroom.config.copg import CopgConfig
from stillroom.config.masked_diffusion import DParallelConfig, MaskedDiffusionConfig
from stillroom.config.mend import MendConfig
from stillroom.config.dmd import DmdConfig
from stillroom.config.twinflow import TwinFlowConfig
from stillroom.config.vlm import VlmConfig, check_vlm_run
from stillroom.config.codsa import CodsaConfig, check_codsa_run
from stillroom.config.generative import GenerativeConfig
from stillroom.config.mae import DmaeConfig, MaeConfig
from stillroom.config.mlm import MlmConfig, SelfDistillFptSection
from stillroom.config.pretrained_teacher import FeatureKdConfig
from stillroom.config.clip import ClipConfig
from stillroom.config.ogen import OgenConfig
from stillroom.config.core import (
    DataConfig,
    DataSource,
    EvalConfig,
    LayerSelection,
    LoraConfig,
    LossConfig,
    LossTerm,
    ModelSource,
    RemoteConfig,
    StoreConfig,
    Strict,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from stillroom.config.methods import (
    METHODS,
    ConditionalConfig,
    DdkConfig,
    FerKDConfig,
    LelpConfig,
    MealV2Config,
    MethodSection,
    OnPolicyConfig,
    RediConfig,
    StepByStepConfig,
    UnfusedConfig,
)

__all__ = [
    "ConditionalConfig", "DOMAINS", "DataConfig", "DomainSection", "DataSource", "DdkConfig", "EvalConfig", "GenerateConfig", "GenerateExport",
    "GenerateInput", "LM_SECTIONS", "LayerSelection", "LoraConfig", "LossConfig", "LossTerm", "METHODS", "MethodSection",
    "ModelSource", "OnPolicyConfig", "RediConfig", "RemoteConfig", "RunConfig", "SelectConfig", "StepByStepConfig",
    "StoreConfig", "Strict", "StudentConfig", "TeacherConfig", "TrainConfig",
]


LM_SECTIONS = ("teacher", "student", "data")
"""Core sections only the language-model domain reads; another domain's run refuses them."""


MIXING_METHODS = ("kd", "sft", "meal_v2")
"""Classifier methods whose losses take mixed images (the teacher sees the mixed image, ``ce`` both labels)."""


class RunConfig(Strict):
    name: str = Field("run", description="Run folder name under `output_dir`.")
    output_dir: str = Field("runs", description="Folder of run folders (`~` is expanded).")
    seed: int = 0
    domain: str = Field(
        "lm", description="The kind of model: lm (causal language models; the default) or another domain of "
        "stillroom.config.domains, whose section then holds its settings."
    )
    method: str = Field(
        "kd", description="kd: loss terms against the teacher; sft: cross-entropy only, no teacher at training time; "
        "onpolicy: loss terms against the teacher on sequences drawn as `onpolicy` says (student/teacher samples "
        "or fixed data); step_by_step, redi, ddk, conditional: see their sections and docs/METHODS.md."
    )
    baseline: bool = Field(
        False, description="Also train the same student with plain cross-entropy on the same tokens, for the report."
    )
    baseline_wall_time: bool = Field(
        False, description="With baseline: true, also train a second CE baseline from the same initial student for "
        "as many steps as fit in the method's training seconds: floor(the run's summed step seconds / the CE "
        "baseline's seconds per step), at least train.steps; its LR schedule spans its own steps. With "
        "train.schedule: constant its first train.steps steps are the equal-steps baseline's, so it continues that "
        "baseline's last checkpoint (the same weights, those steps not trained twice). Saved in "
        "baseline_wall/, the step count and both times recorded in run.json (--resume and `stillroom eval` reuse "
        "them), and shown in the report as its own row beside the equal-steps baseline."
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    onpolicy: OnPolicyConfig | None = Field(None, description="Sequence sources and sampling of method=onpolicy.")
    step_by_step: StepByStepConfig | None = Field(None, description="Settings of method=step_by_step.")
    redi: RediConfig | None = Field(None, description="Settings of method=redi.")
    ddk: DdkConfig | None = Field(None, description="Settings of method=ddk.")
    conditional: ConditionalConfig | None = Field(None, description="Settings of method=conditional.")
    meal_v2: MealV2Config | None = Field(None, description="Settings of method=meal_v2 (classifier domain).")
    ferkd: FerKDConfig | None = Field(None, description="Settings of method=ferkd (store-fed classifier; FerKD's "
                                      "region calibration and SelfMix).")
    unfused: UnfusedConfig | None = Field(None, description="Settings of method=unfused (classifier domain).")
    lelp: LelpConfig | None = Field(None, description="Settings of method=lelp (classifier domain; LELP subclasses).")
    dmae: DmaeConfig | None = Field(None, description="Settings of method=dmae (domain mae; DMAE feature distillation).")
    self_distill_fpt: SelfDistillFptSection | None = Field(
        None, description="Settings of method=self_distill_fpt (domain mae or mlm; self-distillation for further "
        "pre-training).")
    feature_kd: FeatureKdConfig | None = Field(
        None, description="Settings of method=feature_kd (classifier domain; feature distillation from a pretrained "
        "teacher's pooled features beside the loss terms).")
    mae: MaeConfig | None = Field(None, description="Settings of domain=mae: MAE pre-training of a ViTMAE student.")
    mlm: MlmConfig | None = Field(None, description="Settings of domain=mlm: masked-language-model (further) "
                                  "pre-training of a BERT text encoder (MiniLM-L6 by default).")
    ogen: OgenConfig | None = Field(None, description="Settings of method=ogen (domain clip; prompt fine-tuning of a "
                                    "frozen CLIP with synthesised unknown features and local-mean-teacher "
                                    "self-distillation).")
    clip: ClipConfig | None = Field(None, description="Settings of domain=clip: a small CLIP (image tower built "
                                    "here, MiniLM text tower) trained contrastively on image-caption pairs.")
    generative: GenerativeConfig | None = Field(None, description="Settings of domain=generative: a class-conditional "
                                                "denoiser student distilled from a denoiser teacher.")
    autoregressive: AutoregressiveConfig | None = Field(
        None, description="Settings of domain=autoregressive: a one-step generator of codebook token sequences "
        "distilled from an autoregressive teacher (exact-evaluation toy).")
    masked_diffusion: MaskedDiffusionConfig | None = Field(
        None, description="Settings of domain=masked_diffusion: a small masked-diffusion LM on a deterministic toy "
        "task, its base model trained here once, decoded semi-autoregressively (accuracy vs decoding steps).")
    dparallel: DParallelConfig | None = Field(None, description="Settings of method=dparallel (domain "
                                              "masked_diffusion; certainty-forcing self-distillation).")
    dd2: Dd2Config | None = Field(None, description="Settings of method=dd2 (domain autoregressive; Distilled "
                                  "Decoding 2).")
    dho: DhoConfig | None = Field(None, description="Settings of method=dho (classifier domain; dual-head "
                                  "semi-supervised distillation).")
    cfg_distill: CfgDistillConfig | None = Field(None, description="Settings of method=cfg_distill (domain "
                                                 "autoregressive, markov_modes; diversity-rewarded CFG distillation).")
    llava_mod: LlavaModConfig | None = Field(None, description="Settings of method=llava_mod (LLaVA-MoD: MoE "
                                            "upcycling, mimic and preference distillation).")
    comd: ComdConfig | None = Field(None, description="Settings of method=comd (CoMD: rounds of distillation, "
                                    "assessment and augmentation on scene questions).")
    specvlm: SpecVlmConfig | None = Field(None, description="Settings of method=specvlm (SpecVLM: a draft "
                                          "distilled online from the target's logits and features, acceptance "
                                          "measured during training).")
    copg: CopgConfig | None = Field(None, description="Settings of method=copg (CoPG: contrastive policy gradient "
                                    "on offline completions with scalar rewards).")
    mend: MendConfig | None = Field(None, description="Settings of method=mend (MEND: a distiller of "
                                    "demonstrations into vectors for a frozen LLM, trained by KD inside that LLM).")
    dmd: DmdConfig | None = Field(None, description="Settings of method=dmd (domain generative; DMD, DMD2 and "
                                  "Decoupled DMD).")
    twinflow: TwinFlowConfig | None = Field(None, description="Settings of method=twinflow (domain generative; "
                                            "teacher-free one-step generation with self-adversarial flows).")
    classifier: ClassifierConfig | None = Field(
        None, description="Settings of domain=classifier: the data set, the classifier teacher and the student."
    )
    vlm: VlmConfig | None = Field(None, description="A LLaVA-style vision-language teacher and student in the lm "
                                  "domain: image records, pixel_values in every batch (stillroom.config.vlm).")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Used by `stillroom generate`.")
    select: SelectConfig = Field(default_factory=SelectConfig, description="Used by `stillroom select`.")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="Used by `stillroom prune` (depth, width and sparsity pruning of a model into a smaller Hugging Face folder; stillroom.config.prune).")
    ast: AstConfig = Field(default_factory=AstConfig, description="Used by `stillroom distill-data` (AST dataset "
                           "distillation by trajectory matching; domain: classifier).")
    codsa: CodsaConfig = Field(default_factory=CodsaConfig, description="Used by `stillroom codsa-data` (CoDSA: "
                               "per-class synthesis allocated to thin classes, labelled by the teacher) and by a "
                               "classifier run with codsa.add_to_training.")
    cache_dir: str | None = Field(None, description="Model cache (default: $STILLROOM_CACHE or ~/.cache/stillroom).")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return _known(value, METHODS, "method")

    @field_validator("domain")
    @classmethod
    def _known_domain(cls, value: str) -> str:
        return _known(value, DOMAINS, "domain")

    @model_validator(mode="after")
    def _method_sections(self) -> "RunConfig":
        """A section set for another method is an error; the chosen method's section gets its defaults."""
        for section_cls in (s for s in METHODS.values() if s is not None):
            if section_cls.method != self.method and getattr(self, section_cls.method) is not None:
                raise ValueError(
                    f"the `{section_cls.method}` section is set, but method is {self.method!r}: it is used only by "
                    f"method: {section_cls.method}. Remove the section or set method: {section_cls.method}"
                )
        own = METHODS[self.method]
        if own is not None:
            if getattr(self, own.method) is None:
                object.__setattr__(self, own.method, own())
            getattr(self, own.method).check_run(self)
        return self

    @model_validator(mode="after")
    def _wall_baseline(self) -> "RunConfig":
        if self.baseline_wall_time and not self.baseline:
            raise ValueError("baseline_wall_time: true needs baseline: true (the equal-wall-time baseline's CE step "
                             "time is measured on the equal-steps baseline); set baseline: true, or drop "
                             "baseline_wall_time")
        return self

    @model_validator(mode="after")
    def _domain_sections(self) -> "RunConfig":
        """A domain section set for another domain is an error; the chosen domain's section gets its defaults."""
        for section_cls in (s for s in DOMAINS.values() if s is not None):
            if section_cls.domain != self.domain and getattr(self, section_cls.domain) is not None:
                raise ValueError(f"the `{section_cls.domain}` section is set, but domain is {self.domain!r}; "
                                 f"set domain: {section_cls.domain} or remove the section")
        own = DOMAINS[self.domain]
        if own is not None and getattr(self, own.domain) is None:
            object.__setattr__(self, own.domain, own())
        mix = self.classifier.augment.mix if self.domain == "classifier" else "none"
        if mix != "none" and self.method not in MIXING_METHODS:
            raise ValueError(f"classifier.augment.mix={mix} gives each image two labels, and method {self.method!r} "
                             f"reads one label per image; mixing works with method {', '.join(MIXING_METHODS)}: "
                             "set classifier.augment.mix: none")
        return self

    @model_validator(mode="after")
    def _lm_only_sections(self) -> "RunConfig":
        """Another domain than ``lm`` takes its teacher, student and data from its own section: a recipe
        that sets the language-model sections ``teacher``, ``student`` or ``data`` is refused."""
        if self.domain != "lm":
            given = [s for s in LM_SECTIONS if s in self.model_fields_set]
            if given:
                raise ValueError(
                    f"the `{given[0]}` section is set, but domain is {self.domain!r}: `teacher`, `student` and "
                    f"`data` are language-model (domain: lm) sections. Set them in the `{self.domain}` section "
                    f"(e.g. {self.domain}.teacher, {self.domain}.student) and remove `{given[0]}`"
                )
        return self

    @model_validator(mode="after")
    def _vlm_run(self) -> "RunConfig":
        """A ``vlm`` section: the lm domain, the teacher from ``vlm.teacher``, a student built from a config."""
        if self.vlm is not None:
            check_vlm_run(self)
        return self

    @model_validator(mode="after")
    def _codsa_run(self) -> "RunConfig":
        """Training on a CoDSA transfer set: the classifier domain with an online teacher."""
        check_codsa_run(self)
        return self

    @model_validator(mode="after")
    def _cross_tokenizer(self) -> "RunConfig":
        """``teacher.tokenizer_mode``: what a cross-tokenizer run needs, and ``uld`` only there."""
        check_cross_run(self)
        return self

    @model_validator(mode="after")
    def _sampled_store(self) -> "RunConfig":
        """``teacher.store.signal: sampled``: only terms linear in the teacher's distribution."""
        check_store_run(self)
        return self

    @property
    def run_dir(self) -> Path:
        """The run folder: ``<output_dir>/<name>`` with ``~`` expanded (the one place it is computed)."""
        return Path(self.output_dir).expanduser() / self.name

    @property
    def method_section(self) -> MethodSection | None:
        """The chosen method's section (filled with defaults when the recipe leaves it out)."""
        own = METHODS[self.method]
        return None if own is None else getattr(self, own.method)


def _known(value: str, table: dict, what: str) -> str:
    if value not in table:
        near = difflib.get_close_matches(value, list(table), n=1, cutoff=0.5)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown {what} {value!r}.{hint} Valid: {', '.join(table)}")
    return value
