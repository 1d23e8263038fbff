"""One run, end to end: models -> data -> (evaluate before) -> train -> evaluate -> report.

The order matters and is checked before step 0: models load, the vocabularies
are compared, the data is tokenized, the loss terms are validated; only then does
anything train. The CE baseline (``baseline: true``) trains a copy of the same
initial student on the same examples in the same order.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from stillroom.config.load import dump_config
from stillroom.config.schema import LossConfig, LossTerm, RunConfig
from stillroom.data import ExampleSampler, build_splits, collate
from stillroom.losses import LossMix
from stillroom.methods.hooks import MethodHooks, build_method_hooks
from stillroom.models import apply_lora, check_vocab, derive_student, load_model, tokenizer_hash
from stillroom.teachers.factory import build_teacher_source
from stillroom.teachers.signal import Fingerprint
from stillroom.train.distributed import Topology, init_topology, shutdown
from stillroom.train.loop import TrainResult, train
from stillroom.models.precision import resolve_dtype, resolve_precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Prepared:
    """Everything a run needs, built and checked before step 0."""

    cfg: RunConfig
    run_dir: Path
    topology: Topology
    teacher_model: torch.nn.Module | None
    student: torch.nn.Module
    tokenizer: object
    vocab_size: int
    splits: object
    kept_layers: list[int] | None
    fingerprint: Fingerprint


def run_dir_for(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def prepare(cfg: RunConfig, *, log: Callable[[str], None] = print) -> Prepared:
    topology = init_topology(cfg.train.device)
    # Resolve `auto` once; the resolved values are what config.resolved.yaml records.
    cfg.train.precision = resolve_precision(cfg.train.precision, cfg.train.device)
    cfg.teacher.dtype = resolve_dtype(cfg.teacher.dtype, cfg.teacher.device)
    log(f"precision: train {cfg.train.precision}, teacher weights {cfg.teacher.dtype}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    run_dir = run_dir_for(cfg)
    if topology.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.resolved.yaml").write_text(dump_config(cfg))
    topology.barrier()

    # ---- teacher (needed to derive the student, for KD and for the report) ----------
    teacher_loaded = load_model(cfg.teacher.model, dtype=DTYPES[cfg.teacher.dtype], cache_dir=cfg.cache_dir)
    teacher_model = teacher_loaded.model.to(cfg.teacher.device).eval()
    tokenizer = teacher_loaded.tokenizer
    log(f"teacher: {teacher_loaded.identity}")

    # ---- data (tokenized with the teacher's tokenizer; the student must share it) ----
    splits = build_splits(cfg.data, tokenizer, cfg.seed)
    if not splits.train:
        raise ValueError("the training split is empty: add data or lower data.heldout_fraction")
    log(f"data: {len(splits.train)} train / {len(splits.heldout)} held-out sequences; {_short_stats(splits.stats)}")

    # ---- student ----------------------------------------------------------------------
    kept_layers = None
    if cfg.student.model is not None:
        student_loaded = load_model(cfg.student.model, dtype=DTYPES[cfg.student.dtype], cache_dir=cfg.cache_dir)
        student = student_loaded.model
        student_tok = student_loaded.tokenizer
    elif cfg.student.from_config is not None:
        from stillroom.models import student_from_config

        student = student_from_config(teacher_model, cfg.student.from_config, seed=cfg.seed).to(DTYPES[cfg.student.dtype])
        student_tok = tokenizer
        n_params = sum(x.numel() for x in student.parameters())
        log(f"student: new {student.config.num_hidden_layers}-layer model from the teacher's config "
            f"({n_params / 1e6:.1f}M parameters, random init)")
    else:
        sel = cfg.student.from_teacher
        calibration = None
        if sel.strategy == "angular":
            rows = splits.train[: sel.calibration_batches * cfg.train.micro_batch_size]
            calibration = [
                collate(rows[i : i + cfg.train.micro_batch_size], tokenizer.pad_token_id).input_ids
                for i in range(0, len(rows), cfg.train.micro_batch_size)
            ]
        # derive_student copies the kept layers into a new fp32 model; the teacher is untouched.
        student, kept_layers = derive_student(teacher_model, sel, calibration)
        student = student.to(DTYPES[cfg.student.dtype])
        student_tok = tokenizer
        log(f"student: kept teacher layers {kept_layers}")
    vocab_size = check_vocab(tokenizer, teacher_model, student_tok, student)
    if cfg.student.trainable == "lora":
        student = apply_lora(student, cfg.student.lora)
    fingerprint = Fingerprint(teacher=teacher_loaded.identity, tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=vocab_size)
    return Prepared(cfg, run_dir, topology, teacher_model, student, tokenizer, vocab_size, splits, kept_layers, fingerprint)


def loss_config_for(cfg: RunConfig, method: str) -> LossConfig:
    """The loss mix of a method: ``sft`` is cross-entropy on labels only."""
    if method == "sft":
        return cfg.loss.model_copy(update={"terms": [LossTerm(name="ce")]})
    return cfg.loss


@dataclass
class Objective:
    """What one training run optimises and where its teacher signal comes from (built before step 0)."""

    mix: LossMix
    teacher: object | None
    hooks: MethodHooks


def build_objective(
    p: Prepared, model: torch.nn.Module, *, method: str, run_dir: Path, log: Callable[[str], None]
) -> Objective:
    """Loss terms, teacher source and batch preparation for ``method``; every check that can
    refuse the run (unknown terms, a store that does not match, an unreachable server) happens here."""
    cfg = p.cfg
    student_cfg = getattr(model, "config", None)
    teacher_cfg = getattr(p.teacher_model, "config", None)
    mix = LossMix(
        loss_config_for(cfg, method),
        student_hidden=getattr(student_cfg, "hidden_size", None),
        teacher_hidden=getattr(teacher_cfg, "hidden_size", None),
        student_layers=getattr(student_cfg, "num_hidden_layers", None),
        teacher_layers=getattr(teacher_cfg, "num_hidden_layers", None),
    )
    # The method decides what is sampled and how batches are prepared (stillroom/methods/hooks.py).
    hooks = build_method_hooks(method, p, model, mix=mix, run_dir=run_dir, log=log)
    teacher = None
    if mix.needs_teacher:
        teacher = build_teacher_source(
            cfg, teacher_model=p.teacher_model, vocab_size=p.vocab_size, fingerprint=p.fingerprint,
            hidden_layers=mix.teacher_hidden_layers, output_device=cfg.train.device, train_examples=p.splits.train,
            attentions=mix.needs_attentions,
        )
    return Objective(mix, teacher, hooks)


def periodic_evaluation(p: Prepared) -> Callable[[torch.nn.Module], dict]:
    """Held-out CE, KL to the teacher and top-1 agreement, for ``train.eval_every`` (process 0 only)."""
    from stillroom.eval import evaluate_lm, teacher_logits_from_model
    from stillroom.train.evaluation import heldout_batches

    batches = heldout_batches(p)
    teacher_fn = teacher_logits_from_model(p.teacher_model) if p.teacher_model is not None else None

    def evaluate(model: torch.nn.Module) -> dict:
        m = evaluate_lm(model, batches, teacher_fn, precision=p.cfg.eval.precision, vocab_size=p.vocab_size)
        return {k: m[k] for k in ("heldout_ce", "kl_teacher_student", "top1_agreement") if m.get(k) is not None}

    return evaluate


def train_student(
    p: Prepared, model: torch.nn.Module, objective: Objective | None = None, *, run_dir: Path, resume: bool,
    log: Callable[[str], None], method: str | None = None,
) -> TrainResult:
    """Train ``model`` for ``objective`` (built here from ``method`` when not given)."""
    if objective is None:
        objective = build_objective(p, model, method=method or p.cfg.method, run_dir=run_dir, log=log)
    hooks = objective.hooks
    return train(
        p.cfg, run_dir, model=model, train_examples=hooks.train_examples if hooks.train_examples is not None
        else p.splits.train, pad_id=p.tokenizer.pad_token_id,
        vocab_size=p.vocab_size, mix=objective.mix, teacher=objective.teacher, topology=p.topology, resume=resume,
        evaluate=periodic_evaluation(p) if p.cfg.train.eval_every and p.topology.is_main else None,
        sampler_factory=hooks.sampler_factory or ExampleSampler, prepare_batches=hooks.prepare_batches,
        method_state=hooks.log_state, log=log,
    )


def run(cfg: RunConfig, *, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run a recipe; returns the run folder (with report.json when evaluation is on)."""
    from stillroom.train.evaluation import evaluate_models, write_run_report

    p = prepare(cfg, log=log)
    objective = build_objective(p, p.student, method=cfg.method, run_dir=p.run_dir, log=log)
    initial_state = {k: v.detach().clone() for k, v in p.student.state_dict().items()} if cfg.baseline else None
    models = {}
    if p.topology.is_main:
        models.update(evaluate_models(p, {"teacher": p.teacher_model} | ({"student_before": p.student} if cfg.eval.before else {}), log=log))
    p.topology.barrier()

    t0 = time.perf_counter()
    result = train_student(p, p.student, objective, run_dir=p.run_dir, resume=resume, log=log)
    log(f"{cfg.method}: {result.steps} steps, final loss {result.final_loss:.4f}, median step {result.median_step_s:.2f}s")
    runs = {cfg.method: (p.student, result, p.run_dir / "metrics.jsonl", time.perf_counter() - t0)}

    if cfg.baseline:
        baseline_model = copy.deepcopy(p.student)
        baseline_model.load_state_dict(initial_state)
        t0 = time.perf_counter()
        base_objective = build_objective(p, baseline_model, method="sft", run_dir=p.run_dir / "baseline", log=log)
        base_result = train_student(p, baseline_model, base_objective, run_dir=p.run_dir / "baseline", resume=resume, log=log)
        log(f"baseline (ce): final loss {base_result.final_loss:.4f}, median step {base_result.median_step_s:.2f}s")
        runs["baseline"] = (baseline_model, base_result, p.run_dir / "baseline" / "metrics.jsonl", time.perf_counter() - t0)

    if p.topology.is_main:
        _save_student(p, p.student, p.run_dir / "student")
        if cfg.baseline:
            _save_student(p, runs["baseline"][0], p.run_dir / "baseline" / "student")
        after = evaluate_models(p, {"student_after": p.student} | ({"baseline": runs["baseline"][0]} if cfg.baseline else {}), log=log)
        for key, (_, res, _, secs) in zip(["student_after", "baseline"], runs.values()):
            if key in after:
                after[key].update(train_seconds=round(secs, 2), steps=res.steps, median_step_s=res.median_step_s,
                                  median_teacher_s=res.median_teacher_s, final_train_loss=res.final_loss)
        models.update(after)
        write_run_report(p, models, {k: v[2] for k, v in runs.items()}, log=log)
        if objective.hooks.report is not None:  # the method's own report files (e.g. DDK's domain curves)
            objective.hooks.report(p.run_dir)
    shutdown(p.topology)
    return p.run_dir


def _save_student(p: Prepared, model: torch.nn.Module, folder: Path) -> None:
    """The trained student as a plain HF folder (LoRA adapters merged) + tokenizer."""
    from stillroom.models import merge_lora

    plain = merge_lora(copy.deepcopy(model)) if p.cfg.student.trainable == "lora" else model
    tmp = folder.with_name(folder.name + ".tmp")
    plain.save_pretrained(tmp)
    p.tokenizer.save_pretrained(tmp)
    (tmp / "stillroom.json").write_text(json.dumps({"kept_layers": p.kept_layers, "teacher": p.fingerprint.teacher}))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)


def _short_stats(stats: dict) -> str:
    keys = ["records_read", "records_bad", "records_skipped", "truncated_sequences", "train_tokens", "heldout_tokens"]
    return ", ".join(f"{k}={stats[k]}" for k in keys if k in stats)
