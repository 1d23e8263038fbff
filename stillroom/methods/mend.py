"""MEND, meta demonstration distillation (Li et al., ICLR 2024; spec 12; docs/methods/mend.md).

A frozen LLM (the run's teacher model) reads ``summary_len`` distilled vectors ``S_D = f_phi(D)`` in place of
its K demonstrations ``D``; only the distiller f_phi trains (:class:`~stillroom.models.mend.MendDistiller`: the
student's body, the summary embeddings, the projector). Inside the one LLM, the full context teaches the short:

    L = ce_weight * CE(LLM(S_D ; x), answer) + lambda * KL(softmax(LLM(D ; x) / T) || softmax(LLM(S_D ; x) / T))

* KL over every x position (query and answer tokens, as the released ``query_logits_distill``): position ``j`` of
  ``x`` is ``demo_len + j`` in the teacher's row and ``l + j`` in the student's (:func:`stillroom.models.mend.
  split_rows`), through the existing ``forward_kl`` term; CE (the ``ce`` term) on the answer tokens.
* Normalisation as the official code: CE is a mean over the step's answer tokens ``N`` (the loop's count) and KL
  a mean over its ``M`` x positions: ``weight_targets`` records ``N / M`` for the step (all micro-batches and
  processes) and the KL sum is scaled by it, so the loop's ``sum / N`` is ``CE_mean + lambda * KL_mean``.
* Stage ``pretrain`` (plain text; ``ce_weight = 0``, KD only): a text's first ``pretrain_split`` of tokens form D,
  the rest x. Stage ``finetune`` (``ce_weight = 1``): records ``{demonstrations: [..], prompt, completion}``.

Each record becomes one full-context sequence ``[D ; x]`` whose ``Example.meta`` holds ``mend_demo_len``; the
objective looks the split up by the row's uid. The report (``MethodPlan.report``) saves the distiller into
``<run>/distiller`` and measures three arms on unseen tasks (:mod:`stillroom.methods.mend_eval`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import torch

from stillroom.data.batch import Batch
from stillroom.losses import LossResult, ce, forward_kl
from stillroom.methods.base import Method, MethodContext, MethodPlan, StepCounts
from stillroom.methods.mend_data import DEMO_LEN, demo_lengths, encoder
from stillroom.methods.mend_eval import write_report
from stillroom.models.mend import (
    MendDistiller, gather_positions, llm_width, load_distiller, prefix_logits, split_rows, summary_init_table,
)
from stillroom.train.loop import Player

class KdScale:
    """``weight_targets``: records ``N / M`` for the step (``N`` answer targets, ``M`` x positions, all
    micro-batches and processes) and leaves the targets' weights at 1."""

    def __init__(self, demo_lens: dict[str, int]) -> None:
        self.demo_lens = demo_lens
        self.ratio = 1.0

    def __call__(self, micro: list[Batch], counts: StepCounts) -> list[torch.Tensor]:
        positions = sum(int(b.attention_mask.sum()) - sum(demo_lengths(b, self.demo_lens)) for b in micro)
        self.ratio = float(counts.targets) / float(counts.all_reduce_sum(positions))
        return [b.loss_mask.to(torch.float32) for b in micro]


class MendForward(torch.nn.Module):
    """The student side on a batch: ``{"logits": LLM(S_D ; x) at the x positions [B, Tx, V], "rows": MendRows}``
    (the distiller trains; the frozen LLM passes the gradient back to S_D)."""

    def __init__(self, distiller: MendDistiller, llm: torch.nn.Module, demo_lens: dict[str, int], pad_id: int,
                 vocab: int) -> None:
        super().__init__()
        self.distiller, self.llm = distiller, llm
        self.demo_lens, self.pad_id, self.vocab = demo_lens, pad_id, vocab

    def forward(self, batch: Batch) -> dict:
        rows = split_rows(batch.input_ids, batch.attention_mask, batch.target_ids, demo_lengths(batch, self.demo_lens),
                          self.pad_id)
        summary_bld = self.distiller(rows.demo_ids, rows.demo_mask)
        device = next(self.llm.parameters()).device
        logits = prefix_logits(self.llm, summary_bld.to(device), rows.x_ids.to(device), rows.x_mask.to(device),
                               self.vocab)
        return {"logits": logits.to(batch.input_ids.device), "rows": rows}


