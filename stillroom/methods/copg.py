"""CoPG, contrastive policy gradient (Flet-Berliac et al., EMNLP 2024; spec 14d): optimise a scalar sequence
reward from offline completions, with no importance sampling.

For a prompt ``x`` with ``k`` completions ``y_1 .. y_k`` (any behaviour policy: a teacher's samples, the
student's, a data set's) and their rewards ``R_i`` (a verifier's score; graded values welcome), the regularised
reward is ``a_i = R_i - beta (log pi(y_i|x) - log pi_ref(y_i|x))`` and the loss

    L(x) = (1 / (k - 1)) sum_{i>j} (a_i - a_j)^2 / (2 beta)

(:func:`stillroom.losses.preference.copg_group`). Its gradient for a pair is ``-(a_y - a_y')(grad log pi(y) -
grad log pi(y'))``, a policy gradient in which each sample's baseline is the other one; the loss is zero exactly
when ``log pi - log pi_ref - R / beta`` is the same for every completion, so its fixed point is the
KL-regularised optimum ``pi_ref exp(R / beta) / Z`` for any behaviour policy with full support.

* ``log pi(y|x)`` sums the response tokens' log-probabilities (fp32 log-softmax over the first ``vocab_size``
  logits; prompt tokens masked; the EOS that ``data.add_eos`` appends is a response token). No length
  normalisation: CoPG's fixed point is about sequence probabilities.
* ``pi_ref`` (``copg.reference``) is frozen: by default a copy of the student as the run starts (the usual RL
  fine-tuning regulariser: stay near the SFT checkpoint you start from), or the teacher (same tokenizer), whose
  log-probs are then the reference of ``pi_ref exp(R / beta)``.

How it runs in the one training loop (as LLaVA-MoD's preference stage): the grouped encoder
(:class:`CompletionsEncoder`) turns a record into its ``k`` ``prompt + completion`` sequences, which the grouped
sampler draws together into one micro-batch; each sequence's reward rides in ``Example.meta`` and is looked up by
the row's uid. The student's player gets an objective whose forward pass returns the rows' summed log-probs
``[B]`` (with gradient); the reference's are its teacher signal (no grad). ``weight_targets`` records ``N / G``
for the step (``N`` target tokens, ``G`` groups, over all micro-batches and processes), and each micro-batch's
loss is ``sum_groups L * N / G``, so the loop's ``sum / N`` is the mean CoPG loss of the step's groups: the
logged ``loss``.

Data: ``data.sources`` of ``{prompt, completions, rewards}`` records (``format: prompt_completion``; the fields
are ``prompt_field``, ``copg.completions_field``, ``copg.rewards_field``). Evaluation and the CE baseline see
``prompt + the best-rewarded completion`` (so ``baseline: true`` is SFT on the best completion). A record with a
completion longer than ``data.seq_len`` is dropped (truncation would change ``log pi(y|x)``) and counted as
``dropped_too_long``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from stillroom.config.core import DataSource
from stillroom.data.batch import Batch
from stillroom.data.encoders import RecordViews
from stillroom.data.errors import BadRecord, DataError
from stillroom.data.formats import Format, TextEncoder, encode_record
from stillroom.losses import LossResult
from stillroom.losses.preference import copg_group
from stillroom.methods.base import Method, MethodContext, MethodPlan, StepCounts
from stillroom.methods.llava_mod import PolicyLogps, reference_logps
from stillroom.train.loop import Player

REWARD = "copg_reward"
"""``Example.meta`` key of a sequence's reward."""
COMPLETION = "_copg_completion"
"""The field one completion is encoded from (a copy of the record with it added)."""


