"""The ``vlm`` section: a small LLaVA-style vision-language model run through the language-model domain.

With ``vlm`` set (domain ``lm``), the teacher is a transformers ``LlavaForConditionalGeneration``: loaded from
``vlm.teacher.path`` or built from ``vlm.teacher.arch`` and trained here with cross-entropy, then cached. Records
name an image (``vlm.image_field``); the record encoder puts the image tokens at the front of the prompt and every
batch carries ``pixel_values``. ``vlm.data`` generates the procedural scene questions of
:mod:`stillroom.domains.vl.vqa` into the cache and trains on them (then leave ``data.sources`` unset).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stillroom.config.clip import ClipTeacherConfig
from stillroom.config.core import DataConfig, Strict, TeacherConfig
from stillroom.config.scenes import QA_FAMILIES, ScenesConfig


class VlmArch(Strict):
    """A tiny LLaVA: a CLIP vision tower (``CLIPVisionConfig``), the two-layer GELU projector and a Llama decoder
    (``LlamaConfig``), sharing a byte-level BPE tokenizer trained here on the records' text."""

    patch_size: int = Field(8, ge=2, description="Vision patch side in pixels; image tokens per image = "
                            "(image_size / patch_size)^2 (CLS dropped: vision_feature_select_strategy default).")
    vision_hidden: int = Field(64, ge=8, description="Width of the vision tower.")
    vision_layers: int = Field(2, ge=1, description="Transformer blocks of the vision tower.")
    vision_heads: int = Field(4, ge=1, description="Attention heads of the vision tower.")
    hidden: int = Field(96, ge=8, description="Width of the decoder (hidden_size).")
    layers: int = Field(3, ge=1, description="Decoder layers (num_hidden_layers).")
    heads: int = Field(4, ge=1, description="Decoder attention heads.")
    kv_heads: int = Field(2, ge=1, description="Decoder key/value heads (grouped-query attention).")
    mlp_ratio: int = Field(3, ge=1, description="Decoder and vision MLP width as a multiple of their hidden size.")
    max_positions: int = Field(128, ge=16, description="Decoder max_position_embeddings: image tokens + prompt + "
                               "answer must fit.")
    vocab_size: int = Field(400, ge=300, description="Vocabulary of the BPE tokenizer trained here (256 bytes, "
                            "the special tokens and merges learnt from the records' text).")

    @model_validator(mode="after")
    def _heads_divide(self) -> "VlmArch":
        for width, heads, name in ((self.hidden, self.heads, "hidden/heads"),
                                   (self.vision_hidden, self.vision_heads, "vision_hidden/vision_heads")):
            if width % heads:
                raise ValueError(f"vlm arch: {name} = {width}/{heads} must divide evenly")
        if self.heads % self.kv_heads:
            raise ValueError(f"vlm arch: heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        return self


class VisionWarmupConfig(Strict):
    """A first stage of a VLM teacher trained here on the image-dependent question families alone, before the
    mixed stage: on the five-family mix the decoder settles on the text prior (e.g. "unknown" to every "what
    colour is the <shape>?") and never learns to look; on colour questions alone it must read the image, and
    the image pathway it learns then carries into the mix (docs/methods/llava_mod.md, the warm-up sweep). The same
    stage starts a student (``vlm.student.vision_warmup``; docs/domains.md, the VLM section)."""

    steps: int = Field(1500, ge=1, description="Cross-entropy steps of the warm-up stage (projector, decoder and "
                       "tower unless frozen; the batch size of `vlm.teacher`, or train.micro_batch_size for "
                       "`vlm.student`). Learning colour is a sudden "
                       "transition after a few hundred steps; 400 under the cosine decay were too few in the sweep.")
    families: list[str] = Field(default_factory=lambda: ["colour_of"], min_length=1, description="Question "
                                "families (the records' `family` field) the warm-up trains on; choose from "
                                f"{list(QA_FAMILIES)}. Records of other families wait for the mixed stage.")
    lr: float | None = Field(1e-3, gt=0, description="Peak learning rate of the warm-up (null: vlm.teacher.lr, or "
                             "train.lr for `vlm.student`); "
                             "its own linear warm-up and cosine decay, as every stage. 1e-3 learnt colour in the "
                             "sweep, 2e-3 and 3e-3 did not; the mixed stage after it must stay at 1e-3 or below, "
                             "or it erases what the warm-up learnt.")

    @model_validator(mode="after")
    def _known_families(self) -> "VisionWarmupConfig":
        unknown = sorted(set(self.families) - set(QA_FAMILIES))
        if unknown:
            raise ValueError(f"vision_warmup.families: unknown families {unknown}; choose from "
                             f"{list(QA_FAMILIES)}")
        return self


class VlmTeacherConfig(Strict):
    """Where the VLM teacher comes from: a folder, or built from ``arch`` and trained here once (cached)."""

    path: str | None = Field(None, description="A LlavaForConditionalGeneration folder with its tokenizer (null: "
                             "build one from `arch` and train it here on the run's training records, cached in "
                             "<cache_dir>/vlms/<key>).")
    arch: VlmArch = Field(default_factory=VlmArch, description="Architecture of a teacher built here.")
    steps: int = Field(300, ge=1, description="Cross-entropy steps of a teacher trained here.")
    batch_size: int = Field(16, ge=1, description="Sequences per step of a teacher trained here.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate of a teacher trained here (AdamW, cosine).")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps of a teacher trained here.")
    seed: int | None = Field(None, description="Seed of a teacher trained here (null: the run's seed).")
    vision: Literal["scratch", "clip"] = Field(
        "scratch", description="Where the vision tower of a teacher trained here comes from. scratch: built from "
        "`arch` (random init) and trained with the decoder. clip: a copy of the image tower of the CLIP `clip` "
        "describes (LLaVA's start), whose vision config (image size, patch size: (image_size / patch_size)^2 "
        "image tokens) and image mean/std the VLM then takes; `arch`'s vision fields are unused.")
    clip: ClipTeacherConfig | None = Field(
        None, description="vision clip (unused from scratch): `clip.path` a CLIPModel or VisionTextDualEncoderModel "
        "folder, or the settings of a CLIP trained here once and cached (<cache_dir>/clips/<key>, shared with every "
        "recipe of the same settings); its `clip.image_size` must equal the images' size. null: the default CLIP "
        "settings.")
    freeze_vision: bool = Field(True, description="vision clip: keep the copied tower's weights fixed (LLaVA's "
                                "recipe); false: train it with the decoder.")
    projector_steps: int = Field(0, ge=0, description="vision clip: steps training the projector alone (tower and "
                                 "decoder fixed; LLaVA stage 1) before the `steps` joint steps (projector + "
                                 "decoder, + tower when not frozen). Same batch size and lr.")
    vision_warmup: VisionWarmupConfig | None = Field(
        None, description="A stage on the image-dependent families alone (e.g. colour_of) between the projector "
        "stage and the `steps` mixed steps, so the teacher learns to read its images before the text prior "
        "sets in (VisionWarmupConfig). null: no warm-up (the recipe before RECIPE_VERSION 3).")

    @model_validator(mode="after")
    def _projector_stage_needs_clip(self) -> "VlmTeacherConfig":
        # `clip` and `freeze_vision` are unused from scratch (so `vision=scratch` overrides a CLIP recipe)
        if self.vision == "scratch" and self.projector_steps:
            raise ValueError(f"vlm.teacher.projector_steps={self.projector_steps} but vlm.teacher.vision is "
                             "'scratch': a projector-only stage needs a trained tower; set vision: clip or "
                             "projector_steps: 0")
        return self


class VlmStudentConfig(Strict):
    """How a VLM student starts, for the distilled student and the CE baseline alike (the baseline is a copy of
    the student as it stands after all of this): LLaVA-MoD's students share the teacher's frozen vision encoder,
    and a new decoder must still learn to look at it before the text prior of the mix sets in (as the teacher did,
    ``vlm.teacher.vision_warmup``)."""

    vision_from_teacher: bool = Field(False, description="Copy the teacher's vision tower into the student (and "
                                      "its projector when the shapes match, i.e. the student keeps the teacher's "
                                      "decoder width); needs student.from_config without vision_config changes. "
                                      "false: the tower starts random (as student.from_config builds it).")
    freeze_vision: bool = Field(False, description="Keep the student's vision tower fixed (its weights in neither "
                                "optimizer: the warm-up's nor the main run's); with vision_from_teacher the "
                                "teacher's tower, LLaVA's recipe.")
    vision_warmup: VisionWarmupConfig | None = Field(
        None, description="A cross-entropy stage of the student on the image-dependent families alone (e.g. "
        "colour_of) before the main training, batch size train.micro_batch_size, its own lr; the CE baseline "
        "starts from the warmed-up student too (VisionWarmupConfig). null: none. On vlm_scenes 500 steps at lr "
        "1e-3 then train.lr 1e-3 read colour on 3 seeds; 1500 steps, or train.lr 3e-3 after, lost shape_at on "
        "some seeds (docs/domains.md, the VLM section).")


class VlmDataConfig(Strict):
    """Scene questions generated into the cache (:func:`stillroom.domains.vl.vqa.write_vqa_folder`)."""

    scenes: ScenesConfig = Field(default_factory=ScenesConfig, description="The procedural scenes.")
    images: int = Field(400, ge=2, description="Scenes generated (the held-out split takes data.heldout_fraction "
                        "of the records by hash).")
    per_image: int = Field(3, ge=1, description="Questions asked about each scene.")
    seed: int = Field(0, description="Seed of the generated folder (fixed, so every run sees the same data).")


class VlmConfig(Strict):
    """Settings of a vision-language run of the ``lm`` domain (see the module docstring)."""

    teacher: VlmTeacherConfig = Field(default_factory=VlmTeacherConfig, description="The VLM teacher.")
    student: VlmStudentConfig = Field(default_factory=VlmStudentConfig, description="How the VLM student (and the "
                                      "CE baseline, a copy of it) starts: the teacher's tower, frozen, warmed up.")
    data: VlmDataConfig | None = Field(None, description="Generate scene questions and train on them (null: read "
                                       "`data.sources`, records with an image field).")
    image_field: str = Field("image", description="Record field holding the image file (relative to the "
                             "records file's folder).")
    report_images: int = Field(8, ge=0, description="Held-out questions shown with their image and each model's "
                               "answer in <run>/vlm_generations.html.")

    @model_validator(mode="after")
    def _clip_fits_the_scenes(self) -> "VlmConfig":
        tc = self.teacher
        if tc.vision != "clip" or tc.path is not None or self.data is None:
            return self
        clip = tc.clip or ClipTeacherConfig()
        if clip.path is None and clip.clip.image_size != self.data.scenes.image_size:
            raise ValueError(f"vlm.teacher.clip.clip.image_size={clip.clip.image_size} differs from "
                             f"vlm.data.scenes.image_size={self.data.scenes.image_size}: the CLIP's tower takes the "
                             "scene images as they are; set both to the same size")
        return self


def check_vlm_run(run) -> None:
    """Cross-field rules of a run with a ``vlm`` section (``run``: the RunConfig), checked when the recipe loads."""
    if run.domain != "lm":
        raise ValueError(f"the `vlm` section is set, but domain is {run.domain!r}: a VLM runs in the lm domain; "
                         "remove `domain` or the `vlm` section")
    # by value, not by the fields a recipe named: a run's config.resolved.yaml names every field and must reload
    if run.teacher.model != TeacherConfig().model:
        raise ValueError("teacher.model is set beside the `vlm` section: a VLM teacher comes from vlm.teacher.path "
                         "(a LLaVA folder) or is trained here; move the path to vlm.teacher.path")
    if run.vlm.data is not None and run.data.sources != DataConfig().sources:
        raise ValueError("data.sources is set beside vlm.data: vlm.data generates the run's records; remove one")
    if run.method == "onpolicy":
        raise ValueError("method=onpolicy samples new sequences, which would carry no image; a `vlm` run trains "
                         "on its image records (method kd, sft, specvlm, ...)")
    _check_vlm_sources(run.teacher, "teacher")
    student = run.student
    if student.model is None and student.from_config is None:
        raise ValueError("a VLM student is built with student.from_config (e.g. {text_config: {num_hidden_layers: "
                         "1}}) or loaded with student.model; layer selection (student.from_teacher) is for text "
                         "models")
    if run.vlm.student.vision_from_teacher:
        if student.model is not None:
            raise ValueError("vlm.student.vision_from_teacher=true with student.model: a loaded student keeps its "
                             "own vision tower; build the student with student.from_config, or set "
                             "vlm.student.vision_from_teacher: false")
        if "vision_config" in (student.from_config or {}):
            raise ValueError("vlm.student.vision_from_teacher=true with student.from_config.vision_config: a "
                             "changed tower cannot take the teacher's weights; drop the vision_config changes or "
                             "set vlm.student.vision_from_teacher: false")


def _check_vlm_sources(tcfg, where: str) -> None:
    """Every teacher source of a VLM run must read the images: online (the run's LLaVA, or another LLaVA folder),
    a store written by the VLM teacher, a remote VLM server (each row sends its image) or an ensemble of these.
    Refused here: another tokenizer with a remote or ensemble teacher, and a member that is a text model by its
    reference (a builtin or GGUF model named as its ``model``)."""
    if tcfg.source in ("remote", "ensemble") and tcfg.tokenizer_mode == "cross":
        raise ValueError(f"{where}.tokenizer_mode=cross with {where}.source={tcfg.source} in a VLM run: a teacher "
                         "with another tokenizer reads re-tokenized text, which carries no image placeholders; use "
                         "tokenizer_mode: same (the VLM teacher's tokenizer)")
    if tcfg.source != "ensemble":
        return
    for i, member in enumerate(tcfg.ensemble):
        key = f"{where}.ensemble.{i}"
        named = member.source == "online" and member.model != TeacherConfig().model  # default: the run's VLM teacher
        if named and (member.model.builtin is not None or member.model.gguf is not None):
            raise ValueError(f"{key}.model names a text model ({member.model.builtin or member.model.gguf}), but "
                             "this is a VLM run: every member must read the rows' images; give a LLaVA folder "
                             "(model: {path: ...}), a store, a remote VLM server, or leave model unset (the run's "
                             "VLM teacher)")
        _check_vlm_sources(member, key)
