"""The causal-LM domain: teacher and student, the data, the training jobs, saved students.

Before step 0, in order: the teacher loads (it derives the student, provides the
tokenizer and the report's reference numbers); the data is read through the one
pipeline with the method's record encoder; the student is loaded, built from the
teacher's config or derived from its layers; the vocabularies are compared. A
training job then binds a model to the method's loss terms, its teacher source
(online, store, remote or ensemble: checked here, before step 0) and its plan.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from stillroom.compress.masks import FixedMasks
from stillroom.config.schema import LossTerm, RunConfig, TeacherConfig
from stillroom.data import DataSplits, build_splits, collate
from stillroom.data.batch import ExampleSampler
from stillroom.data.packing import check_document_attention, refuse_within_documents
from stillroom.domains.lm.evaluate import evaluate_models, periodic_evaluation, teacher_logits_fn
from stillroom.domains.lm.forward import StudentForward
from stillroom.losses import LossMix
from stillroom.domains.lm.head_teacher import head_mode_teacher, liger_teacher
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.models import (
    apply_lora, check_vocab, derive_student, load_model, merge_lora, student_from_config, tokenizer_hash, unwrap,
    use_eager_attention,
)
from stillroom.models.moe import upcycle_student
from stillroom.models.precision import torch_dtype
from stillroom.teachers.factory import build_teacher_source
from stillroom.teachers.signal import Fingerprint

if TYPE_CHECKING:
    from stillroom.teachers.cross_align import CrossVocab
from stillroom.train.distributed import Topology, resolve_device
from stillroom.train.compile import compile_forward
from stillroom.train.loop import DistillObjective, Player, TrainJob

Log = Callable[[str], None]


@dataclass
class LmRun:
    """A causal-LM run's models and data, loaded and checked before step 0."""

    cfg: RunConfig
    topology: Topology
    device: torch.device
    teacher_model: torch.nn.Module
    student: torch.nn.Module
    tokenizer: Any
    vocab_size: int
    data: DataSplits
    kept_layers: list[int] | None
    fingerprint: Fingerprint
    cross: "CrossVocab | None" = None
    """The two vocabularies and the aligner when the teacher's tokenizer differs (``tokenizer_mode: cross``)."""
    teacher_tokenizer: Any = None
    """The teacher's own tokenizer (``tokenizer`` is the student's, which tokenized the data)."""
    vlm_folder: Path | None = None
    """A VLM teacher's folder: its ``preprocessor_config.json`` says how the run's images were normalised, and the
    saved student carries the same settings."""

    @functools.cached_property
    def heldout_teacher(self) -> Callable | None:
        """The teacher's side of every held-out evaluation of this run (:func:`teacher_logits_fn`): one per run,
        so its remembered target rows serve the evaluations before and after training and ``train.eval_every``."""
        return teacher_logits_fn(self)

    def loss_mix(self, model: torch.nn.Module, method: Method) -> LossMix:
        """The loss terms of ``method`` (``sft``: cross-entropy alone) sized for ``model`` and the teacher."""
        loss_cfg = self.cfg.loss
        if method.ce_only:
            loss_cfg = loss_cfg.model_copy(update={"terms": [LossTerm(name="ce")], "kernel": "stillroom"})
        s_cfg, t_cfg = (_text_config(m) for m in (model, self.teacher_model))
        return LossMix(loss_cfg, student_hidden=getattr(s_cfg, "hidden_size", None),
                       teacher_hidden=getattr(t_cfg, "hidden_size", None),
                       student_layers=getattr(s_cfg, "num_hidden_layers", None),
                       teacher_layers=getattr(t_cfg, "num_hidden_layers", None))

    def job(self, model: torch.nn.Module, method: Method, *, baseline: bool, run_dir: Path, resume: bool,
            log: Log) -> tuple[TrainJob, MethodPlan]:
        """Train ``model`` with ``method`` on the method's view of the data, or, for the CE baseline, on the
        plain view (:class:`~stillroom.data.pipeline.DataSplits`)."""
        cfg = self.cfg
        examples, heldout = (self.data.baseline_train, self.data.baseline_heldout) if baseline else \
            (self.data.train, self.data.heldout)
        mix = self.loss_mix(model, method)
        plan = method.plan(MethodContext(
            cfg=cfg, run_dir=run_dir, model=model, data=self.data, tokenizer=self.tokenizer,
            teacher_model=self.teacher_model, vocab_size=self.vocab_size, topology=self.topology, mix=mix, log=log))
        teacher = None
        if mix.needs_teacher:
            teacher = build_teacher_source(
                cfg, teacher_model=self.teacher_model, vocab_size=self.vocab_size, fingerprint=self.fingerprint,
                hidden_layers=mix.teacher_hidden_layers, output_device=self.device, train_examples=examples,
                attentions=mix.needs_attentions, log=log, cross=self.cross,
            )
        fused = cfg.loss.fused and mix.needs_logits
        if mix.liger is not None:  # loss.kernel=liger: the teacher's hidden state and head, not its logits
            teacher = liger_teacher(cfg, teacher)
        elif fused and teacher is not None and not cfg.train.shard_teacher:  # the fused loss makes the teacher's
            teacher = head_mode_teacher(teacher, mix)  # logits a chunk at a time too (a sharded head: not split)
        if mix.needs_attentions:
            use_eager_attention(model)
        if cfg.train.activation_checkpointing:
            _activation_checkpointing(model)
        forward = StudentForward(model, fused=fused, hidden_layers=mix.student_hidden_layers, vocab=self.vocab_size,
                                 attentions=mix.needs_attentions)
        if cfg.train.compile:
            compile_forward(forward)
        player = Player("student", model, DistillObjective(forward, mix, teacher),
                        replace_batches=plan.replace_batches, weight_targets=plan.weight_targets,
                        after_update=_fixed_masks(cfg, model, log))
        players = plan.players(player) if plan.players is not None else [player]  # e.g. LLaVA-MoD's
        evaluate = periodic_evaluation(self, heldout) if cfg.train.eval_every and self.topology.is_main else None
        job = TrainJob(
            train=cfg.train, seed=cfg.seed, run_dir=run_dir, run_name=cfg.name, players=players, examples=examples,
            collate=functools.partial(collate, pad_id=self.tokenizer.pad_token_id), topology=self.topology,
            device=self.device, sampler=plan.sampler or ExampleSampler, group_size=1 if baseline else
            self.data.group_size, evaluate=evaluate, metrics=plan.metrics, resume=resume, log=log, unit="tok",
        )
        return job, plan

    def evaluate(self, models: dict[str, tuple[torch.nn.Module, list]], log: Log, *,
                 timed: bool = True) -> dict[str, dict]:
        return evaluate_models(self, models, log=log, timed=timed)

    def save_model(self, model: torch.nn.Module, folder: Path) -> None:
        """The trained student as a plain HF folder (LoRA adapters merged) + tokenizer, renamed into place."""
        plain = merge_lora(copy.deepcopy(model)) if self.cfg.student.trainable == "lora" else model
        quant = self.cfg.student.quantize
        if quant is not None:  # the grid weights (or the latent ones) in plain Linear layers
            from stillroom.compress.quant_export import export_model

            plain = export_model(model, quant)
        tmp = folder.with_name(folder.name + ".tmp")
        plain.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        (tmp / "stillroom.json").write_text(json.dumps({"kept_layers": self.kept_layers,
                                                         "teacher": self.fingerprint.teacher}))
        if self.cfg.vlm is not None:  # the image settings, for loading it as a VLM teacher or target
            from stillroom.domains.vl.vlm_model import image_ref, write_preprocessor

            ref = image_ref(plain, "", self.vlm_folder)  # the mean/std the run's images were read with
            write_preprocessor(tmp, ref.size, ref.mean, ref.std)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        if quant is not None and "gguf" in quant.export:  # <folder>.gguf beside it, from the latent weights
            from stillroom.compress.quant_export import gguf_path, write_gguf

            write_gguf(model, self.tokenizer, gguf_path(folder), log=print)

    def load_model(self, folder: Path) -> torch.nn.Module:
        from stillroom.models.load import model_class

        return model_class(str(folder)).from_pretrained(folder, dtype=torch.float32)

    def report_notes(self) -> list[str]:
        notes = [f"student keeps teacher layers {self.kept_layers}"] if self.kept_layers is not None else []
        if self.cross is not None:
            from stillroom.domains.lm.cross import NO_SHARED_VOCAB

            notes.append(f"cross-tokenizer: {self.cross.matched_student.numel()} of {self.vocab_size} student tokens "
                         f"spell a teacher token; {NO_SHARED_VOCAB}")
        if self.cfg.student.fixed_sparsity is not None:  # the achieved sparsity of the trained student
            s = FixedMasks.from_zeros(self.student, self.cfg.student.fixed_sparsity.modules).summary()
            notes.append(f"trained student: {s['zeros']} of {s['numel']} weights zero ({s['sparsity']:.1%}) in "
                         f"{len(s['modules'])} fixed-sparsity linear layers")
        if self.cfg.student.quantize is not None:
            notes.append(f"student rows measure the {self.cfg.student.quantize.format}-quantized student (the "
                         "fake-quant forward: dequantized grid weights, as exported); the teacher is full precision")
        stats = self.data.stats
        notes.append("data: " + ", ".join(f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float))))
        return notes


