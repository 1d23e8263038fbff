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
(all micro-batches, all processes). With ``P`` pairs in the step, every chosen token gets weight
``N / (P * |y_w|)`` and every rejected token ``-alpha * N / (P * |y_l|)`` (``Batch.target_weight``),
so ``sum(w * l) / N`` is exactly the mean of ``L`` over the step's pairs. ``P`` and ``N`` are
summed over processes. The logged ``loss`` is therefore the REDI objective (it can be negative).

Data: ``data.sources`` are files of ``{prompt, chosen, rejected}`` records. The prompt and chosen
fields are the source's ``prompt_field`` and ``completion_field`` (set ``completion_field: chosen``),
so the data pipeline's held-out split and evaluation see ``prompt + chosen``; the rejected field is
``redi.rejected_field``. Held-out records (same hash rule as the pipeline) are not trained on. A pair
with either sequence longer than ``data.seq_len`` is dropped (truncation would change ``|y|``) and
counted. :class:`PairSampler` keeps the two sequences of a pair in the same micro-batch
(``train.micro_batch_size`` counts sequences and must be even).

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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from stillroom.config.schema import RunConfig
from stillroom.data.batch import Batch, Example
from stillroom.data.errors import BadRecord, BadRecordPolicy, DataError
from stillroom.data.formats import TextEncoder, encode_record
from stillroom.eval.metrics import row_nll
from stillroom.data.pipeline import good_records, is_heldout, record_key, source_tags
from stillroom.data.readers import describe
from stillroom.data.sampler import ExampleSampler

CHOSEN, REJECTED = "chosen", "rejected"


# ---------------------------------------------------------------------------------- checks
def check_redi_run(cfg: RunConfig, term_names: Sequence[str], term_weights: Sequence[float] = ()) -> None:
    """Refuse what REDI cannot do, before step 0 (errors name the key to change)."""
    if list(term_names) != ["ce"]:
        raise ValueError(
            "method=redi applies signed, length-normalised weights to cross-entropy and needs loss.terms to be "
            f"exactly one 'ce' term; loss.terms are {list(term_names)}. Set loss.terms: [{{name: ce}}]"
        )
    if any(w != 1.0 for w in term_weights):
        raise ValueError(f"method=redi: the 'ce' term's weight must be 1 (got {list(term_weights)}); "
                         "scale the update with train.lr instead")
    mbs = cfg.train.micro_batch_size
    if mbs % 2:
        raise ValueError(f"method=redi: train.micro_batch_size={mbs} counts sequences and must be even "
                         "(each pair puts its chosen and its rejected trace in the same micro-batch)")


# ---------------------------------------------------------------------------------- data
def _target_bytes(tokenizer: Any, ids: list[int], target: list[bool]) -> int:
    learned = [i for t, i in enumerate(ids) if t >= 1 and target[t]]
    return len(tokenizer.decode(learned, skip_special_tokens=True).encode("utf-8"))


