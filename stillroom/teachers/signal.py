"""The seam of distillation: what a teacher hands to the losses.

Positions are already aligned with the student's logits: ``signal[b, t]`` is the
teacher's distribution over the token that ``student_logits[b, t]`` predicts
(the causal shift happens once, in :mod:`stillroom.data.collate`).

A signal is either dense or sparse (top-k):

* dense: ``logits_btv`` - raw teacher logits ``[B, T, V]`` (any float dtype).
  Loss terms apply ``loss_temperature`` to them.
* top-k: ``topk_ids_btk`` ``[B, T, K]`` (int), ``topk_logprobs_btk`` ``[B, T, K]``
  (log-probabilities of the teacher at ``temperature``, float) and
  ``tail_logmass_bt`` ``[B, T]``: ``log(1 - sum(exp(topk_logprobs)))``, the log of
  the probability mass outside the top k (``-inf`` when k covers everything).
  Because the tail is only known as a total, top-k divergences compare the two
  distributions on K + 1 bins (the k tokens and "everything else"); see
  :mod:`stillroom.losses.sparse`.

Optionally ``hidden_states``: ``{layer_index: [B, T, H]}`` for hidden-state terms.

:class:`OnlineTeacher` is the in-process source: a Hugging Face model run on each batch under
``torch.no_grad``. It can live on another device than the student (``teacher.device``) and in
bf16 weights (``teacher.dtype``); its activations are freed after each micro-batch because
nothing of its graph is kept. Its signal is dense (``[B, T, V]`` logits, moved to the
student's device), or in head mode its last hidden state and head (:class:`TeacherHidden`), from
which the loss makes the logits a chunk of rows at a time. The store, remote and ensemble sources
live in their own modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from stillroom.data.batch import Batch


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a teacher signal; must match the student's before step 0."""

    teacher: str
    tokenizer_hash: str
    vocab_size: int

    def mismatch(self, other: "Fingerprint") -> list[str]:
        """Names of the fields that differ (empty when compatible)."""
        out = []
        if self.tokenizer_hash != other.tokenizer_hash:
            out.append(f"tokenizer_hash ({self.tokenizer_hash[:12]} vs {other.tokenizer_hash[:12]})")
        if self.vocab_size != other.vocab_size:
            out.append(f"vocab_size ({self.vocab_size} vs {other.vocab_size})")
        return out


