"""``stillroom run``: one run end to end, in the order a reader expects.

1. resolve what ``auto`` means on this machine and write ``config.resolved.yaml``;
2. the domain prepares the models and the data (everything that can refuse the run
   fails here, before step 0);
3. the teacher and the student before training are evaluated;
4. the method's training job runs (:func:`stillroom.train.loop.train`);
5. with ``baseline: true``, a copy of the initial student trains with cross-entropy
   alone on the plain view of the same data, in the same order;
6. the students are saved and evaluated, and the report is written, with the
   method's own report files.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch

from stillroom.config.load import dump_config
from stillroom.config.schema import RunConfig
from stillroom.domains import DOMAINS, PreparedRun
from stillroom.methods import METHODS, Method
from stillroom.run.checks import check_run
from stillroom.models.precision import resolve_dtype, resolve_precision
from stillroom.run.report import write_run_report
from stillroom.train.distributed import init_topology, shutdown
from stillroom.train.loop import train

Log = Callable[[str], None]


def prepare_run(cfg: RunConfig, *, log: Log = print) -> tuple[PreparedRun, Method]:
    """Steps 1 and 2: the prepared run of ``cfg`` and its method."""
    method = check_run(cfg)
    topology = init_topology(cfg.train.device)
    # Resolve `auto` once; the resolved values are what config.resolved.yaml records.
    cfg.train.precision = resolve_precision(cfg.train.precision, cfg.train.device)
    if cfg.domain == "lm":  # the other domains' teachers are their own sections' business
        cfg.teacher.dtype = resolve_dtype(cfg.teacher.dtype, cfg.teacher.device)
        log(f"precision: train {cfg.train.precision}, teacher weights {cfg.teacher.dtype}")
    else:
        log(f"precision: train {cfg.train.precision}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    if topology.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.resolved.yaml").write_text(dump_config(cfg))
    topology.barrier()
    return DOMAINS[cfg.domain].prepare(cfg, topology, method, log), method


def run(cfg: RunConfig, *, resume: bool = False, log: Log = print) -> Path:
    """Run a recipe; returns the run folder (with report.json)."""
    prep, method = prepare_run(cfg, log=log)
    run_dir, main = cfg.run_dir, prep.topology.is_main
    job, plan = prep.job(prep.student, method, baseline=False, run_dir=run_dir, resume=resume, log=log)
    initial_state = {k: v.detach().clone() for k, v in prep.student.state_dict().items()} if cfg.baseline else None
    models = {}
    if main:
        before = {"teacher": (prep.teacher_model, prep.data.heldout)} if prep.teacher_model is not None else {}
        if cfg.eval.before:
            before["student_before"] = (prep.student, prep.data.heldout)
        models.update(prep.evaluate(before, log))
    prep.topology.barrier()

    trained = {"student_after": _train(job, log, cfg.method)}
    if cfg.baseline:
        baseline_model = copy.deepcopy(prep.student)
        baseline_model.load_state_dict(initial_state)
        base_job, _ = prep.job(baseline_model, METHODS["sft"], baseline=True, run_dir=run_dir / "baseline",
                               resume=resume, log=log)
        trained["baseline"] = _train(base_job, log, "baseline (ce)")

    if main:
        prep.save_model(prep.student, run_dir / "student")
        after = {"student_after": (prep.student, prep.data.heldout)}
        if cfg.baseline:
            prep.save_model(baseline_model, run_dir / "baseline" / "student")
            after["baseline"] = (baseline_model, prep.data.baseline_heldout)
        results = prep.evaluate(after, log)
        for key, (result, seconds) in trained.items():
            results[key].update(train_seconds=round(seconds, 2), steps=result.steps, median_step_s=result.median_step_s,
                                median_teacher_s=result.median_teacher_s, final_train_loss=result.final_loss)
        models.update(results)
        metrics_files = {cfg.method: run_dir / "metrics.jsonl", "baseline": run_dir / "baseline" / "metrics.jsonl"}
        write_run_report(prep, models, metrics_files, log=log)
        if plan.report is not None:  # the method's own report files (e.g. DDK's domain curves)
            plan.report(run_dir)
    shutdown(prep.topology)
    return run_dir


def _train(job, log: Log, label: str):
    t0 = time.perf_counter()
    result = train(job)
    log(f"{label}: {result.steps} steps, final loss {result.final_loss:.4f}, median step {result.median_step_s:.2f}s")
    return result, time.perf_counter() - t0