def load_pairs(cfg: RunConfig, tokenizer: Any, *, log: Callable[[str], None] = print) -> tuple[list[Example], dict]:
    """The training pairs of ``cfg.data.sources`` as ``[chosen_0, rejected_0, chosen_1, rejected_1, ...]``.

    Every example's uid is ``<source>:<record index>|chosen`` or ``|rejected``; only response tokens
    (completion + EOS) are targets. Returns ``(examples, stats)`` with counts of pairs read, held out,
    dropped as too long, and bad records (``data.on_bad_record`` applies).
    """
    dc = cfg.data
    rejected_field = cfg.redi.rejected_field
    enc = TextEncoder(tokenizer, dc.add_eos)
    stats = {"records_read": 0, "pairs": 0, "heldout_records": 0, "dropped_too_long": 0, "dropped_no_targets": 0,
             "records_bad": 0}
    examples: list[Example] = []
    for i, (src, tag) in enumerate(zip(dc.sources, source_tags(dc.sources))):
        label = describe(src).label
        if src.format not in (None, "prompt_completion"):
            raise DataError(f"data.sources[{i}] ({label}): method=redi reads prompt/chosen/rejected records, "
                            f"but format is {src.format!r}; set format: prompt_completion (or leave it unset)")
        rejected_src = src.model_copy(update={"completion_field": rejected_field})
        policy = BadRecordPolicy(dc.on_bad_record)
        for item in good_records(src, cfg.seed, policy, stats):
            if is_heldout(record_key(tag, item.index, item.fields), dc.heldout_fraction):
                stats["heldout_records"] += 1
                continue
            try:
                if src.completion_field not in item.fields:
                    raise BadRecord(f"missing the chosen trace field {src.completion_field!r} (fields: "
                                    f"{sorted(item.fields)}); set data.sources[{i}].completion_field")
                if rejected_field not in item.fields:
                    raise BadRecord(f"missing the rejected trace field {rejected_field!r} (fields: "
                                    f"{sorted(item.fields)}); set redi.rejected_field")
                chosen = encode_record(item.fields, "prompt_completion", src, enc)
                rejected = encode_record(item.fields, "prompt_completion", rejected_src, enc)
            except BadRecord as bad:
                policy(bad.at(item.where))
                continue
            if chosen is None or rejected is None or not any(chosen.target[1:]) or not any(rejected.target[1:]):
                stats["dropped_no_targets"] += 1
                continue
            if max(len(chosen.input_ids), len(rejected.input_ids)) > dc.seq_len:
                stats["dropped_too_long"] += 1
                continue
            base = f"{tag}:{item.index}"
            for role, e in ((CHOSEN, chosen), (REJECTED, rejected)):
                examples.append(Example(
                    input_ids=list(e.input_ids), target=list(e.target), uid=f"{base}|{role}", domain=src.domain,
                    n_bytes=_target_bytes(tokenizer, e.input_ids, e.target),
                    meta={"source": tag, "record": item.index, "role": role},
                ))
            stats["pairs"] += 1
        stats["records_bad"] += policy.count
    if not examples:
        raise DataError(f"method=redi: no training pairs in data.sources ({stats}); check the field names "
                        f"(prompt_field, completion_field for the chosen trace, redi.rejected_field), "
                        f"data.seq_len={dc.seq_len} and data.heldout_fraction")
    if stats["dropped_too_long"]:
        log(f"redi: dropped {stats['dropped_too_long']} pairs longer than data.seq_len={dc.seq_len} "
            "(raise data.seq_len to keep them)")
    return examples, stats


