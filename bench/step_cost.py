"""Cost of one distillation step relative to one cross-entropy step of the same student.

Teacher: SmolLM2-135M-Instruct (30 layers). Student: 10 layers derived from it.
Batch: 4 x 256 tokens of bundled prose, AdamW step included, in the precision
``auto`` picks (bf16 where bf16 matmuls are fast, else fp32).
Variants are timed interleaved (A B C A B C ...) in one process so that machine
noise hits all of them alike; the table reports medians and ratios to CE.

    python bench/step_cost.py [--reps 8] [--batch 4] [--seq 256] [--device cuda] [--out docs/bench/step_cost.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from smollm2_setup import smollm2_setup
from stillroom.config.schema import LossConfig, LossTerm, TrainConfig
from stillroom.losses import LossMix
from stillroom.teachers.signal import OnlineTeacher
from stillroom.domains.lm.forward import StudentForward
from stillroom.train.loop import DistillObjective, forward_backward, Player
from stillroom.models.precision import autocast as precision_autocast, resolve_precision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--out", default=None, help="also write the measurements as JSON here")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the models and the batch live (CUDA steps are "
                    "timed to a synchronize)")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device.type)
    teacher_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    setup = smollm2_setup(args.batch, args.seq, device)
    batch, student, kept = setup.batch, setup.student, setup.kept
    teacher_model = setup.teacher.to(device, teacher_dtype).eval()
    vocab = len(setup.tokenizer)
    teacher = OnlineTeacher(teacher_model, vocab_size=vocab, output_device=device)
    tc = TrainConfig(steps=1000, warmup_steps=0)
    shared = Player("student", student, DistillObjective(None, LossMix(LossConfig(terms=[LossTerm(name="ce")]))))
    shared.build_optimizer(tc)  # one AdamW for every variant, as one training run has
    optimizer = shared.optimizer

    def make_step(terms: list[str], fused: bool, with_teacher: bool, precomputed=None):
        mix = LossMix(LossConfig(terms=[LossTerm(name=t) for t in terms], fused=fused, chunk_tokens=1024))
        forward = StudentForward(student, fused=fused, hidden_layers=[], vocab=vocab)

        class _Fixed:  # a teacher whose signal is already computed (what a store-fed step sees)
            def signal(self, b):
                return precomputed

        src = (_Fixed() if precomputed is not None else teacher) if with_teacher else None
        player = Player("student", student, DistillObjective(forward, mix, src))

        def step():
            student.train()
            forward_backward([batch], player, forward, device=device, precision=precision,
                             scale=1.0 / batch.num_targets)
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)  # as the loop does (train.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def teacher_forward():
        teacher.signal(batch)

    # The floor: a plain PyTorch CE step with no framework (HF's own loss from labels, clip, AdamW).
    labels = torch.where(batch.attention_mask.bool(), batch.input_ids, torch.full_like(batch.input_ids, -100))

    def plain_ce():
        student.train()
        with precision_autocast(precision, device):
            loss = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    from stillroom.teachers.signal import TeacherSignal, tail_logmass

    with torch.no_grad():
        dense = teacher.signal(batch).logits_btv.float()
        lp = torch.log_softmax(dense, -1)
        top_lp, top_ids = lp.topk(64, dim=-1)
        topk_signal = TeacherSignal(topk_ids_btk=top_ids, topk_logprobs_btk=top_lp.to(torch.float16).float(),
                                    tail_logmass_bt=tail_logmass(top_lp))
        del dense, lp

    variants = {
        "plain PyTorch CE step (no framework)": plain_ce,
        "ce (student only)": make_step(["ce"], fused=True, with_teacher=False),
        "ce (student only), plain": make_step(["ce"], fused=False, with_teacher=False),
        "teacher forward only": teacher_forward,
        "kd forward_kl, online teacher, fused": make_step(["forward_kl"], fused=True, with_teacher=True),
        "kd forward_kl, online teacher, plain": make_step(["forward_kl"], fused=False, with_teacher=True),
        "kd jsd, online teacher, fused": make_step(["jsd"], fused=True, with_teacher=True),
        "kd forward_kl, top-64 signal already in memory, fused": make_step(["forward_kl"], fused=True, with_teacher=True, precomputed=topk_signal),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.reps):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["ce (student only)"]
    print(f"teacher SmolLM2-135M-Instruct (30 layers), student layers {kept}, batch {args.batch}x{args.seq}, {precision} on {device}, "
          f"{torch.get_num_threads()} threads, {args.reps} interleaved reps\n")
    print("| step | median s | min s | max s | ratio to CE step |")
    print("|---|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f} | {min(v):.3f} | {max(v):.3f} | {med[k] / base:.2f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"median_s": med, "all_s": times, "kept_layers": kept}, indent=1))


if __name__ == "__main__":
    main()
