"""``stillroom run``: one run end to end, in the order a reader expects.

1. resolve what ``auto`` means on this machine; check the run folder before anything loads
   (:mod:`stillroom.run.folder`): a new run refuses a folder holding a run unless told ``--overwrite``; a
   ``--resume`` compares the config with the saved ``config.resolved.yaml`` (only safe settings may change),
   checks that the checkpoints are this run's, and stops at once, changing nothing, if the run is finished;
2. the domain prepares the models and the data, and the training jobs are built (everything that can
   refuse the run fails here, before step 0); only then is the run folder written: ``--overwrite`` deletes the
   old run, ``run.json`` (the run id) and ``config.resolved.yaml`` are written;
3. the teacher and the student before training are evaluated (on ``--resume``, their results are taken from
   ``run.json`` / the saved report instead);
4. the method's training job runs (:func:`stillroom.train.loop.train`);
5. with ``baseline: true``, a copy of the initial student trains with cross-entropy
   alone on the plain view of the same data, in the same order; with ``baseline_wall_time: true``, another
   copy then trains with CE for as many steps as fit in the method's training seconds
   (:mod:`stillroom.run.wall_baseline`: decided once, recorded in ``run.json``);
6. the students are saved and evaluated, and the report is written (training figures of the whole run, from
   ``metrics.jsonl``), with the method's own report files.

Every line of the log carries the seconds since the command started (:func:`timed`), so the start-up phases
(teacher, data, student, vocabulary, teacher source, evaluations, training, report) can be read off it.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch

from stillroom.config.load import ConfigError, dump_config
from stillroom.config.schema import RunConfig
from stillroom.domains import DOMAINS, PreparedRun
from stillroom.domains.base import merge_rows
from stillroom.eval.speed import SPEED_KEYS, architecture_key
from stillroom.methods import METHODS, Method
from stillroom.models.precision import auto_reason, resolve_dtype, resolve_precision
from stillroom.run import folder as rf
from stillroom.run import wall_baseline as wb
from stillroom.run.checks import check_run
from stillroom.run.report import write_run_report
from stillroom.train.distributed import init_topology, shutdown
from stillroom.train.checkpoint import latest_checkpoint, wait_for_writes
from stillroom.train.loop import train

Log = Callable[[str], None]


def timed(log: Log) -> Log:
    """``log`` with the seconds since this call in front of every line (``[  12.3 s] data: ...``)."""
    if getattr(log, "timed", False):
        return log
    t0 = time.perf_counter()

    def timed_log(message: str) -> None:
        log(f"[{time.perf_counter() - t0:7.1f} s] {message}")

    timed_log.timed = True  # type: ignore[attr-defined]
    return timed_log


def resolve_auto(cfg: RunConfig, log: Log | None = None) -> None:
    """Resolve ``auto`` in place; the resolved values are what ``config.resolved.yaml`` records. ``log``: say what
    decided it, when something was ``auto`` (on a CPU: the measured bf16 speed)."""
    if log is not None and "auto" in (cfg.train.precision, cfg.teacher.dtype if cfg.domain == "lm" else None):
        why = auto_reason(cfg.train.device)
        log(f"precision auto: {why or 'bf16 where the device has it, else fp32'}")
    cfg.train.precision = resolve_precision(cfg.train.precision, cfg.train.device)
    if cfg.domain == "lm":  # the other domains' teachers are their own sections' business
        cfg.teacher.dtype = resolve_dtype(cfg.teacher.dtype, cfg.teacher.device)


def prepare_run(cfg: RunConfig, *, log: Log = print) -> tuple[PreparedRun, Method]:
    """The prepared run of ``cfg`` (``auto`` resolved; models and data loaded and checked) and its method.
    Writes nothing into the run folder."""
    method = check_run(cfg, log=log)
    return _prepare(cfg, method, log), method


def _prepare(cfg: RunConfig, method: Method, log: Log) -> PreparedRun:
    topology = init_topology(cfg.train.device)
    resolve_auto(cfg, log)
    if cfg.domain == "lm":
        log(f"precision: train {cfg.train.precision}, teacher weights {cfg.teacher.dtype}")
        _log_teacher_source(cfg, log)
    else:
        log(f"precision: train {cfg.train.precision}; preparing the {cfg.domain} data, teacher and student")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    prep = DOMAINS[cfg.domain].prepare(cfg, topology, method, log)
    if prep.teacher_model is not None:  # the teacher is never trained: the report shows 0 trainable parameters
        prep.teacher_model.requires_grad_(False)
    vocab = getattr(prep, "vocab_size", None)
    if vocab is not None and cfg.domain == "lm" and cfg.teacher.tokenizer_mode == "same":
        log(f"vocabulary: teacher and student share {vocab} tokens")
    return prep


def _log_teacher_source(cfg: RunConfig, log: Log) -> None:
    src = cfg.teacher.model
    if cfg.vlm is not None:
        log(f"teacher: the VLM {cfg.vlm.teacher.path or 'trained here (or cached) from vlm.teacher'}")
        return
    if src.builtin is not None:
        from stillroom.models.builtin import builtin_folder

        folder = builtin_folder(src.builtin, cfg.cache_dir)
        if not folder.exists():
            log(f"teacher: converting builtin model {src.builtin} into {folder} (once; about 30 s)")
            return
        log(f"teacher: loading builtin model {src.builtin} from {folder} (checksums verified first)")
        return
    log(f"teacher: loading {src.path or src.gguf}")


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, log: Log = print) -> Path:
    """Run a recipe; returns the run folder (with report.json). See the module docstring for the order."""
    log = timed(log)
    if resume and overwrite:
        raise ConfigError("give --resume (continue the run) or --overwrite (delete it and start again), not both")
    run_dir = cfg.run_dir
    method = check_run(cfg, log=log)  # files and settings, before any model loads
    resolve_auto(cfg, log)
    resolved = dump_config(cfg)
    wall_steps = (wb.recorded(run_dir, cfg.train.steps) or {}).get("steps", 0) if cfg.baseline_wall_time else None
    state = rf.check_resume(run_dir, resolved, steps=cfg.train.steps, baseline=cfg.baseline,
                            wall_steps=wall_steps) if resume else None
    if resume and state is None:
        log(f"--resume: {run_dir} holds no run yet; starting a new one")
    if not resume and not overwrite:
        rf.refuse_existing(run_dir)
    if state is not None:
        _log_resume(state, run_dir, cfg, log)
        if state.finished:
            return run_dir

    prep = _prepare(cfg, method, log)
    main = prep.topology.is_main
    resume = state is not None
    source = f" and its teacher source ({cfg.teacher.source})" if cfg.domain == "lm" and not method.ce_only else ""
    log(f"building the {cfg.method} training job{source}")
    job, plan = prep.job(prep.student, method, baseline=False, run_dir=run_dir, resume=resume, log=log)
    initial_state = {k: v.detach().clone() for k, v in prep.student.state_dict().items()} if cfg.baseline else None

    run_id = _open_run_folder(prep, state, resolved, overwrite, log)
    job.run_id = run_id  # every checkpoint carries it (train/session.py)

    models = _before(prep, cfg, state, log) if main else {}
    before_architecture = architecture_key(prep.student) if main else None  # speed_before compares it
    prep.topology.barrier()

    log(f"training: {cfg.train.steps} steps ({cfg.method})")
    trained = {"student_after": _train(job, log, cfg.method)}
    if cfg.baseline:
        baseline_model = copy.deepcopy(prep.student)
        baseline_model.load_state_dict(initial_state)
        base_job, _ = prep.job(baseline_model, METHODS["sft"], baseline=True, run_dir=run_dir / "baseline",
                               resume=resume, log=log)
        base_job.run_id = run_id
        log(f"baseline: {cfg.train.steps} steps with cross-entropy alone")
        trained["baseline"] = _train(base_job, log, "baseline (ce)")
    if cfg.baseline_wall_time:
        wall_model = _train_wall_baseline(prep, initial_state, trained, run_id, resume, log)

    if main:
        log("saving the students")
        prep.save_model(prep.student, run_dir / "student")
        after = {"student_after": (prep.student, prep.data.heldout)}
        if cfg.baseline:
            prep.save_model(baseline_model, run_dir / "baseline" / "student")
            after["baseline"] = (baseline_model, prep.data.baseline_heldout)
        if cfg.baseline_wall_time:
            prep.save_model(wall_model, run_dir / wb.FOLDER / "student")
            after[wb.ROW] = (wall_model, prep.data.baseline_heldout)
        log(f"evaluating after training: {', '.join(after)}")
        results = prep.evaluate(after, log)
        files = {"student_after": run_dir / "metrics.jsonl", "baseline": run_dir / "baseline" / "metrics.jsonl",
                 wb.ROW: run_dir / wb.FOLDER / "metrics.jsonl"}
        for key, result in trained.items():
            results[key].update(_figures(result, files[key]))
        metrics_files = {cfg.method if key == "student_after" else key: f for key, f in files.items()}  # curve labels
        models = merge_rows(models, results)  # the teacher's row gains its speed timed beside the students
        models = speed_before(models, before_architecture, prep.student, log)
        if plan.report_rows is not None:  # what the method trained that the domain's evaluation does not see
            models = merge_rows(models, plan.report_rows())
        log("writing the report")
        write_run_report(prep, models, metrics_files, log=log)
        if plan.report is not None:  # the method's own report files (e.g. DDK's domain curves)
            plan.report(run_dir)
    wait_for_writes()  # the final checkpoints, written while the run evaluated (_train)
    shutdown(prep.topology)
    return run_dir


def _open_run_folder(prep: PreparedRun, state: rf.ResumeState | None, resolved: str, overwrite: bool,
                     log: Log) -> str:
    """The run's id; process 0 clears the folder (``--overwrite``) and writes ``run.json`` and the resolved config,
    once every process has checked the folder and before any of them goes on."""
    cfg, run_dir, resume = prep.cfg, prep.cfg.run_dir, state is not None
    prep.topology.barrier()  # every process has checked the folder before process 0 changes it
    run_id = state.run_id if state is not None and state.run_id else rf.new_run_id()
    if prep.topology.is_main:
        if overwrite and rf.run_files(run_dir):
            rf.clear_run_folder(run_dir, rf.kept_inputs(run_dir, _inputs(cfg)), log)
        info = rf.read_run_json(run_dir) if resume else {}
        rf.write_run_json(run_dir, {**info, "run_id": run_id, "name": cfg.name,
                                    "started": info.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        rf.write_atomic(run_dir / rf.CONFIG, resolved)
        log(f"run {run_id}: {run_dir}" + (" (resumed)" if resume else ""))
    prep.topology.barrier()
    return run_id


def _train_wall_baseline(prep: PreparedRun, initial_state: dict, trained: dict, run_id: str, resume: bool,
                         log: Log) -> torch.nn.Module:
    """The CE baseline at equal wall time: the initial student trained with CE for the steps decided (or
    recorded) by :func:`stillroom.run.wall_baseline.decide` (process 0 decides; every process reads run.json)."""
    cfg, run_dir = prep.cfg, prep.cfg.run_dir
    if prep.topology.is_main:
        wb.decide(run_dir, cfg.train.steps, log)
    prep.topology.barrier()
    steps = wb.recorded(run_dir, cfg.train.steps)["steps"]
    model = copy.deepcopy(prep.student)
    model.load_state_dict(initial_state)
    continued = cfg.baseline and wb.continues_baseline(cfg.train, steps)
    if continued and prep.topology.is_main:
        copied = wb.seed_from_baseline(run_dir, cfg.train.steps)
        if copied is not None:
            log(f"baseline at equal wall time: continues the equal-steps baseline from {copied} (its first "
                f"{cfg.train.steps} learning rates do not depend on the run's length, train.schedule="
                f"{cfg.train.schedule}: training them again would repeat them exactly)")
    prep.topology.barrier()
    own = latest_checkpoint(run_dir / wb.FOLDER / "checkpoints") is not None
    job, _ = prep.job(model, METHODS["sft"], baseline=True, run_dir=run_dir / wb.FOLDER,
                      resume=resume or (continued and own), log=log)
    job.train = cfg.train.model_copy(update={"steps": steps})  # its LR schedule spans its own steps
    job.run_id = run_id
    log(f"baseline at equal wall time: {steps} steps with cross-entropy alone")
    trained[wb.ROW] = _train(job, log, "baseline (ce, equal wall time)")
    return model


def _log_resume(state: rf.ResumeState, run_dir: Path, cfg: RunConfig, log: Log) -> None:
    if state.changes:
        log("--resume: changed since the run started: " + "; ".join(str(c) for c in state.changes))
    if state.legacy:
        log(f"--resume: {run_dir} has no {rf.RUN_JSON} (written by an older stillroom); it gets a run id now")
    if state.finished:
        log(f"--resume: {run_dir} is finished (step {state.step} of train.steps={cfg.train.steps}; report "
            f"{run_dir / 'report.md'}); nothing was changed. Raise train.steps to train further (--resume "
            f"train.steps=N), or re-evaluate it with `stillroom eval`")


def _inputs(cfg: RunConfig) -> list[Path]:
    """Files the run reads, or other commands wrote, that may lie in its folder (kept by ``--overwrite``): data
    sources, the teacher store and remote cache, ``stillroom generate``'s store and export."""
    paths = [Path(s.path) for s in cfg.data.sources if s.path] if cfg.domain == "lm" else []
    gen = cfg.generate
    store = gen.output or "{output_dir}/{name}/generations.jsonl"
    for value in (cfg.teacher.store.path, cfg.teacher.remote.cache, store, gen.export.path):
        try:
            paths += [Path(value.format(output_dir=cfg.output_dir, name=cfg.name))] if value else []
        except (KeyError, IndexError, ValueError):  # not a template stillroom generate accepts: not its file
            continue
    return paths


