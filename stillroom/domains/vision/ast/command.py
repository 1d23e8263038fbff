"""``stillroom distill-data RECIPE``: AST dataset distillation end to end, into a run folder.

In order: the run folder is checked (a used name is refused without ``--overwrite``; ``--resume`` compares
the saved config, as ``stillroom run`` does); the real images are loaded (:mod:`.realdata`); the expert
trajectories are loaded from the cache or trained (:mod:`.experts`); the synthetic set is initialised and
trained by the one loop for ``train.steps`` outer iterations (:mod:`.player`; checkpoints in
``checkpoints/``); then ``ast.eval_networks`` fresh networks are trained on the distilled set (at its learned
lr) and on a random real subset of the same size (at the experts' lr), and the run folder gets
``synthetic.safetensors`` (images in pixels and standardised, labels, lr), ``synthetic_grid.png``,
``random_subset_grid.png``, ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from stillroom.config.load import ConfigError, dump_config
from stillroom.config.schema import RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.ast.evaluate import image_grid, random_subset, set_accuracy
from stillroom.domains.vision.ast.experts import Trajectories, expert_trajectories
from stillroom.domains.vision.ast.player import ast_player, collate_outer
from stillroom.domains.vision.ast.realdata import RealData, real_data
from stillroom.domains.vision.ast.report import write_report
from stillroom.domains.vision.ast.synthetic import SyntheticSet, class_labels, initial_images
from stillroom.domains.vision.models import build_classifier
from stillroom.run import folder as rf
from stillroom.train.distributed import Topology, resolve_device
from stillroom.train.loop import TrainJob, train

Log = Callable[[str], None]
SYNTHETIC = "synthetic.safetensors"


def distill_data(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, log: Log = print) -> Path:
    """Distil ``cfg.classifier``'s training images as ``cfg.ast`` says (see the module docstring); returns the
    run folder."""
    if cfg.domain != "classifier":
        raise ConfigError(f"stillroom distill-data distils image data sets: set domain: classifier (got "
                          f"{cfg.domain!r}) and the data set in classifier.dataset")
    if resume and overwrite:
        raise ConfigError("give --resume (continue the run) or --overwrite (delete it and start again), not both")
    run_dir, resolved = cfg.run_dir, dump_config(cfg)
    state = rf.check_resume(run_dir, resolved, steps=cfg.train.steps, baseline=False) if resume else None
    if not resume and not overwrite:
        rf.refuse_existing(run_dir)
    if state is not None and state.finished:
        log(f"--resume: {run_dir} is finished (step {state.step} of {cfg.train.steps}); nothing to do")
        return run_dir
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = real_data(cfg.classifier, standardize=cfg.ast.standardize, cache_dir=cfg.cache_dir, seed=cfg.seed)
    log(f"data: {data.name}, {len(data.train_y)} training / {len(data.test_y)} held-out images")
    experts = expert_trajectories(cfg.ast.experts, cfg.classifier.student, data, seed=cfg.seed,
                                  cache_dir=cfg.cache_dir, log=log)
    synthetic = _initial_set(cfg, data, experts)
    run_id = state.run_id if state is not None and state.run_id else rf.new_run_id()
    if overwrite and rf.run_files(run_dir):
        rf.clear_run_folder(run_dir, set(), log)
    started = rf.read_run_json(run_dir).get("started") if state is not None else None
    rf.write_run_json(run_dir, {"run_id": run_id, "name": cfg.name, "command": "distill-data",
                                "started": started or time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    rf.write_atomic(run_dir / rf.CONFIG, resolved)
    job = _job(cfg, data, experts, synthetic, run_dir, resume=state is not None, run_id=run_id, log=log)
    log(f"distilling: {cfg.train.steps} outer iterations, {len(synthetic.labels)} synthetic images")
    result = train(job)
    _save_synthetic(run_dir / SYNTHETIC, synthetic, data)
    evaluation = _evaluate(cfg, data, synthetic, run_dir, log)
    write_report(run_dir, cfg, data, experts, synthetic, evaluation, result)
    log(f"report: {run_dir / 'report.md'}")
    return run_dir


def _initial_set(cfg: RunConfig, data: RealData, experts: Trajectories) -> SyntheticSet:
    s = cfg.ast
    arch = build_classifier(cfg.classifier.student, data.in_shape, data.num_classes, seed=0)
    trained = (arch, experts.params[0][-1])
    images = initial_images(s.init, s.ipc, data.train_x, data.train_y, data.num_classes, seed=cfg.seed,
                            expert=trained)
    return SyntheticSet(images, class_labels(s.ipc, data.num_classes), cfg.ast.experts.lr)


def _job(cfg: RunConfig, data: RealData, experts: Trajectories, synthetic: SyntheticSet, run_dir: Path, *,
         resume: bool, run_id: str, log: Log) -> TrainJob:
    """The loop's job: one player (the synthetic set), one outer iteration per step; the ``train`` settings of
    length, logging and checkpoints apply, the optimizer ones do not (:class:`~.player.AstPlayer`)."""
    topology = Topology()
    tc = cfg.train.model_copy(update={"micro_batch_size": 1, "grad_accum": 1, "clip_grad_norm": None,
                                      "precision": "fp32", "warmup_steps": 0, "schedule": "constant"})
    arch = build_classifier(cfg.classifier.student, data.in_shape, data.num_classes, seed=0)
    player = ast_player(synthetic, arch, experts, cfg.ast, cfg.seed)
    return TrainJob(train=tc, seed=cfg.seed, run_dir=run_dir, run_name=cfg.name, players=[player], examples=[0],
                    collate=collate_outer, topology=topology, device=resolve_device(cfg.train.device, topology),
                    sampler=ExampleSampler, resume=resume, log=log, unit="iter", run_id=run_id)


def _save_synthetic(path: Path, synthetic: SyntheticSet, data: RealData) -> None:
    """The distilled set as safetensors (``pixels`` in [0, 1], ``images`` standardised, ``labels``, ``lr``)."""
    images = synthetic.images.detach().cpu()
    tensors = {"pixels": data.to_pixels(images).contiguous(), "images": images.contiguous(),
               "labels": synthetic.labels.cpu().contiguous(), "lr": synthetic.lr.detach().cpu().reshape(1)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"mean": str(data.mean), "std": str(data.std), "dataset": data.name})
    os.replace(tmp, path)


def _evaluate(cfg: RunConfig, data: RealData, synthetic: SyntheticSet, run_dir: Path, log: Log) -> dict:
    """Fresh networks on the distilled set and on a random real subset of its size; both grids."""
    s, arch = cfg.ast, cfg.classifier.student
    common = dict(num_classes=data.num_classes, epochs=s.eval_epochs, networks=s.eval_networks,
                  seed=derive_seed(cfg.seed, "ast-eval"))
    learned_lr = float(synthetic.lr.detach())
    distilled = set_accuracy(arch, synthetic.images.detach().cpu(), synthetic.labels.cpu(), data.test_x,
                             data.test_y, lr=learned_lr, **common)
    real_x, real_y = random_subset(data.train_x, data.train_y, s.ipc, data.num_classes, seed=cfg.seed)
    real = set_accuracy(arch, real_x, real_y, data.test_x, data.test_y, lr=s.experts.lr, **common)
    image_grid(run_dir / "synthetic_grid.png", data.to_pixels(synthetic.images.detach().cpu()), synthetic.labels,
               f"distilled: {s.ipc} image(s) per class after {cfg.train.steps} iterations")
    image_grid(run_dir / "random_subset_grid.png", data.to_pixels(real_x), real_y,
               f"random real subset: {s.ipc} image(s) per class")
    out = {"distilled": _summary(distilled, learned_lr), "random_real": _summary(real, s.experts.lr)}
    for name, row in out.items():
        log(f"eval {name}: accuracy {100 * row['mean']:.1f}% ± {100 * row['std']:.1f} "
            f"({len(row['accuracy'])} networks, lr {row['lr']:.4g})")
    return out


def _summary(values: list[float], lr: float) -> dict:
    return {"accuracy": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "lr": lr}


def report_json(run_dir: Path) -> dict:
    """The run's ``report.json``."""
    return json.loads((Path(run_dir) / "report.json").read_text())
