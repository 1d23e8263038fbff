"""REDI, reinforcement distillation (Xu et al. 2025): learn from correct *and* incorrect teacher traces.

Stage 1 is plain SFT on the correct traces (``method: sft`` on prompt/completion records,
recipe ``redi_sft``). Stage 2 (``method: redi``, this module) optimises, per pair
``(x, y_w, y_l)`` of a correct and an incorrect trace of the same problem,

    L = - log pi(y_w | x) / |y_w|  +  alpha * log pi(y_l | x) / |y_l|

averaged over the pairs of the optimizer step. ``log pi(y | x)`` sums the response tokens'
log-probabilities (fp32), ``|y|`` is the number of response tokens (>= 1; the EOS appended by
``data.add_eos`` is a response token), prompt tokens are masked, and there is no reference model.
``alpha = 1`` is the symmetric objective, ``alpha = 0`` is SFT on the positives.

How it runs in the one training loop (no loss of its own): the ``ce`` term's per-token value is
``l = -log p``; the loop divides the step's sum by ``N``, the number of target tokens of the step
(all micro-batches, all processes), which it counts before calling :class:`RediWeights`. With
``P`` pairs in the step (summed over processes), every chosen token gets weight
``N / (P * |y_w|)`` and every rejected token ``-alpha * N / (P * |y_l|)``, so ``sum(w * l) / N``
is exactly the mean of ``L`` over the step's pairs. The logged ``loss`` is therefore the REDI
objective (it can be negative).

Data: ``data.sources`` are files of ``{prompt, chosen, rejected}`` records, read by the one data
pipeline with :class:`PairEncoder`. The prompt and chosen fields are the source's ``prompt_field``
and ``completion_field`` (set ``completion_field: chosen``); the rejected field is
``redi.rejected_field``. Evaluation and the CE baseline see ``prompt + chosen``. A pair with either
sequence longer than ``data.seq_len`` is dropped (truncation would change ``|y|``) and counted as
``dropped_too_long``. The two sequences of a pair are drawn together into one micro-batch (the
grouped sampler; ``train.micro_batch_size`` counts sequences and must be even).

Monitoring (``redi.monitor_every``): the spec says a simultaneous sharp fall of the chosen and
rejected log-probs signals collapse. Every ``monitor_every`` steps a no-grad forward pass over the
step's micro-batches (before the step's update) measures the mean length-normalised log-probs of the
chosen and rejected traces: ``redi/logp_chosen``, ``redi/logp_rejected`` and ``redi/margin``. Cost:
one extra forward pass on those steps (about a third of a training step). ``log_state`` reports the
latest measurement and the step it was taken at (``redi/monitor_step``).

The data sets come from :mod:`stillroom.datagen.preference` (D_SFT: every correct teacher trace;
D_Pref: one correct and one incorrect trace per problem that has both).
"""

from __future__ import annotations

from typing import Literal

import torch

from stillroom.config.core import DataSource
from stillroom.data.batch import Batch
from stillroom.data.encoders import RecordViews
from stillroom.data.errors import BadRecord, DataError
from stillroom.data.formats import Format, TextEncoder, encode_record
from stillroom.eval.metrics import row_nll
from stillroom.methods.base import Method, MethodContext, MethodPlan, StepCounts

CHOSEN, REJECTED = "chosen", "rejected"


class PairEncoder:
    """A ``{prompt, chosen, rejected}`` record -> its chosen and rejected ``prompt_completion`` sequences."""

    roles = (CHOSEN, REJECTED)
    on_too_long: Literal["truncate", "drop"] = "drop"
    packs_text = False
    views_differ = True

    def __init__(self, rejected_field: str) -> None:
        self.rejected_field = rejected_field
        self.counts: dict[str, int] = {}

    def encode(self, fields: dict, fmt: Format, src: DataSource, text: TextEncoder, key: str) -> RecordViews | None:
        if fmt != "prompt_completion":
            raise DataError(f"method=redi reads prompt/chosen/rejected records, but a data source has format "
                            f"{fmt!r}; set its format: prompt_completion (or leave it unset)")
        if src.completion_field not in fields:
            raise BadRecord(f"missing the chosen trace field {src.completion_field!r} (fields: {sorted(fields)}); "
                            "set data.sources[].completion_field")
        if self.rejected_field not in fields:
            raise BadRecord(f"missing the rejected trace field {self.rejected_field!r} (fields: {sorted(fields)}); "
                            "set redi.rejected_field")
        chosen = encode_record(fields, "prompt_completion", src, text)
        rejected = encode_record(fields, "prompt_completion",
                                 src.model_copy(update={"completion_field": self.rejected_field}), text)
        if chosen is None or rejected is None:
            return None
        return RecordViews([chosen, rejected], chosen, chosen)


