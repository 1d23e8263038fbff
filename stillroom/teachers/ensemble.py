"""Several teachers as one (``teacher.source: ensemble``).

Members are any sources with ``signal(batch) -> TeacherSignal`` (online, store,
remote, even another ensemble). In a VLM run every member reads the rows' images: an
online LLaVA gets the batch's ``pixel_values``, a remote member sends each row's image file
(:mod:`stillroom.teachers.remote_vlm`); ``route`` hands a member its rows' pixels. Two modes:

* ``average`` (MEAL V2): the target is the weighted mean of the members'
  *probabilities*, ``p(v) = sum_m w_m p_m(v)`` (weights normalised to sum 1,
  equal by default), returned as a dense signal whose "logits" are
  ``log p`` ``[B, T, V]`` fp32, computed as a running ``logsumexp`` of
  ``log w_m + log_softmax(member)`` (two ``[B, T, V]`` buffers whatever the
  number of members). Members are mixed at temperature 1; a loss temperature
  ``T`` then tempers the mixture (``softmax(log p / T)`` is proportional to
  ``p^(1/T)``), not each member. Top-k members (stores, remote) are expanded to
  dense log-probs first by spreading each position's tail mass evenly over the
  ``V - K`` tokens outside its top k (:func:`densify_topk`). This is exact when
  K = V; otherwise the mixture's top-k tokens are exact for members that list
  them and approximate (a flat tail) for members that do not. Top-k members
  must be at temperature 1 (log-probs cannot be re-tempered). Hidden states are
  dropped (averaging hidden states of different models has no meaning).
* ``route``: each example is answered by one member, chosen per row by
  ``route_field``: ``"domain"`` (default) reads ``batch.domains[b]`` (the
  ``domain`` label of the example's data source), ``"uid"`` reads
  ``batch.uids[b]``. The key is mapped to a member index by ``routes`` (e.g.
  ``{"code": 1}``), else by the member name in ``names``, else an integer
  string (``"0"``, ``"1"``) is the index itself; anything else is an error that
  names the row. Each member runs only on its rows. If all members answered
  with dense logits (or all with top-k of the same K and temperature) the rows
  are assembled in that form; a mix is expanded to dense log-probs (exact for
  dense members: ``log_softmax`` commutes with a loss temperature). Hidden
  states are kept when every answering member gives the same layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import torch

from stillroom.data.batch import Batch
from stillroom.teachers.signal import CrossTargets, Fingerprint, TeacherSignal


class SignalSource(Protocol):
    def signal(self, batch: Batch) -> TeacherSignal: ...


def densify_topk(signal: TeacherSignal, vocab_size: int) -> torch.Tensor:
    """``[B, T, V]`` fp32 log-probs of a top-k signal: the k listed values, and
    ``tail - log(V - K)`` for every other token (the tail spread evenly; ``-inf`` when K = V)."""
    ids, lp, tail = signal.topk_ids_btk.long(), signal.topk_logprobs_btk.float(), signal.tail_logmass_bt.float()
    k = ids.shape[-1]
    if int(ids.max()) >= vocab_size:
        raise ValueError(f"top-k ids reach {int(ids.max())} but the vocabulary has {vocab_size} tokens")
    rest = tail - math.log(vocab_size - k) if vocab_size > k else torch.full_like(tail, -math.inf)
    out = rest.unsqueeze(-1).expand(*ids.shape[:-1], vocab_size).clone()
    return out.scatter_(-1, ids, lp)


def log_probs(signal: TeacherSignal, vocab_size: int) -> torch.Tensor:
    """``[B, T, V]`` fp32 log-probs at temperature 1 of a dense or top-k signal."""
    if signal.is_dense:
        return torch.log_softmax(signal.logits_btv[..., :vocab_size].float(), dim=-1)
    if signal.is_topk:
        if abs(signal.temperature - 1.0) > 1e-6:
            raise ValueError(f"an ensemble member gives top-k log-probs at temperature {signal.temperature}; "
                             "members are mixed at temperature 1 (rebuild the store at loss_temperature 1)")
        return densify_topk(signal, vocab_size)
    raise ValueError("an ensemble member returned only hidden states; ensembles need logits or top-k")


class EnsembleTeacher:
    """See the module docstring. ``vocab_size``: the shared vocabulary (needed for top-k members;
    taken from member fingerprints or ``vocab_size`` attributes when not given)."""

    def __init__(self, members: Sequence[SignalSource], mode: Literal["average", "route"] = "average",
                 weights: Sequence[float] | None = None, route_field: str | None = None, *,
                 routes: Mapping[str, int] | None = None, names: Sequence[str] | None = None,
                 vocab_size: int | None = None) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member (teacher.ensemble)")
        if mode not in ("average", "route"):
            raise ValueError(f"ensemble mode {mode!r}; valid: average, route")
        self.members, self.mode = list(members), mode
        n = len(self.members)
        if weights is None:
            weights = [1.0] * n
        if len(weights) != n or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"ensemble weights {list(weights)} must be {n} non-negative numbers with a positive sum")
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.route_field = route_field or "domain"
        if mode == "route" and self.route_field not in ("domain", "uid"):
            raise ValueError(f"teacher.route_field={self.route_field!r}; the batch carries `domain` (the data "
                             "source's domain label) and `uid`: use one of those")
        self.routes = dict(routes or {})
        for key, idx in self.routes.items():
            if not 0 <= idx < n:
                raise ValueError(f"route {key!r} -> member {idx}, but the ensemble has {n} members")
        self.names = list(names) if names is not None else [f"member{i}" for i in range(n)]
        self.fingerprint = self._fingerprint()
        self.vocab_size = vocab_size or (self.fingerprint.vocab_size if self.fingerprint else None) or next(
            (getattr(m, "vocab_size") for m in self.members if getattr(m, "vocab_size", None)), None)

    def close(self) -> None:
        """Close the members that hold resources (remote members: HTTP sessions, the resume cache's lock)."""
        for member in self.members:
            close = getattr(member, "close", None)
            if close is not None:
                close()

    def _fingerprint(self) -> Fingerprint | None:
        fps = [getattr(m, "fingerprint", None) for m in self.members]
        known = [(i, f) for i, f in enumerate(fps) if f is not None]
        if not known:
            return None
        for i, f in known[1:]:
            diff = known[0][1].mismatch(f)
            if diff:
                raise ValueError(f"ensemble members {self.names[known[0][0]]} and {self.names[i]} differ in "
                                 f"{', '.join(diff)}; logit ensembles need one shared tokenizer")
        first = known[0][1]
        label = f"ensemble[{self.mode}](" + "|".join(f.teacher if f else "?" for f in fps) + ")"
        return Fingerprint(teacher=label, tokenizer_hash=first.tokenizer_hash, vocab_size=first.vocab_size)

    def _vocab(self, signals: list[TeacherSignal]) -> int:
        if self.vocab_size:
            return self.vocab_size
        dense = [s.logits_btv.shape[-1] for s in signals if s.is_dense]
        if dense:
            return min(dense)
        raise ValueError("an ensemble of top-k members needs vocab_size (pass EnsembleTeacher(..., vocab_size=V))")

    def signal(self, batch: Batch) -> TeacherSignal:
        return self._average(batch) if self.mode == "average" else self._route(batch)

    def _average(self, batch: Batch) -> TeacherSignal:
        acc = None
        vocab = self.vocab_size
        crosses = []
        for member, w in zip(self.members, self.weights):
            if w == 0:
                continue
            sig = member.signal(batch)
            if sig.cross is not None:
                crosses.append((sig.cross, w))
                continue
            vocab = vocab or self._vocab([sig])
            term = log_probs(sig, vocab) + math.log(w)
            acc = term if acc is None else torch.logaddexp(acc, term.to(acc.device))
        if crosses:
            if acc is not None:
                raise ValueError("an ensemble mixes members with the student's tokenizer and members with another "
                                 "one; in a cross-tokenizer run every member reads the student's text in the "
                                 "teacher's tokens")
            return TeacherSignal(cross=average_cross(crosses), fingerprint=self.fingerprint)
        assert acc is not None
        return TeacherSignal(logits_btv=acc, fingerprint=self.fingerprint)

    def member_of(self, batch: Batch, b: int) -> int:
        """Member index for row ``b`` (see the module docstring)."""
        if self.route_field == "domain":
            key = batch.domains[b] if b < len(batch.domains) else None
        else:
            key = batch.uids[b]
        if key in self.routes:
            return self.routes[key]
        if key in self.names:
            return self.names.index(key)
        if isinstance(key, str) and key.strip().isdigit() and int(key) < len(self.members):
            return int(key)
        raise ValueError(
            f"ensemble route: row {b} (uid {batch.uids[b]}) has {self.route_field} {key!r}, which names no member; "
            f"set data.sources[].domain to a member index 0..{len(self.members) - 1} or one of {self.names}, "
            "or pass routes={key: index}"
        )

    def _route(self, batch: Batch) -> TeacherSignal:
        bsz = batch.input_ids.shape[0]
        groups: dict[int, list[int]] = {}
        for b in range(bsz):
            groups.setdefault(self.member_of(batch, b), []).append(b)
        parts = [(rows, self.members[m].signal(batch.select(rows))) for m, rows in sorted(groups.items())]
        sigs = [s for _, s in parts]
        if any(s.cross is not None for s in sigs):
            return TeacherSignal(cross=route_cross([(rows, s.cross) for rows, s in parts], bsz),
                                 fingerprint=self.fingerprint)
        all_dense = all(s.is_dense for s in sigs)
        k_temps = {(s.topk_ids_btk.shape[-1], s.temperature) for s in sigs if s.is_topk}
        all_topk = all(s.is_topk for s in sigs) and len(k_temps) == 1
        hidden_layers = [sorted(s.hidden_states) for s in sigs]
        keep_hidden = bool(hidden_layers[0]) and all(h == hidden_layers[0] for h in hidden_layers)

        def assemble(get) -> torch.Tensor:
            values = [get(s) for s in sigs]
            out = values[0].new_zeros((bsz, *values[0].shape[1:]))
            for (rows, _), v in zip(parts, values):
                out[torch.tensor(rows, device=out.device)] = v.to(out.device, out.dtype)
            return out

        hidden = {layer: assemble(lambda s, l=layer: s.hidden_states[l]) for layer in hidden_layers[0]} \
            if keep_hidden else {}
        if all_dense:
            vocab = min(s.logits_btv.shape[-1] for s in sigs)
            return TeacherSignal(logits_btv=assemble(lambda s: s.logits_btv[..., :vocab]), hidden_states=hidden,
                                 fingerprint=self.fingerprint)
        if all_topk:
            return TeacherSignal(topk_ids_btk=assemble(lambda s: s.topk_ids_btk),
                                 topk_logprobs_btk=assemble(lambda s: s.topk_logprobs_btk),
                                 tail_logmass_bt=assemble(lambda s: s.tail_logmass_bt),
                                 temperature=sigs[0].temperature, hidden_states=hidden, fingerprint=self.fingerprint)
        vocab = self._vocab(sigs)
        return TeacherSignal(logits_btv=assemble(lambda s: log_probs(s, vocab)), hidden_states=hidden,
                             fingerprint=self.fingerprint)


def average_cross(members: list[tuple[CrossTargets, float]]) -> CrossTargets:
    """The weighted mixture of cross-tokenizer teachers of one teacher tokenizer (so one matched vocabulary),
    at temperature 1 like every ensemble: matched "logits" ``log sum_m w_m softmax(matched_m)`` ``[B, T, M]``;
    a position is aligned where every member aligns it. Ranked probabilities (``uld``) do not mix (the ranks of a
    mixture are not the mixture of ranks): refused in the config, and here."""
    first = members[0][0]
    if any(c.ranked for c, _ in members):
        raise ValueError("loss term 'uld' compares ranked probabilities, which an averaged ensemble cannot give; "
                         "use teacher.ensemble_mode: route, or a divergence on the matched tokens")
    if any(not torch.equal(c.matched_student.cpu(), first.matched_student.cpu()) for c, _ in members[1:]):
        raise ValueError("ensemble members match different student tokens: every member of a cross-tokenizer "
                         "ensemble must share one teacher tokenizer")
    aligned, acc = first.aligned_bt, None
    for cross, w in members:
        aligned = aligned & cross.aligned_bt.to(aligned.device)
        term = torch.log_softmax(cross.matched_logits_btm.float(), dim=-1).to(first.matched_logits_btm.device)
        term = term + math.log(w)
        acc = term if acc is None else torch.logaddexp(acc, term)
    return CrossTargets(aligned_bt=aligned, matched_student=first.matched_student, matched_logits_btm=acc,
                        temperature=1.0)


def route_cross(parts: list[tuple[list[int], CrossTargets]], bsz: int) -> CrossTargets:
    """Rows ``parts[i][0]`` of the batch from member answer ``parts[i][1]`` (computed on those rows only)."""
    first = parts[0][1]
    if len({(c.temperature, tuple(sorted(c.ranked))) for _, c in parts}) > 1:
        raise ValueError("routed cross-tokenizer members answered with different temperatures or ranked supports")

    def assemble(get) -> torch.Tensor:
        values = [get(c) for _, c in parts]
        width = max(v.shape[-1] for v in values)
        out = None
        for (rows, _), v in zip(parts, values):
            if v.dim() == 3 and v.shape[-1] < width:  # ranked K differs (a top-k member): its lower ranks are 0
                v = torch.nn.functional.pad(v, (0, width - v.shape[-1]))
            if out is None:
                out = v.new_zeros((bsz, *v.shape[1:]))
            out[torch.tensor(rows, device=out.device)] = v.to(out.device, out.dtype)
        return out

    ranked = {s: (assemble(lambda c, s=s: c.ranked[s][0]), assemble(lambda c, s=s: c.ranked[s][1]))
              for s in first.ranked}
    return CrossTargets(aligned_bt=assemble(lambda c: c.aligned_bt), matched_student=first.matched_student,
                        matched_logits_btm=assemble(lambda c: c.matched_logits_btm), ranked=ranked,
                        temperature=first.temperature)


def ensemble_from_run(teacher_cfg, build_member, *, vocab_size: int | None = None) -> EnsembleTeacher:
    """The ensemble of a run (``teacher.source: ensemble``) from its ``TeacherConfig``.

    ``build_member(member_cfg: TeacherConfig, index: int) -> source`` builds each member (the
    factory's own online/store/remote logic; a member may itself be an ensemble). Members are named
    ``member0``, ``member1``, ... (route with ``data.sources[].domain: "0"``/``"1"`` or those names).
    """
    if not teacher_cfg.ensemble:
        raise ValueError("teacher.source=ensemble needs teacher.ensemble: a list of member teacher configs")
    members = [build_member(m, i) for i, m in enumerate(teacher_cfg.ensemble)]
    return EnsembleTeacher(members, mode=teacher_cfg.ensemble_mode, route_field=teacher_cfg.route_field,
                           vocab_size=vocab_size)