class CompletionsEncoder:
    """A ``{prompt, completions, rewards}`` record -> its ``k`` ``prompt + completion`` sequences (roles
    ``c0 .. c{k-1}``), each with its reward in ``meta``; eval and plain view: the best-rewarded completion."""

    on_too_long: Literal["truncate", "drop"] = "drop"
    packs_text = False
    views_differ = True

    def __init__(self, group_size: int, completions_field: str, rewards_field: str) -> None:
        self.roles = tuple(f"c{i}" for i in range(group_size))
        self.completions_field = completions_field
        self.rewards_field = rewards_field
        self.counts: dict[str, int] = {}

    def encode(self, fields: dict, fmt: Format, src: DataSource, text: TextEncoder, key: str) -> RecordViews | None:
        if fmt != "prompt_completion":
            raise DataError(f"method=copg reads {{prompt, {self.completions_field}, {self.rewards_field}}} records, "
                            f"but a data source has format {fmt!r}; set its format: prompt_completion")
        completions, rewards = self._completions(fields), self._rewards(fields)
        seqs = []
        for completion, reward in zip(completions, rewards):
            enc = encode_record({**fields, COMPLETION: completion}, "prompt_completion",
                                src.model_copy(update={"completion_field": COMPLETION}), text)
            if enc is None:
                return None
            enc.meta = {**enc.meta, REWARD: reward}
            seqs.append(enc)
        best = seqs[max(range(len(rewards)), key=rewards.__getitem__)]
        return RecordViews(seqs, best, best)

    def _completions(self, fields: dict) -> list[str]:
        value = fields.get(self.completions_field)
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise BadRecord(f"field {self.completions_field!r} must be a list of completion strings (fields: "
                            f"{sorted(fields)}); set copg.completions_field")
        if len(value) != len(self.roles):
            raise BadRecord(f"field {self.completions_field!r} holds {len(value)} completions, but "
                            f"copg.group_size is {len(self.roles)}: give every record exactly that many")
        return value

    def _rewards(self, fields: dict) -> list[float]:
        value = fields.get(self.rewards_field)
        ok = isinstance(value, list) and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in value)
        if not ok or len(value) != len(self.roles) or not all(math.isfinite(r) for r in value):
            raise BadRecord(f"field {self.rewards_field!r} must be a list of {len(self.roles)} finite numbers, one "
                            f"per completion (got {value!r:.80}); set copg.rewards_field")
        return [float(r) for r in value]


def check_groups(batch: Batch, group_size: int) -> int:
    """Number of groups in ``batch``; checks that each run of ``group_size`` rows is ``c0 .. c{k-1}`` of one
    record (what the grouped sampler draws)."""
    roles = [f"c{i}" for i in range(group_size)]
    if len(batch.roles) % group_size:
        raise ValueError(f"copg: a micro-batch of {len(batch.roles)} rows is not made of whole groups of {group_size}")
    for j in range(0, len(batch.roles), group_size):
        records = {uid.rsplit(":", 2)[0] for uid in batch.uids[j:j + group_size]}
        if list(batch.roles[j:j + group_size]) != roles or len(records) != 1:
            raise ValueError(f"copg: rows {j}..{j + group_size - 1} ({batch.uids[j:j + group_size]}) are not the "
                             "completions of one prompt; CoPG batches must come from the grouped sampler")
    return len(batch.roles) // group_size


