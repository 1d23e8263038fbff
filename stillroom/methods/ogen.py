"""OGEN (Zang et al., ICLR 2024; spec section 6): prompt fine-tuning of a frozen CLIP on few base-class shots,
regularised by synthesised unknown-class features and local-mean-teacher self-distillation.

Domain ``clip``. The run's model is a frozen CLIP (``ogen.clip``); the plan replaces the player with
``Player("prompt", PromptHead, OgenObjective)`` and the sampler with one over ``ogen.shots`` images of each base
class of ``ogen.dataset`` (drawn from the run's seed). Per step, with ``v`` the frozen image features of the
``B`` real images, ``K`` the base classes plus (``ogen.synthesis``) the unknown classes ``U``:

    L = sum_i CE(l(v_i)_K, y_i)  +  sum_q CE(l(v^_q)_K, |base| + u_q)                 (L_joint; v^: generator)
      + lambda_sd * T^2 * [ sum_i KL(p_bar(v_i) || p(v_i))  +  sum_q KL(p_bar(v^_q) || p(v^_q)) ]   (L_sd)

divided by ``B`` (the loop's count), with ``Q`` synthesised features of uniformly drawn unknown classes per step
(default ``Q = B``: a mean over real plus a mean over synthesised), ``p`` the head's softmax at temperature ``T``
and ``p_bar`` the local mean teacher's (:class:`~.ogen_parts.LocalMeanTeacher`, one snapshot per epoch; an
epoch is one pass over the shots). Metrics every ``ogen.eval_every_epochs``: held-out base accuracy (base images
among base classes), new accuracy (new images among new classes, with the residual applied to their names) and
their harmonic mean; ``ogen.json`` in the run folder holds the curve, the zero-shot start and the final values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.losses import LossResult
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.methods.ogen_data import OgenData, ogen_data
from stillroom.methods.ogen_parts import LocalMeanTeacher, PromptHead, sample_neighbours
from stillroom.train.loop import Player


def base_new_accuracy(head: PromptHead, d: OgenData, params: torch.Tensor | None = None) -> dict[str, float]:
    """``{base, new, hm}``: held-out accuracy of base images among base classes, new among new, harmonic mean."""
    out = {}
    with torch.no_grad():
        for name, classes in (("base", d.base), ("new", d.new)):
            keep = torch.isin(d.heldout_labels, torch.tensor(classes))
            pred = head.logits(d.heldout_nd[keep].to(head.text_cd.device), head.text_cd[classes], params).argmax(-1)
            truth = torch.tensor([classes.index(c) for c in d.heldout_labels[keep].tolist()])
            out[name] = float((pred.cpu() == truth).float().mean())
    b, n = out["base"], out["new"]
    out["hm"] = 0.0 if b + n == 0 else 2 * b * n / (b + n)
    return out


class OgenForward(nn.Module):
    """``batch -> {"image": [B, D] frozen features}`` (the CLIP never trains here)."""

    def __init__(self, clip: nn.Module, head: PromptHead):
        super().__init__()
        self.clip, self.head = clip, head

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"image": self.clip.image_features(batch.inputs).float()}


class OgenObjective:
    """The loss of the module docstring; state: the generator, the mean teacher's snapshots, the step."""

    def __init__(self, forward: OgenForward, data: OgenData, settings, *, seed: int, steps_per_epoch: int,
                 synthetic: int, total_steps: int):
        self.forward, self.d, self.s, self.seed = forward, data, settings, seed
        self.head = forward.head
        self.steps_per_epoch, self.synthetic = steps_per_epoch, synthetic
        epochs = math.ceil(total_steps / steps_per_epoch)
        self.state = nn.Module()
        self.state.teacher = LocalMeanTeacher(self.head.flat(), max(1, math.floor(epochs * settings.window_ratio)),
                                              settings.window_ratio)
        self.state.generator = data.generator
        self.state.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._metrics: dict[str, float] = {}

    @property
    def epoch(self) -> int:
        return int(self.state.step) // self.steps_per_epoch

    def known_text(self) -> torch.Tensor:
        """``[K, D]`` the frozen text features of the classes the training logits range over."""
        base = self.head.text_cd[self.d.base]
        return torch.cat([base, self.d.unknown_ud.to(base.device)]) if self.s.synthesis else base

    def signal(self, batch: Any) -> None:
        return None

    def synthesise(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [Q, D], labels [Q])`` of unknown classes drawn for this step (seeded by the step)."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "ogen-synthesis", int(self.state.step)))
        u_q = torch.randint(len(self.d.unknown_ud), (self.synthetic,), generator=gen)
        unknown_qd = self.d.unknown_ud[u_q]
        text_qkd, image_qkd = sample_neighbours(self.d.text_cd[self.d.base], self.d.bank, unknown_qd, self.s.k_nn,
                                                gen)  # on the CPU, where the generator and its inputs live
        at = next(self.state.generator.parameters()).device  # the state follows the player to its device
        with torch.no_grad():
            feats = self.state.generator(unknown_qd.to(at), text_qkd.to(at), image_qkd.to(at))
        return feats.to(device), (len(self.d.base) + u_q).to(device)

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        image_bd = outputs["image"]
        labels_b = torch.tensor([self.d.base.index(c) for c in batch.labels.tolist()], device=image_bd.device)
        feats, labels = image_bd, labels_b
        if self.s.synthesis:
            synth_qd, synth_q = self.synthesise(image_bd.device)
            feats, labels = torch.cat([image_bd, synth_qd]), torch.cat([labels_b, synth_q])
        text_kd = self.known_text().to(image_bd.device)
        logits = self.head.logits(feats, text_kd)
        ce = F.cross_entropy(logits, labels, reduction="sum")
        parts, total = {"ce": float(ce.detach())}, ce
        if self.s.self_distill:
            t = self.s.sd_temperature
            with torch.no_grad():
                teacher = self.head.logits(feats, text_kd, self.state.teacher.mean(self.epoch).to(feats.device))
            kl = F.kl_div((logits / t).log_softmax(-1), (teacher / t).log_softmax(-1), log_target=True,
                          reduction="sum") * t * t
            total = total + self.s.lambda_sd * kl
            parts["sd"] = float(kl.detach())
        return LossResult(total=total, count=batch.num_targets, parts=parts)

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self.state.step.fill_(step + 1)
        self._metrics = {}
        if (step + 1) % self.steps_per_epoch == 0:
            self.state.teacher.push(self.head.flat())
            if self.epoch % self.s.eval_every_epochs == 0 or step + 1 == total_steps:
                acc = base_new_accuracy(self.head, self.d)
                self._metrics = {"epoch": self.epoch, **{f"ogen/{k}": v for k, v in acc.items()}}

    def metrics(self) -> dict[str, float]:
        return {"window": self.state.teacher.window(self.epoch), **self._metrics}