def _before(prep: PreparedRun, cfg: RunConfig, state: rf.ResumeState | None, log: Log) -> dict:
    """The evaluations before training: made now and kept in ``run.json``, or, on ``--resume``, taken from there
    (or from the saved report) unless the ``eval`` settings changed or they are missing."""
    wanted = {"teacher": (prep.teacher_model, prep.data.heldout)} if prep.teacher_model is not None else {}
    if cfg.eval.before:
        wanted["student_before"] = (prep.student, prep.data.heldout)
    kept: dict = {}
    if state is not None and not state.eval_changed:
        kept = {k: v for k, v in rf.saved_before(cfg.run_dir).items() if k in wanted}
        if kept:
            log(f"before training: {', '.join(kept)} as evaluated when the run started (not again)")
    elif state is not None:
        log("before training: the eval settings changed, so the models are evaluated again")
    todo = {k: v for k, v in wanted.items() if k not in kept}
    if not todo:
        return kept
    log(f"evaluating before training: {', '.join(todo)} (their speed: timed after training, beside the students)")
    results = prep.evaluate(todo, log, timed=False)
    rf.save_before(cfg.run_dir, {**kept, **results})
    return {**kept, **results}


def speed_before(rows: dict[str, dict], before: tuple | None, student: torch.nn.Module, log: Log) -> dict:
    """``rows`` with ``student_before``'s speed: the rate timed after training for ``student_after``, when the
    student's :func:`~stillroom.eval.speed.architecture_key` is still ``before`` (its key before training).

    The models before training are not timed then (``evaluate(..., timed=False)``): timing is a third of the
    evaluation before training, the teacher is timed again beside the students after training anyway, and the
    student before training is the same computation as after it (the optimizer holds the same parameters from
    step 0). A ``student_before`` row that has its speed (a run resumed from an older version) keeps it."""
    before_row, after_row = rows.get("student_before"), rows.get("student_after", {})
    missing = [k for k in SPEED_KEYS if k in after_row and before_row is not None and k not in before_row]
    if not missing:
        return rows
    if architecture_key(student) != before:
        log("student_before: not timed (the student's architecture changed in training)")
        return rows
    log("student_before: the speed of student_after (the same architecture, timed after training)")
    return merge_rows(rows, {"student_before": {k: after_row[k] for k in missing}})


def _train(job, log: Log, label: str):
    job.final_save_in_background = True  # the run changes no trained tensor afterwards, and waits at its end
    result = train(job)
    figures = _figures(result, job.run_dir / "metrics.jsonl") if job.topology.is_main else {}
    loss, median = figures.get("final_train_loss", result.final_loss), figures.get("median_step_s", 0.0)
    loss = float("nan") if loss is None else loss
    log(f"{label}: {figures.get('steps', result.steps)} steps, final loss {loss:.4f}, median step {median:.2f}s")
    return result


def _figures(result, metrics_file: Path) -> dict:
    """The report's training figures: of the whole run from its metrics.jsonl (every session of a resumed run),
    or of this session where nothing was logged."""
    return rf.training_figures(metrics_file) or {
        "train_seconds": round(result.train_seconds, 2), "steps": result.steps, "median_step_s": result.median_step_s,
        "median_teacher_s": result.median_teacher_s, "final_train_loss": result.final_loss}