class LmDomain:
    name = "lm"

    def prepare(self, cfg: RunConfig, topology: Topology, method: Method, log: Log) -> LmRun:
        """Load and check the teacher, the data and the student (see the module docstring)."""
        refuse_within_documents(cfg)
        teacher_device = resolve_device(cfg.teacher.device, topology, name="teacher.device")
        data_cfg, vlm_folder = cfg.data, None
        if cfg.vlm is not None:  # a LLaVA-style teacher (loaded or trained here) and image records
            from stillroom.domains.vl.vlm_teacher import load_vlm_teacher, vlm_data_config

            data_cfg = vlm_data_config(cfg)
            teacher_loaded, vlm_folder = load_vlm_teacher(cfg, data_cfg, topology, teacher_device, log)
        else:
            teacher_loaded = load_model(cfg.teacher.model, dtype=torch_dtype(cfg.teacher.dtype),
                                        cache_dir=cfg.cache_dir)
        teacher_model = teacher_loaded.model.to(teacher_device)
        teacher_model = teacher_model.eval()
        tokenizer = teacher_loaded.tokenizer
        for line in teacher_lines(cfg, teacher_loaded.identity):
            log(line)
        cross_student = None
        if cfg.teacher.tokenizer_mode == "cross":  # the student's tokenizer reads the data (domains/lm/cross.py)
            from stillroom.domains.lm.cross import cross_student as build, load_student_tokenizer

            cross_student = build(cfg, teacher_model, load_student_tokenizer(cfg, tokenizer, log), log)
            tokenizer = cross_student[1]

        # the data, tokenized with the teacher's tokenizer (the student must share it)
        encoder = method.encoder(cfg) if method.encoder is not None else None
        if cfg.vlm is not None:
            encoder = _vlm_encoder(cfg, method, teacher_model, vlm_folder)
        steer = method.steer_fraction(cfg) if method.steer_fraction is not None else 0.0
        data = build_splits(data_cfg, tokenizer, cfg.seed, encoder, steer_fraction=steer, log=log)
        log(f"data: {len(data.train)} train / {len(data.heldout)} held-out sequences; {_short_stats(data.stats)}")

        if cross_student is not None:
            (student, student_tok), kept_layers = cross_student, None
        else:
            student, student_tok, kept_layers = _student(cfg, teacher_model, tokenizer, data, log)
        if cfg.llava_mod is not None:  # LLaVA-MoD's sparse student, upcycled from the dense one
            student = upcycle_student(student, cfg.llava_mod.moe, aux_coef=cfg.llava_mod.aux_coef,
                                      seed=cfg.seed, log=log)
        if cfg.vlm is not None:  # vlm.student: the teacher's tower, frozen, a vision warm-up (baseline alike)
            from stillroom.domains.vl.vlm_student import prepare_vlm_student

            student = prepare_vlm_student(cfg, student, teacher_model, tokenizer, data.train,
                                          resolve_device(cfg.train.device, topology), log)
        cross = None
        if cross_student is not None:
            from stillroom.domains.lm.cross import setup_cross
            from stillroom.models.builtin import cache_root

            vocab_size, cross = setup_cross(teacher_loaded.tokenizer, teacher_model, student_tok, student,
                                            data.train + data.heldout, log,
                                            chat_template=cfg.teacher.cross.chat_template,
                                            vocab_map=cfg.teacher.cross.vocab_map,
                                            cache_dir=cache_root(cfg.cache_dir) / "cross_vocab")
        else:
            vocab_size = check_vocab(tokenizer, teacher_model, student_tok, student)
        if cfg.student.trainable == "lora" and cfg.student.lora.init != "default":  # CorDA (docs/methods/corda.md)
            from stillroom.models.corda import apply_corda, corda_calibration

            student = apply_corda(student, cfg.student.lora, corda_calibration(cfg, tokenizer), log,
                                  device=resolve_device(cfg.train.device, topology))
        elif cfg.student.trainable == "lora":
            student = apply_lora(student, cfg.student.lora)
        if cfg.student.quantize is not None:  # QAT / QAD on a llama.cpp grid (docs/methods/qad.md)
            from stillroom.compress.quant_export import quant_aware_student

            quant_aware_student(student, cfg.student.quantize, tokenizer, log=log)
        if data_cfg.pack and data_cfg.attention == "within_documents":  # the models honour the document mask
            check_document_attention(student, "student")
            check_document_attention(teacher_model, "teacher")
        fingerprint = Fingerprint(teacher=teacher_loaded.identity, tokenizer_hash=tokenizer_hash(tokenizer),
                                  vocab_size=vocab_size)
        return LmRun(cfg, topology, resolve_device(cfg.train.device, topology), teacher_model, student, tokenizer,
                     vocab_size, data, kept_layers, fingerprint, cross, teacher_loaded.tokenizer, vlm_folder)