# ---------------------------------------------------------------------------------- sampler
class PairSampler:
    """Micro-batches of whole pairs: indices ``2i, 2i + 1`` (chosen, rejected) of each drawn pair ``i``.

    Called like :class:`ExampleSampler` with ``n`` sequences and ``batch_size`` sequences per
    micro-batch; draws ``batch_size / 2`` of the ``n / 2`` pairs with an :class:`ExampleSampler`
    (same epochs, shuffling, rank split and resumable ``state_dict``).
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if n % 2:
            raise ValueError(f"PairSampler: {n} sequences is not a whole number of (chosen, rejected) pairs")
        if batch_size % 2:
            raise ValueError(f"method=redi: train.micro_batch_size={batch_size} counts sequences and must be even")
        self.pairs = ExampleSampler(n // 2, batch_size // 2, seed, shuffle=shuffle, rank=rank, world_size=world_size)

    def next_indices(self) -> list[int]:
        return [j for i in self.pairs.next_indices() for j in (2 * i, 2 * i + 1)]

    def state_dict(self) -> dict:
        return {"pairs": self.pairs.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pairs.load_state_dict(state["pairs"])


# ---------------------------------------------------------------------------------- weights
def pair_rows(batch: Batch) -> int:
    """Number of pairs in ``batch``; checks that rows ``2j, 2j + 1`` are the chosen and rejected of one pair."""
    uids = batch.uids
    if len(uids) % 2:
        raise ValueError(f"redi: a micro-batch of {len(uids)} rows is not made of whole pairs")
    for j in range(0, len(uids), 2):
        c, r = uids[j], uids[j + 1]
        if not (c.endswith("|" + CHOSEN) and r.endswith("|" + REJECTED)
                and c[: -len(CHOSEN)] == r[: -len(REJECTED)]):
            raise ValueError(f"redi: rows {j} and {j + 1} ({c!r}, {r!r}) are not the chosen and rejected "
                             "trace of one pair; REDI batches must come from PairSampler")
    return len(uids) // 2


def redi_weights(batch: Batch, *, alpha: float, global_pairs: float, global_targets: float) -> torch.Tensor:
    """``[B, T]`` float32 weights: ``N / (P |y_w|)`` on chosen tokens, ``-alpha N / (P |y_l|)`` on rejected ones.

    ``N`` = ``global_targets`` (target tokens of the whole step), ``P`` = ``global_pairs``; ``|y|`` is
    the row's number of target tokens (>= 1). Zero where nothing is learned.
    """
    pair_rows(batch)
    mask_bt = batch.loss_mask
    lengths_b = mask_bt.sum(dim=1).clamp(min=1).to(torch.float32)
    sign_b = torch.ones_like(lengths_b)
    sign_b[1::2] = -alpha
    scale_b = sign_b * (float(global_targets) / float(global_pairs)) / lengths_b
    return scale_b[:, None] * mask_bt.to(torch.float32)


def normalised_logps(model: torch.nn.Module, batch: Batch, *, precision: str = "fp32") -> torch.Tensor:
    """``[B]`` float32: ``log pi(y | x) / |y|`` of each row (response tokens only, log-softmax in fp32)."""
    nll_b, count_b = row_nll(model, batch, precision=precision)
    return (-nll_b / count_b.clamp(min=1)).float()


class RediBatches:
    """``prepare_batches(micro, step)``: sets ``target_weight`` of every micro-batch (module docstring)."""

    def __init__(self, *, alpha: float, model: torch.nn.Module, topology: Any, monitor_every: int,
                 precision: str = "fp32") -> None:
        self.alpha = float(alpha)
        self.model = model
        self.topology = topology
        self.monitor_every = int(monitor_every)
        self.precision = precision
        self.state: dict[str, float] = {}

    def __call__(self, micro: list[Batch], step: int) -> list[Batch]:
        local_pairs = sum(pair_rows(b) for b in micro)
        local_targets = sum(b.num_targets for b in micro)
        global_pairs = self.topology.all_reduce_sum(local_pairs)
        global_targets = self.topology.all_reduce_sum(local_targets)
        for b in micro:
            b.target_weight = redi_weights(b, alpha=self.alpha, global_pairs=global_pairs,
                                           global_targets=global_targets)
        len_c = sum(float(b.loss_mask[0::2].sum()) for b in micro)
        len_r = sum(float(b.loss_mask[1::2].sum()) for b in micro)
        self.state.update({
            "redi/pairs": global_pairs,
            "redi/len_chosen": self.topology.all_reduce_sum(len_c) / global_pairs,
            "redi/len_rejected": self.topology.all_reduce_sum(len_r) / global_pairs,
        })
        if self.monitor_every and step % self.monitor_every == 0:
            self._monitor(micro, step, global_pairs)
        return micro

    def _monitor(self, micro: list[Batch], step: int, global_pairs: float) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            sums = torch.zeros(2, dtype=torch.float64)
            for b in micro:
                lp_b = normalised_logps(self.model, b, precision=self.precision).double()
                sums += torch.stack([lp_b[0::2].sum(), lp_b[1::2].sum()])
        finally:
            self.model.train(was_training)
        chosen = self.topology.all_reduce_sum(float(sums[0])) / global_pairs
        rejected = self.topology.all_reduce_sum(float(sums[1])) / global_pairs
        self.state.update({
            "redi/logp_chosen": chosen, "redi/logp_rejected": rejected, "redi/margin": chosen - rejected,
            "redi/objective_before_step": -chosen + self.alpha * rejected, "redi/monitor_step": float(step),
        })

    def log_state(self) -> dict[str, float]:
        return dict(self.state)


def build_hooks(p: Any, model: torch.nn.Module, *, mix: Any, run_dir: Path, log: Callable[[str], None] = print):
    """``method: redi``: pairs from ``data.sources``, pair-preserving sampler, signed length-normalised CE weights."""
    from stillroom.methods.hooks import MethodHooks

    cfg = p.cfg
    terms = mix.cfg.terms
    check_redi_run(cfg, [t.name for t in terms], [t.weight for t in terms])
    examples, stats = load_pairs(cfg, p.tokenizer, log=log)
    rc = cfg.redi
    log(f"redi: {stats['pairs']} training pairs (held out {stats['heldout_records']}, too long "
        f"{stats['dropped_too_long']}, bad {stats['records_bad']}); alpha={rc.alpha}, "
        f"monitor_every={rc.monitor_every}")
    if stats["pairs"] < (cfg.train.micro_batch_size // 2) * p.topology.world_size:
        raise ValueError(f"method=redi: {stats['pairs']} pairs cannot fill one micro-batch of "
                         f"{cfg.train.micro_batch_size // 2} pairs x {p.topology.world_size} processes; "
                         "lower train.micro_batch_size or add pairs")
    prepare = RediBatches(alpha=rc.alpha, model=model, topology=p.topology, monitor_every=rc.monitor_every,
                          precision=cfg.train.precision)
    return MethodHooks(train_examples=examples, sampler_factory=PairSampler, prepare_batches=prepare,
                       log_state=prepare.log_state)
