"""What ``train.compile`` buys: one training step of the quickstart-size student with and without torch.compile.

Teacher: SmolLM2-135M-Instruct (30 layers, online). Student: its 10 layers 0, 3, ..., 27 (the quickstart's size).
Batch: 4 x 128 tokens of bundled prose. Two steps are timed: CE (student only) and KD (forward_kl, fused loss,
online teacher, the quickstart's loss), each with the student's forward module eager and compiled in place
(``Module.compile()``, as ``train.compile: true`` does), AdamW step included. The compiled forwards' first
calls are timed alone (compilation); then the four variants run interleaved (A B C D A B ...) and the table
reports medians.

    python bench/compile_effect.py [--reps 7] [--batch 4] [--seq 128] [--precision fp32] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from smollm2_setup import smollm2_setup
from stillroom.config.schema import LossConfig, LossTerm, TrainConfig
from stillroom.domains.lm.forward import StudentForward
from stillroom.losses import LossMix
from stillroom.teachers.signal import OnlineTeacher
from stillroom.train.loop import DistillObjective, Player, forward_backward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--precision", default="fp32", choices=["bf16", "fp32"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    setup = smollm2_setup(args.batch, args.seq, device)
    batch, student, kept = setup.batch, setup.student, setup.kept
    vocab = len(setup.tokenizer)
    teacher = OnlineTeacher(setup.teacher.to(device).eval(), vocab_size=vocab, output_device=device)
    shared = Player("student", student, DistillObjective(None, LossMix(LossConfig(terms=[LossTerm(name="ce")]))))
    shared.build_optimizer(TrainConfig(steps=1000, warmup_steps=0))
    optimizer = shared.optimizer

    def make_step(term: str, compiled: bool):
        mix = LossMix(LossConfig(terms=[LossTerm(name=term)], fused=True))
        forward = StudentForward(student, fused=True, hidden_layers=[], vocab=vocab)
        if compiled:
            forward.compile()  # what train.compile=true does (stillroom.train.compile)
        player = Player("student", student, DistillObjective(forward, mix, teacher if mix.needs_teacher else None))

        def step() -> float:
            student.train()
            sync()
            t0 = time.perf_counter()
            forward_backward([batch], player, forward, device=device, precision=args.precision,
                             scale=1.0 / batch.num_targets)
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            return time.perf_counter() - t0

        return step

    variants = {f"{name}, {'compiled' if c else 'eager'}": make_step(term, c)
                for name, term in (("CE (student only)", "ce"), ("KD forward_kl, online teacher", "forward_kl"))
                for c in (False, True)}
    first = {name: fn() for name, fn in variants.items()}  # eager warm-up; compiled: compilation + one step
    second = {name: fn() for name, fn in variants.items() if "compiled" in name}  # a shape seen twice: no recompile
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            times[name].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"student layers {kept} of SmolLM2-135M-Instruct, batch {args.batch}x{args.seq}, {args.precision} on "
          f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.reps} interleaved reps\n")
    print("| step | first call s | median s | min s | max s | compiled / eager |")
    print("|---|---|---|---|---|---|")
    for k, v in times.items():
        eager = med[k.replace("compiled", "eager")]
        extra = f" (2nd: {second[k]:.2f})" if k in second else ""
        print(f"| {k} | {first[k]:.2f}{extra} | {med[k]:.3f} | {min(v):.3f} | {max(v):.3f} | {med[k] / eager:.2f}x |")


if __name__ == "__main__":
    main()