def check_pairs(batch: Batch) -> int:
    """Number of pairs in ``batch``; checks that rows ``2j, 2j + 1`` are the chosen and rejected of one pair."""
    if len(batch.roles) % 2:
        raise ValueError(f"redi: a micro-batch of {len(batch.roles)} rows is not made of whole pairs")
    for j in range(0, len(batch.roles), 2):
        if (batch.roles[j], batch.roles[j + 1]) != (CHOSEN, REJECTED) or \
                batch.uids[j].rsplit(":", 2)[0] != batch.uids[j + 1].rsplit(":", 2)[0]:
            raise ValueError(f"redi: rows {j} and {j + 1} ({batch.uids[j]!r}, {batch.uids[j + 1]!r}) are not the "
                             "chosen and rejected trace of one pair; REDI batches must come from the grouped sampler")
    return len(batch.roles) // 2


def redi_weights(batch: Batch, *, alpha: float, global_pairs: float, global_targets: float) -> torch.Tensor:
    """``[B, T]`` float32 weights: ``N / (P |y_w|)`` on chosen tokens, ``-alpha N / (P |y_l|)`` on rejected ones.

    ``N`` = ``global_targets`` (target tokens of the whole step), ``P`` = ``global_pairs``; ``|y|`` is
    the row's number of target tokens (>= 1). Zero where nothing is learned.
    """
    check_pairs(batch)
    mask_bt = batch.loss_mask
    lengths_b = mask_bt.sum(dim=1).clamp(min=1).to(torch.float32)
    sign_b = torch.ones_like(lengths_b)
    sign_b[1::2] = -alpha
    scale_b = sign_b * (float(global_targets) / float(global_pairs)) / lengths_b
    return scale_b[:, None] * mask_bt.to(torch.float32)


def normalised_logps(model: torch.nn.Module, batch: Batch, *, precision: str = "fp32",
                     vocab_size: int | None = None) -> torch.Tensor:
    """``[B]`` float32: ``log pi(y | x) / |y|`` of each row (response tokens only, log-softmax in fp32 over the
    first ``vocab_size`` logits, so padded head rows never enter it)."""
    nll_b, count_b = row_nll(model, batch, precision=precision, vocab_size=vocab_size)
    return (-nll_b / count_b.clamp(min=1)).float()


class RediWeights:
    """``weight_targets(micro, counts)``: the signed, length-normalised pair weights (module docstring),
    and every ``monitor_every`` steps the chosen/rejected log-prob monitor (before the step's update)."""

    def __init__(self, *, alpha: float, model: torch.nn.Module, monitor_every: int, precision: str = "fp32",
                 vocab_size: int | None = None) -> None:
        self.alpha = float(alpha)
        self.model = model
        self.monitor_every = int(monitor_every)
        self.precision = precision
        self.vocab_size = vocab_size
        self.state: dict[str, float] = {}

    def __call__(self, micro: list[Batch], counts: StepCounts) -> list[torch.Tensor]:
        pairs = counts.all_reduce_sum(sum(check_pairs(b) for b in micro))
        weights = [redi_weights(b, alpha=self.alpha, global_pairs=pairs, global_targets=counts.targets)
                   for b in micro]
        len_c = sum(float(b.loss_mask[0::2].sum()) for b in micro)
        len_r = sum(float(b.loss_mask[1::2].sum()) for b in micro)
        self.state.update({
            "redi/pairs": pairs,
            "redi/len_chosen": counts.all_reduce_sum(len_c) / pairs,
            "redi/len_rejected": counts.all_reduce_sum(len_r) / pairs,
        })
        if self.monitor_every and counts.step % self.monitor_every == 0:
            self._monitor(micro, counts, pairs)
        return weights

    def _monitor(self, micro: list[Batch], counts: StepCounts, pairs: float) -> None:
        sums = torch.zeros(2, dtype=torch.float64)
        for b in micro:  # row_nll runs in eval mode and restores the model's mode
            lp_b = normalised_logps(self.model, b, precision=self.precision, vocab_size=self.vocab_size).double()
            sums += torch.stack([lp_b[0::2].sum(), lp_b[1::2].sum()])
        chosen = counts.all_reduce_sum(float(sums[0])) / pairs
        rejected = counts.all_reduce_sum(float(sums[1])) / pairs
        self.state.update({
            "redi/logp_chosen": chosen, "redi/logp_rejected": rejected, "redi/margin": chosen - rejected,
            "redi/objective_before_step": -chosen + self.alpha * rejected, "redi/monitor_step": float(counts.step),
        })

    def metrics(self) -> dict[str, float]:
        return dict(self.state)


def build(ctx: MethodContext) -> MethodPlan:
    """``method: redi``: signed, length-normalised CE weights on the chosen/rejected pairs."""
    rc, stats = ctx.cfg.redi, ctx.data.stats
    pairs = len(ctx.data.train) // 2
    ctx.log(f"redi: {pairs} training pairs (held out {stats['heldout_records']}, too long "
            f"{stats['dropped_too_long']}, bad {stats['records_bad']}); alpha={rc.alpha}, "
            f"monitor_every={rc.monitor_every}")
    weights = RediWeights(alpha=rc.alpha, model=ctx.model, monitor_every=rc.monitor_every,
                          precision=ctx.cfg.train.precision, vocab_size=ctx.vocab_size)
    return MethodPlan(weight_targets=weights, metrics=weights.metrics)


METHOD = Method("redi", encoder=lambda cfg: PairEncoder(cfg.redi.rejected_field), build=build)