class ShotSampler:
    """:class:`ExampleSampler` over a fixed subset of the examples (the base-class shots)."""

    def __init__(self, indices: list[int], **kwargs):
        self.indices = indices
        kwargs = {k: v for k, v in kwargs.items() if k != "n"}
        kwargs["batch_size"] = min(kwargs["batch_size"], len(indices))  # an epoch is at least one full batch
        self.inner = ExampleSampler(len(indices), **kwargs)

    def next_indices(self) -> list[int]:
        return [self.indices[i] for i in self.inner.next_indices()]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def _build(ctx: MethodContext) -> MethodPlan:
    cfg, s = ctx.cfg, ctx.cfg.ogen
    if ctx.topology.world_size > 1:
        raise ValueError("method=ogen trains its prompt head in one process (its local-mean teacher and feature "
                         "synthesis are not averaged across processes); run it without torchrun")
    d = ogen_data(ctx.model, ctx.data, s, cfg.clip.templates, seed=cfg.seed, log=ctx.log)
    head = PromptHead(d.text_cd, float(ctx.model.logit_scale.detach()), s.image_adapter).to(ctx.model.device)
    batch = min(cfg.train.micro_batch_size, len(d.shot_indices))
    steps_per_epoch = math.ceil(len(d.shot_indices) / batch)
    objective = OgenObjective(OgenForward(ctx.model, head), d, s, seed=cfg.seed, steps_per_epoch=steps_per_epoch,
                              synthetic=s.synthetic_per_step or batch, total_steps=cfg.train.steps)
    start = base_new_accuracy(head, d)
    ctx.log(f"ogen: {len(d.base)} base classes x {s.shots} shots, {len(d.new)} new classes; zero-shot start: base "
            f"{100 * start['base']:.1f}%, new {100 * start['new']:.1f}%; synthesis {s.synthesis}, self-distillation "
            f"{s.self_distill}; {steps_per_epoch} step(s) per epoch")

    def report(run_dir: Path) -> None:
        final = base_new_accuracy(head, d)
        curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if "ogen/hm" in line] if (run_dir / "metrics.jsonl").exists() else []
        record = {"zero_shot": start, "final": final, "base_classes": d.base, "new_classes": d.new,
                  "curve": [{"epoch": m["epoch"], **{k[5:]: m[k] for k in ("ogen/base", "ogen/new", "ogen/hm")}}
                            for m in curve], "generator_loss": d.generator_loss, "settings": s.model_dump(mode="json")}
        (run_dir / "ogen.json").write_text(json.dumps(record, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in head.named_parameters()},
                  str(run_dir / "ogen_head.safetensors"))
        ctx.log(f"ogen: final base {100 * final['base']:.1f}%, new {100 * final['new']:.1f}%, H "
                f"{100 * final['hm']:.1f}% (ogen.json)")

    def report_rows() -> dict[str, dict]:
        """The trained prompt head's base / new / harmonic-mean accuracy beside the zero-shot start: the run's own
        rows measure the frozen CLIP, which the head does not change."""
        final = base_new_accuracy(head, d)
        return {"student_before": {f"ogen_{k}": v for k, v in start.items()},
                "student_after": {f"ogen_{k}": v for k, v in final.items()}}

    return MethodPlan(sampler=lambda **kw: ShotSampler(d.shot_indices, **kw), report=report, report_rows=report_rows,
                      players=lambda student: [Player("prompt", head, objective)])


METHOD = Method("ogen", build=_build, domains=("clip",))