def teacher_lines(cfg: RunConfig, identity: str) -> list[str]:
    """What the run says about its teacher when it starts: the loaded model, and with ``teacher.source=remote``
    that training reads the server while the report's teacher row is the local model (and, where ``teacher.model``
    is left at its default, that the report compares against that default)."""
    t = cfg.teacher
    if t.source != "remote":
        return [f"teacher: {identity}"]
    served = f" (model {t.remote.model})" if t.remote.model else ""
    if cfg.vlm is not None:  # the VLM teacher is vlm.teacher (teacher.model is refused beside a vlm section)
        return [f"teacher: remote {t.remote.url}{served} for training, each row sent with its image; the report's "
                f"teacher row uses the local VLM teacher {identity} (vlm.teacher), which should be the served one"]
    if t.tokenizer_mode == "cross":
        lines = [f"teacher: remote {t.remote.url}{served} for training, sent the student's text in the tokens of "
                 f"the local {identity} (teacher.model), which must be the served model's tokenizer; the report's "
                 "teacher row (bits per byte, speed) uses that local model"]
    else:
        lines = [f"teacher: remote {t.remote.url}{served} for training; the report's teacher row (reference CE, "
                 f"KL, top-1, speed) uses the local model {identity} loaded from teacher.model"]
    if t.model == TeacherConfig().model:
        default = t.model.path or t.model.gguf or f"builtin:{t.model.builtin}"
        lines.append(f"teacher.model is left at its default ({default}): the report compares the "
                     "students against that model, not against the one the server serves; set teacher.model to "
                     "the served model (a folder, hub id or GGUF file) for a like-for-like report")
    return lines