class GroupStepScale:
    """``weight_targets``: records ``N / G`` for the step (``G`` groups of all micro-batches and processes) and
    leaves the targets' weights at 1."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size
        self.scale = 1.0

    def __call__(self, micro: list[Batch], counts: StepCounts) -> list[torch.Tensor]:
        groups = counts.all_reduce_sum(sum(check_groups(b, self.group_size) for b in micro))
        self.scale = float(counts.targets) / float(groups)
        return [b.loss_mask.to(torch.float32) for b in micro]


@dataclass
class CopgObjective:
    """The CoPG loss of the student's summed log-probs against a frozen reference (module docstring)."""

    forward: torch.nn.Module
    state: torch.nn.Module
    reference: torch.nn.Module
    rewards: dict[str, float]
    vocab: int
    beta: float
    group_size: int
    step_scale: GroupStepScale
    last: dict[str, float] = field(default_factory=dict)

    def signal(self, batch: Batch) -> torch.Tensor:
        """``[B]`` reference log-probs (:func:`~stillroom.methods.llava_mod.reference_logps`)."""
        return reference_logps(self.reference, batch, self.vocab)

    def loss(self, outputs: dict, batch: Batch, signal: torch.Tensor) -> LossResult:
        groups = check_groups(batch, self.group_size)
        logp_gk = outputs["logps"].view(groups, self.group_size)
        ref_gk = signal.to(logp_gk.device).view(groups, self.group_size)
        reward_gk = self.batch_rewards(batch, logp_gk.device).view(groups, self.group_size)
        group_sum, _ = copg_group(logp_gk, ref_gk, reward_gk, beta=self.beta)
        total = group_sum * self.step_scale.scale
        self._remember(logp_gk.detach(), ref_gk, reward_gk, groups)
        return LossResult(total, groups, {"copg": float(total.detach())})

    def batch_rewards(self, batch: Batch, device: torch.device) -> torch.Tensor:
        """``[B]`` float32 rewards of the batch's rows (by uid; every training sequence has one)."""
        missing = [u for u in batch.uids if u not in self.rewards]
        if missing:
            raise ValueError(f"copg: no reward for the training sequences {missing[:3]}; CoPG trains only on the "
                             "sequences of its own encoder (copg.completions_field / copg.rewards_field)")
        return torch.tensor([self.rewards[u] for u in batch.uids], dtype=torch.float32, device=device)

    def _remember(self, logp_gk: torch.Tensor, ref_gk: torch.Tensor, reward_gk: torch.Tensor, groups: int) -> None:
        log_ratio_gk = logp_gk - ref_gk
        regularised_gk = reward_gk - self.beta * log_ratio_gk
        self.last = {"copg/groups": float(groups), "copg/reward_mean": float(reward_gk.mean()),
                     "copg/log_ratio_mean": float(log_ratio_gk.mean()),
                     "copg/regularised_spread": float(regularised_gk.std(dim=1, unbiased=False).mean()),
                     "copg/logp_mean": float(logp_gk.mean())}

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return dict(self.last)


def reference_model(ctx: MethodContext) -> torch.nn.Module:
    """The frozen pi_ref: a copy of the student as the run starts, or the teacher (``copg.reference``)."""
    if ctx.cfg.copg.reference == "teacher":
        if ctx.teacher_model is None:
            raise ValueError("copg.reference=teacher needs the teacher in process (teacher.model)")
        ref = ctx.teacher_model
    else:
        ref = copy.deepcopy(ctx.model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def sequence_rewards(examples: list[Any]) -> dict[str, float]:
    """uid -> reward of every training sequence the encoder made."""
    return {e.uid: float(e.meta[REWARD]) for e in examples if REWARD in e.meta}


def build(ctx: MethodContext) -> MethodPlan:
    """``method: copg``: the student's player with the CoPG objective (module docstring)."""
    cc, stats = ctx.cfg.copg, ctx.data.stats
    rewards = sequence_rewards(ctx.data.train)
    values = list(rewards.values())
    ctx.log(f"copg: {len(ctx.data.train) // cc.group_size} training prompts x {cc.group_size} completions "
            f"(held out {stats['heldout_records']}, too long {stats['dropped_too_long']}, bad {stats['records_bad']}); "
            f"beta={cc.beta}, reference={cc.reference}; rewards in [{min(values, default=0):g}, "
            f"{max(values, default=0):g}]")
    reference = reference_model(ctx)

    def players(student: Player) -> list[Player]:
        scale = GroupStepScale(cc.group_size)
        objective = CopgObjective(PolicyLogps(student.model, ctx.vocab_size), ctx.mix, reference, rewards,
                                  ctx.vocab_size, cc.beta, cc.group_size, scale)
        return [Player(student.name, student.model, objective, replace_batches=student.replace_batches,
                       weight_targets=scale, after_update=student.after_update)]

    return MethodPlan(players=players)


METHOD = Method("copg", encoder=lambda cfg: CompletionsEncoder(cfg.copg.group_size, cfg.copg.completions_field,
                                                               cfg.copg.rewards_field), build=build)
