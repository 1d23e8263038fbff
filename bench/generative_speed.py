"""Generative domain speed: samples/s of teacher and one-step student, and each method's training cost.

Fresh models (speed does not depend on the weights), on the two model kinds the recipes use:
``rings``: the MLP denoiser of ``generative_rings_sft`` (4 x 128) on 2-D points; ``digits``: a UNet
(channels [16, 32]) on 8x8 images.

* samples/s: no-grad sampling of ``--batch`` samples with the teacher at 50 steps (guidance 1 and 2: two
  network passes per step), at 4 steps, and with the one-step student (best of ``--reps``, after a warm-up);
* training cost: seconds per 1000 student updates of every method registered for the generative domain
  (``sft``, ``tsm``, ``dmd`` with its default critic updates, ``twinflow``, ...), each built by the domain's
  own job exactly as a run builds it and timed over ``--steps`` loop steps (``train`` itself, checkpoints off).

    .venv/bin/python bench/generative_speed.py [--reps 5] [--steps 40] [--batch 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from stillroom.config.schema import RunConfig
from stillroom.domains.generative.data import build_splits
from stillroom.domains.generative.models import build_denoiser
from stillroom.domains.generative.prepare import GenerativeRun, build_student, generative_methods
from stillroom.domains.generative.sampling import sample
from stillroom.domains.generative.teacher import teacher_convention
from stillroom.methods import METHODS
from stillroom.train.distributed import Topology
from stillroom.train.loop import train

SETTINGS = {
    "rings": {"dataset": "rings", "train_points": 4096, "heldout_points": 512,
              "teacher": {"arch": {"kind": "mlp", "width": 128, "depth": 4}, "convention": {"sigma_max": 20.0}}},
    "digits": {"dataset": "digits",
               "teacher": {"arch": {"kind": "unet", "channels": [16, 32]}, "convention": {"sigma_max": 20.0}}},
}
CONVENTION = {"twinflow": "rf"}
"""Methods whose teacher must be of another convention than the default edm."""
STUDENT = {"twinflow": {"init": "teacher", "arch": {"kind": "twinflow"}}}
"""Methods whose student is not a plain copy of the teacher (as their shipped recipes set it)."""


def run_config(kind: str, method: str, batch: int) -> RunConfig:
    sec = copy.deepcopy(SETTINGS[kind])
    if method in CONVENTION:
        sec["teacher"]["convention"] = {"name": CONVENTION[method]}
    if method in STUDENT:
        sec["student"] = STUDENT[method]
    return RunConfig(domain="generative", method=method, generative=sec,
                     train={"steps": 1, "micro_batch_size": batch, "precision": "fp32", "save_every": 10 ** 9,
                            "log_every": 10 ** 9, "keep_checkpoints": 1})


def prepared(cfg: RunConfig) -> GenerativeRun:
    data = build_splits(cfg.generative, cache_dir=None, run_seed=0)
    tc = cfg.generative.teacher
    arch = tc.arch.as_json(data.sample_shape)
    teacher = build_denoiser(tc.arch.kind, arch, num_classes=data.num_classes, convention=teacher_convention(tc),
                             seed=0).eval().requires_grad_(False)
    student, origin = build_student(cfg, teacher, data)  # as a run builds it (TwinFlow: its twinflow network)
    return GenerativeRun(cfg, Topology(), torch.device("cpu"), teacher, student, data, "fresh", origin)


def best_of(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sampling_rows(kind: str, batch: int, reps: int) -> list[tuple[str, float]]:
    prep = prepared(run_config(kind, "sft", 64))
    labels = torch.arange(batch) % prep.data.num_classes
    rows = []
    for name, model, steps, guidance in (("teacher 50 steps", prep.teacher_model, 50, 1.0),
                                         ("teacher 50 steps, guidance 2", prep.teacher_model, 50, 2.0),
                                         ("teacher 4 steps", prep.teacher_model, 4, 1.0),
                                         ("student 1 step", prep.student, 1, 1.0)):
        seconds = best_of(lambda: sample(model, labels, steps=steps, guidance=guidance,
                                         generator=torch.Generator().manual_seed(0)), reps)
        rows.append((name, batch / seconds))
    return rows


def per_1000_updates(prep, method: str, steps: int, *, baseline: bool = False) -> float:
    """Seconds per 1000 loop steps of ``method`` on a copy of ``prep``'s student: a run of 3 + ``steps`` steps
    minus one of 3 (so the setup and the first, slower steps cancel), each job built as a run builds it."""
    seconds = []
    for n in (3, 3 + steps):
        with tempfile.TemporaryDirectory() as tmp:
            job, _ = prep.job(copy.deepcopy(prep.student), METHODS[method], baseline=baseline, run_dir=Path(tmp),
                              resume=False, log=lambda _: None)
            job.train = job.train.model_copy(update={"steps": n})
            t0 = time.perf_counter()
            train(job)
            seconds.append(time.perf_counter() - t0)
    return 1000 * (seconds[1] - seconds[0]) / steps


def training_cost(kind: str, method: str, steps: int, batch: int) -> float:
    """Seconds per 1000 loop steps of ``method`` (after 3 warm-up steps)."""
    return per_1000_updates(prepared(run_config(kind, method, batch)), method, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=1024, help="samples per timed sampling batch (images: / 8)")
    p.add_argument("--train-batch", type=int, default=256, help="samples per training micro-batch (images: / 4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kinds", default="rings,digits")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    for kind in args.kinds.split(","):
        batch = args.batch if kind == "rings" else max(8, args.batch // 8)
        rows = sampling_rows(kind, batch, args.reps)
        student = rows[-1][1]
        print(f"\n{kind}: sampling, {batch} samples per batch\n\n| sampler | samples/s | student / this |\n|---|---:|---:|")
        for name, rate in rows:
            print(f"| {name} | {rate:,.0f} | {student / rate:.1f}x |")
        train_batch = args.train_batch if kind == "rings" else max(8, args.train_batch // 4)
        print(f"\n{kind}: training cost, micro-batch {train_batch}\n\n| method | s per 1000 updates | / sft |\n|---|---:|---:|")
        base = None
        for method in generative_methods():
            try:
                cost = training_cost(kind, method, args.steps, train_batch)
            except (ValueError, NotImplementedError) as e:  # a method that does not take this kind of data
                print(f"| {method} | — ({str(e).splitlines()[0][:80]}) | |")
                continue
            base = cost if method == "sft" else base
            print(f"| {method} | {cost:.2f} | {cost / base:.2f}x |")


if __name__ == "__main__":
    main()