def _student(cfg: RunConfig, teacher_model: torch.nn.Module, tokenizer, data: DataSplits, log: Log):
    """``(student, its tokenizer, kept teacher layers or None)`` as ``student`` says."""
    dtype = torch_dtype(cfg.student.dtype)
    if cfg.student.model is not None:
        loaded = load_model(cfg.student.model, dtype=dtype, cache_dir=cfg.cache_dir)
        return loaded.model, loaded.tokenizer, None
    if cfg.student.from_config is not None:
        if cfg.vlm is not None:  # nested text_config / vision_config changes
            from stillroom.domains.vl.vlm_model import vlm_student

            student = vlm_student(teacher_model, cfg.student.from_config, seed=cfg.seed).to(dtype)
        else:
            student = student_from_config(teacher_model, cfg.student.from_config, seed=cfg.seed).to(dtype)
        n_params = sum(x.numel() for x in student.parameters())
        layers = student.config.get_text_config().num_hidden_layers
        log(f"student: new {layers}-layer model from the teacher's config "
            f"({n_params / 1e6:.1f}M parameters, random init)")
        return student, tokenizer, None
    sel = cfg.student.from_teacher
    calibration = None
    if sel.strategy == "angular":
        rows = data.baseline_train[: sel.calibration_batches * cfg.train.micro_batch_size]
        mbs = cfg.train.micro_batch_size
        calibration = [collate(rows[i : i + mbs], tokenizer.pad_token_id).input_ids for i in range(0, len(rows), mbs)]
    # derive_student copies the kept layers into a new fp32 model; the teacher is untouched.
    student, kept_layers = derive_student(teacher_model, sel, calibration)
    log(f"student: kept teacher layers {kept_layers}")
    return student.to(dtype), tokenizer, kept_layers