@dataclass
class CrossTargets:
    """A teacher with another tokenizer, at the student's positions (``teacher.tokenizer_mode: cross``).

    Built by :class:`~stillroom.teachers.cross.CrossTeacher` from the teacher's logits at the
    aligned positions (:mod:`stillroom.teachers.cross_align`); the teacher's full ``[V_t]``
    distribution is reduced to what the loss terms compare, so a 256k-vocabulary teacher never
    hands the loss more than student-sized rows.
    """

    aligned_bt: torch.Tensor
    """``[B, T]`` bool: student positions with a teacher distribution (same text read before them)."""
    matched_student: torch.Tensor
    """``[M]`` long: the student ids with a teacher token of the same spelling."""
    matched_logits_btm: torch.Tensor
    """``[B, T, M]``: the teacher's raw logits at those tokens (0 where not aligned); divergence terms
    compare the two distributions renormalised over these ``M`` tokens."""
    ranked: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Support (``all``, ``unmatched``) -> (``[B, T, K]`` teacher probabilities at ``temperature``, sorted
    descending; ``[B, T]`` the mass beyond them), for the ``uld`` term."""
    temperature: float = 1.0


@dataclass
class TeacherSignal:
    logits_btv: torch.Tensor | None = None
    topk_ids_btk: torch.Tensor | None = None
    topk_logprobs_btk: torch.Tensor | None = None
    tail_logmass_bt: torch.Tensor | None = None
    temperature: float = 1.0
    """Temperature at which ``topk_logprobs_btk`` were computed (dense ignores it)."""
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    fingerprint: Fingerprint | None = None
    cross: CrossTargets | None = None
    """Set by a cross-tokenizer teacher (then ``logits_btv`` and the top-k fields are None)."""

    @property
    def is_dense(self) -> bool:
        return self.logits_btv is not None

    @property
    def is_topk(self) -> bool:
        return self.topk_ids_btk is not None

    def __post_init__(self) -> None:
        if self.logits_btv is None and self.topk_ids_btk is None and not self.hidden_states and self.cross is None:
            raise ValueError("TeacherSignal needs dense logits, a top-k signal or hidden states")
        if self.topk_ids_btk is not None:
            if self.topk_logprobs_btk is None or self.tail_logmass_bt is None:
                raise ValueError("a top-k TeacherSignal needs topk_logprobs_btk and tail_logmass_bt")
            if self.topk_ids_btk.shape != self.topk_logprobs_btk.shape:
                raise ValueError(
                    f"topk ids {tuple(self.topk_ids_btk.shape)} and log-probs "
                    f"{tuple(self.topk_logprobs_btk.shape)} differ in shape"
                )

    def slice_tokens(self, index: torch.Tensor) -> "TeacherSignal":
        """Select flattened token rows (used by chunked losses).

        ``index`` indexes the flattened ``[B*T]`` axis; returns a signal whose
        tensors have a leading ``[N]`` axis (hidden states are dropped).
        """

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            return x.reshape(-1, *x.shape[2:])[index]

        return TeacherSignal(
            logits_btv=pick(self.logits_btv),
            topk_ids_btk=pick(self.topk_ids_btk),
            topk_logprobs_btk=pick(self.topk_logprobs_btk),
            tail_logmass_bt=pick(self.tail_logmass_bt),
            temperature=self.temperature,
            fingerprint=self.fingerprint,
        )


@dataclass
class TeacherHidden:
    """A dense teacher as its last hidden state and output head instead of logits: the loss applies the head a
    chunk of rows at a time (:meth:`TeacherRows.take`), so the teacher's ``[B, T, V]`` logits never exist (at a
    256k vocabulary, 4 x 128 tokens, they were 250 MiB of fresh bf16 per micro-batch). Liger's fused linear
    divergence reads the same (:mod:`stillroom.losses.liger`)."""

    hidden_btd: torch.Tensor
    """``[B, T, D_teacher]`` after the final norm, on the student's device."""
    weight: torch.Tensor
    """``[V, D_teacher]``: the teacher's head restricted to the shared vocabulary."""
    bias: torch.Tensor | None = None
    """``[V]`` or ``None``."""


def real_ids(batch: "Batch") -> list[list[int]]:
    """Each row's real token ids (its ``attention_mask`` ones): what a teacher that re-reads the batch (a server, a
    teacher with another tokenizer) is given. Rows must be right-padded (ones then zeros); the error names the row."""
    out = []
    for b, n in enumerate(batch.attention_mask.sum(dim=1).tolist()):
        if not bool(batch.attention_mask[b, :n].all()):
            raise ValueError(f"row {b} (uid {batch.uids[b]}) is not right-padded; a teacher that re-reads the rows "
                             "(remote, another tokenizer) needs attention_mask = ones then zeros")
        out.append(batch.input_ids[b, :n].tolist())
    return out


