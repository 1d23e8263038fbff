"""Classifier domain speed: images/s of teacher and student, and a distillation step against a CE step.

Two pairs on scikit-learn's 8x8 digits, fresh models (speed does not depend on the weights):
``mlp``: the shipped recipe's MLP teacher ([256, 256]) and MLP student ([32]); ``cnn``: a CNN teacher
(channels [32, 64]) and a CNN student ([8, 16]).

* images/s: eval forward passes (no grad) of ``--eval-batch`` images, after warm-up;
* one training step (draw indices, collate, views, teacher signal, forward, backward, AdamW) of
  ``--batch`` images, built by the domain's own job exactly as a run builds it: ``ce`` on whole images
  (the reference), ``ce`` on crop views, ``kd`` (forward_kl, T = 2) with the online teacher on crop views,
  and ``kd`` fed by a soft-label store (top-10 of 10, 4 views per image, float16, written first into a
  temporary folder). Variants are timed interleaved (A B C D A B C D ...), ``--reps`` rounds of
  ``--steps`` steps each after a warm-up; the table gives medians per step and ratios to the CE step.

    .venv/bin/python bench/vision_step.py [--reps 7] [--steps 20] [--batch 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stillroom.config.load import load_config
from stillroom.domains.vision.data import build_image_splits
from stillroom.domains.vision.models import build_classifier
from stillroom.domains.vision.prepare import ClassifierRun
from stillroom.domains.vision.soft_labels import image_header, view_compute
from stillroom.methods import METHODS
from stillroom.teachers.store_writer import write_store
from stillroom.train.distributed import Topology
from stillroom.train.loop import forward_backward

PAIRS = {
    "mlp": ("{kind: mlp, hidden: [256, 256]}", "{kind: mlp, hidden: [32]}"),
    "cnn": ("{kind: cnn, channels: [32, 64]}", "{kind: cnn, channels: [8, 16]}"),
}
VIEWS = ["classifier.augment.enabled=true", "classifier.store.views_per_image=4"]
VARIANTS = {
    "ce, whole images": ("sft", []),
    "ce, crop views": ("sft", VIEWS),
    "kd, online teacher, whole images": ("kd", []),
    "kd, online teacher, crop views": ("kd", VIEWS),
    "kd, store (top-10, 4 views)": ("kd", [*VIEWS, "classifier.teacher_source=store"]),
}


def config(pair: str, batch: int, store: Path, *more: str):
    teacher, student = PAIRS[pair]
    return load_config(None, [
        "domain=classifier", f"classifier.teacher.arch={teacher}", f"classifier.student={student}",
        f"train.micro_batch_size={batch}", "train.precision=fp32", "train.steps=100000", "train.warmup_steps=0",
        "loss.terms=[{name: forward_kl}]", "loss.loss_temperature=2.0", f"classifier.store.path={store}",
        "classifier.store.k=10", *more])


def write_bench_store(cfg, data, teacher, folder: Path) -> None:
    settings = {"k": 10, "logprob_dtype": "float16", "views_per_image": 4, "shard_images": 4096}
    header = image_header(cfg, data.train, teacher, data.dataset.num_classes, settings)
    write_store(folder, header, data.train, view_compute(teacher, header, batch_size=256), log=lambda s: None,
                lengths=[4] * len(data.train))


def step_fn(pair: str, variant: str, data, teacher, batch: int, store: Path, run_dir: Path):
    """One training step of ``variant`` through the domain's job (a fresh student per variant)."""
    method, more = VARIANTS[variant]
    cfg = config(pair, batch, store, *more)
    student = build_classifier(cfg.classifier.student, data.dataset.in_shape, 10, seed=1)
    prep = ClassifierRun(cfg, Topology(), torch.device("cpu"), teacher, student, data, "bench teacher")
    job, _ = prep.job(student, METHODS[method], baseline=False, run_dir=run_dir, resume=False, log=lambda s: None)
    player = job.players[0]
    player.build_optimizer(cfg.train)
    sampler = job.sampler(n=len(job.examples), batch_size=batch, seed=0, shuffle=True, rank=0, world_size=1,
                          group_size=1)

    def step() -> None:
        micro = [job.collate([job.examples[i] for i in sampler.next_indices()])]
        forward_backward(micro, player, player.objective.forward, device=torch.device("cpu"), scale=1.0 / batch)
        player.optimizer.step()
        player.optimizer.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def images_per_s(model: torch.nn.Module, images: torch.Tensor, reps: int) -> float:
    model.eval()
    for _ in range(3):
        model(images)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(10):
            model(images)
        times.append((time.perf_counter() - t0) / 10)
    return len(images) / statistics.median(times)


def bench_pair(pair: str, args, data, tmp: Path) -> list[str]:
    cfg = config(pair, args.batch, tmp / pair / "store", *VIEWS)
    teacher = build_classifier(cfg.classifier.teacher.arch, data.dataset.in_shape, 10, seed=0).eval()
    student = build_classifier(cfg.classifier.student, data.dataset.in_shape, 10, seed=1)
    images = torch.stack([e.image for e in data.heldout[: args.eval_batch]])
    t_rate, s_rate = images_per_s(teacher, images, args.reps), images_per_s(student, images, args.reps)
    write_bench_store(cfg, data, teacher, tmp / pair / "store")
    steps = {v: step_fn(pair, v, data, teacher, args.batch, tmp / pair / "store", tmp / pair / f"run{i}")
             for i, v in enumerate(VARIANTS)}
    times: dict[str, list[float]] = {v: [] for v in steps}
    for v, step in steps.items():  # warm-up
        for _ in range(3):
            step()
    for _ in range(args.reps):
        for v, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[v].append((time.perf_counter() - t0) / args.steps)
    ce = statistics.median(times["ce, whole images"])
    rows = [f"| {pair} | eval forward, teacher / student | {t_rate:,.0f} / {s_rate:,.0f} img/s | "
            f"teacher: {s_rate / t_rate:.2f}x the student's time per image |"]
    for v, ts in times.items():
        med = statistics.median(ts)
        rows.append(f"| {pair} | step: {v} | {1000 * med:.2f} ms ({min(1000 * t for t in ts):.2f}-"
                    f"{max(1000 * t for t in ts):.2f}) | {med / ce:.2f}x |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7, help="interleaved rounds (medians over them)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per variant per round")
    ap.add_argument("--batch", type=int, default=64, help="images per training step")
    ap.add_argument("--eval-batch", type=int, default=256, help="images per eval forward")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (recorded)")
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = build_image_splits("digits", 0.2)
    print(f"digits: {len(data.train)} training images, batch {args.batch}, {args.threads} thread(s), "
          f"{args.reps} rounds x {args.steps} steps, medians\n")
    print("| pair | what | median (min-max) | ratio to the CE step |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            for row in bench_pair(pair, args, data, Path(tmp)):
                print(row, flush=True)


if __name__ == "__main__":
    main()