def _fixed_masks(cfg: RunConfig, model: torch.nn.Module, log: Log) -> Callable[[], None] | None:
    """``student.fixed_sparsity``: the masks of ``model``'s zero weights, re-applied after every update (the
    player's ``after_update``); None for a dense run. A model with no zeros there is refused (nothing to keep)."""
    fixed = cfg.student.fixed_sparsity
    if fixed is None:
        return None
    masks = FixedMasks.from_zeros(model, fixed.modules)
    if masks.mask_sparsity() == 0:
        raise ValueError(f"student.fixed_sparsity: the student has no zero weights in {fixed.modules}; prune it "
                         "first (stillroom prune with prune.sparsity) and load the pruned folder as student.model")
    log(f"fixed sparsity: {masks.mask_sparsity():.1%} of the weights of {len(masks.masks)} linear layers stay zero")
    return masks.apply


def _activation_checkpointing(model: torch.nn.Module) -> None:
    """``train.activation_checkpointing``: Hugging Face activation (gradient) checkpointing of every decoder layer
    of ``model``, non-reentrant (frozen inputs, LoRA and autocast need nothing more; transformers 5 names it
    ``activation_checkpointing_enable``, the old ``gradient_checkpointing_enable`` warns), or a named error for a
    model without it."""
    if not getattr(unwrap(model), "supports_gradient_checkpointing", False):
        raise ValueError(f"train.activation_checkpointing: {type(unwrap(model)).__name__} does not support "
                         "gradient checkpointing; set train.activation_checkpointing=false")
    unwrap(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def _text_config(model: torch.nn.Module | None):
    """A model's decoder config (a vision-language model's ``text_config``; a text model's own), or None."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _vlm_encoder(cfg: RunConfig, method: Method, teacher_model: torch.nn.Module, folder: Path | None):
    """The record encoder of a VLM run: image tokens in the prompt (methods with encoders of their own are
    refused: their sequences would carry no image)."""
    from stillroom.domains.vl.vlm_teacher import vlm_encoder

    if method.encoder is not None and method.encoder(cfg) is not None:  # llava_mod's mimic stage has none
        raise ValueError(f"method {cfg.method!r} builds its own sequences, which carry no image; a `vlm` run "
                         "supports methods on plain records (kd, sft, specvlm, ...)")
    return vlm_encoder(teacher_model, folder, cfg.vlm.image_field)


def _short_stats(stats: dict) -> str:
    keys = ["records_read", "records_bad", "records_skipped", "truncated_sequences", "train_tokens", "heldout_tokens"]
    return ", ".join(f"{k}={stats[k]}" for k in keys if k in stats)