def tail_logmass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_k exp(topk_logprobs))`` over the last axis, computed stably (float64 inside, fp32 out).

    Returns ``-inf`` where the top k hold all the mass (k = V).
    """
    # float64: in fp32 a full top-k (k = V) sums to 1 - 1e-7 and gives about -15 instead of -inf.
    lse = torch.logsumexp(topk_logprobs.double(), dim=-1).clamp(max=0.0)
    # log(1 - exp(lse)) = log(-expm1(lse)); -expm1(0) = 0 -> -inf, as intended.
    out = torch.log(-torch.expm1(lse))
    return out.to(torch.float32)


class OnlineTeacher:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        vocab_size: int,
        fingerprint: Fingerprint | None = None,
        hidden_layers: list[int] | None = None,
        attentions: bool = False,
        output_device: torch.device | str = "cpu",
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab_size = vocab_size
        self.fingerprint = fingerprint
        self.hidden_layers = sorted(set(hidden_layers or []))
        self.attentions = attentions  # the model must run eager attention to return them (the factory sees to it)
        self.output_device = torch.device(output_device)
        self.device = next(model.parameters()).device
        self.head: tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None] | None = None
        """``(body, weight [V, D], bias)`` in head mode (:meth:`with_head`): :meth:`signal` stops before the head."""

    def with_head(self, body: torch.nn.Module, head: torch.nn.Linear) -> "OnlineTeacher":
        """The same teacher in head mode: its signal is the body's last hidden state and ``head`` restricted to
        the shared vocabulary (:class:`TeacherHidden`), for a loss that applies the head itself. Only for a
        loss with nothing but logit terms (no hidden states or attentions are returned)."""
        twin = OnlineTeacher(self.model, vocab_size=self.vocab_size, fingerprint=self.fingerprint,
                             output_device=self.output_device)
        bias = None if head.bias is None else head.bias[: self.vocab_size].detach().to(self.output_device)
        twin.head = (body, head.weight[: self.vocab_size].detach().to(self.output_device), bias)
        return twin

    @torch.no_grad()
    def signal(self, batch: Batch) -> TeacherSignal | TeacherHidden:
        """Dense teacher logits for ``batch``: ``[B, T, V]`` aligned with the student's positions (in head mode
        the last hidden state and head instead)."""
        from stillroom.data.batch import model_inputs_for  # the losses import this module; they need no batch code

        inputs = model_inputs_for(self.model, batch, self.device)  # ids, mask (+ pixel_values; flash: varlen)
        if self.head is not None:
            body, weight, bias = self.head
            hidden = body(**inputs, use_cache=False).last_hidden_state
            return TeacherHidden(hidden.to(self.output_device), weight, bias)
        out = self.model(
            **inputs,
            output_hidden_states=bool(self.hidden_layers),
            output_attentions=self.attentions,
            use_cache=False,
        )
        logits_btv = out.logits[..., : self.vocab_size].to(self.output_device)
        hidden = {}
        if self.hidden_layers:
            hidden = {i: out.hidden_states[i].to(self.output_device) for i in self.hidden_layers}
        attentions = {}
        if self.attentions:
            attentions = {i: a.to(self.output_device) for i, a in enumerate(out.attentions)}
        return TeacherSignal(logits_btv=logits_btv, hidden_states=hidden, attentions=attentions, fingerprint=self.fingerprint)


# ---------------------------------------------------------------- flat rows for the loss engine
# A loss call flattens its teacher once (:class:`TeacherRows`) and takes chunks of rows from it; these
# views live beside the signal they read so that the step reads through no extra module.

TeacherLike = torch.Tensor | TeacherSignal | TeacherHidden | Sequence[torch.Tensor]
NEG_INF = float("-inf")


def sanitize_logits(z: torch.Tensor) -> torch.Tensor:
    """Map ``+inf``/``-inf`` logits to ``-inf``: an infinite logit marks an entry that is not
    part of the distribution (vocabulary padding, banned token). NaN is left alone: it is a bug."""
    return z.masked_fill(torch.isinf(z), NEG_INF)


class TeacherRows:
    """Flat ``[B*T, ...]`` views of a teacher, from which chunks of rows are taken.

    Accepts dense logits ``[B, T, V]``, a :class:`TeacherSignal` (dense or top-k), a :class:`TeacherHidden`
    (dense, its logits made a chunk at a time) or a list of dense logits (an ensemble: the target is the average of
    their probabilities, MEAL V2). ``None`` is allowed for teacher-free terms (``ce``).
    """

    def __init__(self, teacher: TeacherLike | None, vocab: int, loss_temperature: float):
        self.dense: list[torch.Tensor] = []
        self.topk: TeacherSignal | None = None
        self.cross: CrossRows | None = None
        self.hidden: TeacherHidden | None = None
        self._dense_flat: list[torch.Tensor] = []
        if teacher is None:
            return
        if isinstance(teacher, TeacherHidden):  # dense, as hidden state + head: logits made per chunk in take()
            if teacher.weight.shape[0] != vocab:
                raise ValueError(f"teacher head rows {teacher.weight.shape[0]} != student vocab {vocab}; restrict "
                                 "the head to the shared tokenizer length")
            self.hidden, self._hidden_flat = teacher, teacher.hidden_btd.reshape(-1, teacher.hidden_btd.shape[-1])
            return
        if isinstance(teacher, TeacherSignal):  # its fields, read directly: the signal is data here
            if teacher.cross is not None:  # another vocabulary: compared on matched ids or ranked (CrossRows)
                self.cross = CrossRows(teacher.cross)
                return
            if teacher.logits_btv is not None:
                self.dense = [teacher.logits_btv]
            elif teacher.topk_ids_btk is not None:
                if abs(teacher.temperature - loss_temperature) > 1e-6:
                    raise ValueError(
                        f"the top-k teacher log-probs were computed at temperature {teacher.temperature} but "
                        f"loss_temperature is {loss_temperature}; a top-k signal cannot be re-tempered. "
                        "Set loss.loss_temperature to the store's temperature or rebuild the store."
                    )
                self.topk = teacher
            else:
                raise ValueError("this teacher signal carries only hidden states; logit terms need logits or top-k")
        elif isinstance(teacher, torch.Tensor):
            self.dense = [teacher]
        else:
            self.dense = list(teacher)
            if not self.dense or not all(isinstance(t, torch.Tensor) for t in self.dense):
                raise ValueError("a teacher list must hold dense logits tensors [B, T, V]")
        for t in self.dense:
            if t.shape[-1] != vocab:
                raise ValueError(
                    f"teacher vocab {t.shape[-1]} != student vocab {vocab}; slice both to the shared tokenizer "
                    "length before the loss (padding rows only)"
                )
        self._dense_flat = [t.reshape(-1, vocab) for t in self.dense]
        if self.topk is not None:
            k = self.topk.topk_ids_btk.shape[-1]
            self._ids = self.topk.topk_ids_btk.reshape(-1, k)
            self._lp = self.topk.topk_logprobs_btk.reshape(-1, k)
            self._tail = self.topk.tail_logmass_bt.reshape(-1)

    @property
    def present(self) -> bool:
        return bool(self.dense) or self.topk is not None or self.cross is not None or self.hidden is not None

    def take(self, rows: torch.Tensor | slice) -> "TeacherChunk":
        """The teacher on ``rows`` of the flat ``[B*T]`` axis: a slice (views) or an index tensor."""
        if self.cross is not None:
            return TeacherChunk(cross=self.cross.take(rows))
        if self.hidden is not None:  # [n, V] logits of these rows only, in the head's dtype
            h = self.hidden
            return TeacherChunk(dense=[torch.nn.functional.linear(self._hidden_flat[rows], h.weight, h.bias)])
        n = self._dense_flat[0].shape[0] if self._dense_flat else -1
        if isinstance(rows, torch.Tensor) and rows.numel() == n:  # every row (plain path, full mask): views
            return TeacherChunk(dense=list(self._dense_flat))
        if self.topk is not None:
            return TeacherChunk(topk=(self._ids[rows], self._lp[rows], self._tail[rows]))
        return TeacherChunk(dense=[t[rows] for t in self._dense_flat])


@dataclass
class TeacherChunk:
    dense: list[torch.Tensor] | None = None
    topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    cross: "CrossChunk | None" = None


@dataclass
class CrossChunk:
    """A cross-tokenizer teacher on ``N`` rows: ``aligned_n`` ``[N]`` bool (rows with a teacher distribution),
    ``matched_logits`` ``[N, M]`` at the ``matched_student`` ``[M]`` ids, ``ranked`` support ->
    (``[N, K]`` sorted probabilities, ``[N]`` tail mass)."""

    aligned_n: torch.Tensor
    matched_student: torch.Tensor
    matched_logits: torch.Tensor
    ranked: dict[str, tuple[torch.Tensor, torch.Tensor]]
    temperature: float


class CrossRows:
    """Flat views of :class:`~stillroom.teachers.signal.CrossTargets`."""

    def __init__(self, targets: CrossTargets) -> None:
        self.targets = targets
        self._aligned = targets.aligned_bt.reshape(-1)
        self._matched = targets.matched_logits_btm.flatten(0, 1)
        self._ranked = {s: (p.flatten(0, 1), t.reshape(-1)) for s, (p, t) in targets.ranked.items()}

    def take(self, rows: torch.Tensor | slice) -> CrossChunk:
        ranked = {s: (p[rows], t[rows]) for s, (p, t) in self._ranked.items()}
        return CrossChunk(self._aligned[rows], self.targets.matched_student, self._matched[rows], ranked,
                          self.targets.temperature)