@dataclass
class MendObjective:
    """CE + lambda KD of the distilled context against the full one (module docstring)."""

    forward: MendForward
    state: torch.nn.Module
    ce_weight: float
    loss_lambda: float
    loss_temperature: float
    scale: KdScale
    last: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def signal(self, batch: Batch) -> torch.Tensor:
        """The teacher: LLM(D ; x) logits at the x positions ``[B, Tx, V]`` (the frozen LLM, no grad)."""
        fw = self.forward
        rows = split_rows(batch.input_ids, batch.attention_mask, batch.target_ids, demo_lengths(batch, fw.demo_lens),
                          fw.pad_id)
        device = next(fw.llm.parameters()).device
        logits = fw.llm(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                        use_cache=False).logits[..., : fw.vocab]
        return gather_positions(logits, rows.full_index.to(device)).to(batch.input_ids.device)

    def loss(self, outputs: dict, batch: Batch, signal: torch.Tensor) -> LossResult:
        logits, rows = outputs["logits"], outputs["rows"]
        kd_sum, _ = forward_kl(logits, signal, rows.x_mask, loss_temperature=self.loss_temperature)
        answer = rows.x_targets != -100
        ce_sum, count = ce(logits, None, answer, target_ids=rows.x_targets)
        kd_scaled = kd_sum * self.scale.ratio
        total = self.ce_weight * ce_sum + self.loss_lambda * kd_scaled
        return LossResult(total, count, {"ce": float(ce_sum.detach()), "kd": float(kd_scaled.detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {"mend/kd_per_target_ratio": self.scale.ratio}


def build_distiller(ctx: MethodContext) -> MendDistiller:
    """f_phi around the student's body (``mend.init``: loaded from a saved distiller)."""
    mc, llm = ctx.cfg.mend, ctx.teacher_model
    distiller = MendDistiller(ctx.model, mc.summary_len, llm_width(llm),
                              init_table=summary_init_table(llm, ctx.model), seed=ctx.cfg.seed)
    if mc.init is not None:
        load_distiller(distiller, Path(mc.init))
    return distiller


def build(ctx: MethodContext) -> MethodPlan:
    """``method: mend``: the distiller's player with the MEND objective; the report's three arms."""
    mc, stats = ctx.cfg.mend, ctx.data.stats
    if ctx.teacher_model is None:
        raise ValueError("method=mend needs the frozen LLM in process (teacher.model)")
    demo_lens = {e.uid: int(e.meta[DEMO_LEN]) for e in [*ctx.data.train, *ctx.data.heldout] if DEMO_LEN in e.meta}
    distiller = build_distiller(ctx)
    ctx.log(f"mend: stage {mc.stage}, {len(ctx.data.train)} training sequences (held out "
            f"{stats['heldout_records']}, too long {stats['dropped_too_long']}, bad {stats['records_bad']}); "
            f"{mc.summary_len} distilled vectors, lambda={mc.loss_lambda}, T={mc.loss_temperature}"
            + (f", from {mc.init}" if mc.init else ""))
    pad_id = ctx.tokenizer.pad_token_id

    def players(student: Player) -> list[Player]:
        scale = KdScale(demo_lens)
        forward = MendForward(distiller, ctx.teacher_model, demo_lens, pad_id, ctx.vocab_size)
        objective = MendObjective(forward, ctx.mix, 0.0 if mc.stage == "pretrain" else 1.0, mc.loss_lambda,
                                  mc.loss_temperature, scale)
        return [Player(student.name, distiller, objective, weight_targets=scale)]

    def report(run_dir: Path) -> None:
        write_report(ctx, distiller, demo_lens, run_dir)

    return MethodPlan(players=players, report=report)


METHOD = Method("mend", encoder=encoder, build=build)
