"""DDK: domain-knowledge-guided distillation (Liu et al., NeurIPS 2024; spec section 7).

``method: ddk`` keeps the loss terms of the recipe (the paper: ``ce`` + 0.2 ``forward_kl``
at ``loss_temperature`` 1) and changes only *which domains* the training sequences come
from. Domains are the ``domain`` labels of ``data.sources`` (``Example.domain``).

Domain discrepancy factor. For every domain ``i`` with steering sequences ``V_i`` (the
records the data pipeline sets apart for steering, ``ddk.steer_fraction`` of them by the
record hash, filtered by domain, at most ``ddk.val_max_per_domain``; never the held-out
split that the report evaluates, and never trained on)::

    l_S[i] = exp(mean CE of the student on V_i)      (token mean over target tokens)
    l_T[i] = exp(mean CE of the teacher on V_i)      (computed once: the teacher is frozen)
    ratio[i] = l_S[i] / l_T[i]
    r_0 = softmax(ratio)

Every ``K = ddk.interval_steps`` optimizer steps (at the start of steps K, 2K, ...) the
student's ``l_S`` is re-estimated and, with ``ddk.smoothing_mode``:

* ``smooth`` (the paper): ``psi = r_t * exp(ratio)``, ``r_{t+1} = a * psi / sum(psi) + (1 - a) / N``
  with ``a = ddk.smoothing`` (0.5). ``a = 1`` keeps the multiplicative history without the
  uniform floor (weights can then collapse onto one domain);
* ``none`` (the paper's "without factor smoothing" ablation): ``r_{t+1} = softmax(ratio)``.

Sampling (:class:`DomainSampler`). Every sequence of a global micro-batch draws its domain
from ``r`` (a generator seeded by ``(run seed, step, micro-batch index)``), then takes the
next example of that domain's own shuffled order; a domain's order is reshuffled (seeded
by ``(run seed, domain, pass)``) when it is exhausted. Rank ``k`` of ``W`` processes takes
the slice ``[k * B, (k + 1) * B)`` of the global micro-batch, like
:class:`stillroom.data.ExampleSampler`.

Where the update happens: the loop draws a step's indices *before* anything else of the
step, so the sampler itself re-estimates ``r`` on its first draw of step ``s`` when
``s % K == 0`` (``r_0`` on its first draw of step 0). The student then holds exactly the
parameters after ``s`` optimizer steps, in the uninterrupted run and in a run resumed
from the checkpoint of step ``s`` alike. The sampler's ``state_dict`` (weights, latest
estimates, draw counter, per-domain positions; JSON-able) is checkpointed by the loop,
so a resumed run draws exactly the same sequences.

Per-step metrics (``log_state``): ``ddk/r/<domain>`` (weights used by the step),
``ddk/ratio/<domain>`` (latest ``l_S / l_T``), ``ddk/ppl_student/<domain>``,
``ddk/ppl_teacher/<domain>``, ``ddk/max_ratio``, ``ddk/mean_ratio`` and ``ddk/updated``
(1 on steps that re-estimated). :func:`write_ddk_report` turns ``metrics.jsonl`` into
``ddk_domains.png`` and ``ddk.md``.

Several processes: every process evaluates the whole validation sets on its own copy of
the (identical) student, so all agree on ``r`` without communication.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence

import torch

from stillroom.data.batch import Example, collate
from stillroom.data.seeds import derive_seed
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.methods.ddk_report import PREFIX, total_variation, write_ddk_report


# ---------------------------------------------------------------------------- the factor math
def softmax(values: Sequence[float]) -> list[float]:
    """softmax in float64 (max-subtracted; ``-inf`` entries get 0)."""
    top = max(values)
    if not math.isfinite(top):
        raise ValueError(f"ddk: cannot normalise {list(values)} (no finite entry)")
    exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def initial_weights(ratios: Sequence[float]) -> list[float]:
    """``r_0[i] = exp(ratio[i]) / sum_j exp(ratio[j])`` with ``ratio = l_S / l_T``."""
    return softmax(ratios)


def update_weights(r: Sequence[float], ratios: Sequence[float], *, smoothing: float, mode: str = "smooth") -> list[float]:
    """The next domain weights from the current ``r`` and the new ratios ``l_S / l_T``.

    ``smooth``: ``psi = r * exp(ratio)``; ``r' = smoothing * psi / sum(psi) + (1 - smoothing) / N``
    (computed in log space: ``log psi = log r + ratio``, so large ratios cannot overflow).
    ``none``: ``r' = softmax(ratio)`` (no history, no floor).
    """
    if len(r) != len(ratios):
        raise ValueError(f"ddk: {len(r)} weights but {len(ratios)} ratios")
    if mode == "none":
        return softmax(ratios)
    if mode != "smooth":
        raise ValueError(f"ddk.smoothing_mode must be 'smooth' or 'none', got {mode!r}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"ddk.smoothing must be in [0, 1], got {smoothing}")
    n = len(r)
    log_psi = [(math.log(w) if w > 0 else -math.inf) + x for w, x in zip(r, ratios)]
    q = softmax(log_psi)
    return [smoothing * qi + (1.0 - smoothing) / n for qi in q]


# ---------------------------------------------------------------------------- validation sets
def group_by_domain(examples: Sequence[Example], what: str) -> dict[str, list[int]]:
    """Indices of ``examples`` per domain label (sorted by label); refuses unlabelled examples."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        if ex.domain is None:
            raise ValueError(f"method=ddk: {what} example {ex.uid} has no domain; give every entry of data.sources "
                             "a `domain:` label (e.g. data.sources=[{path: a.jsonl, domain: code}, ...])")
        groups.setdefault(ex.domain, []).append(i)
    return dict(sorted(groups.items()))


def domain_sets(
    train: Sequence[Example], steer: Sequence[Example], cap: int
) -> tuple[dict[str, list[int]], dict[str, list[Example]]]:
    """Training indices and steering examples (at most ``cap``) per domain, checked for DDK."""
    train_groups = group_by_domain(train, "training")
    held_groups = group_by_domain(steer, "steering")
    if len(train_groups) < 2:
        raise ValueError(f"method=ddk needs training data from at least 2 domains, found {list(train_groups) or 'none'}; "
                         "label data.sources with different `domain:` values")
    missing = [d for d in train_groups if d not in held_groups]
    if missing:
        raise ValueError(f"method=ddk: domain(s) {missing} have no steering sequences to estimate their perplexity; "
                         "raise ddk.steer_fraction or add data for them")
    extra = [d for d in held_groups if d not in train_groups]
    if extra:
        raise ValueError(f"method=ddk: domain(s) {extra} have steering but no training sequences; "
                         "add training data for them or lower ddk.steer_fraction")
    val = {d: [steer[i] for i in idx[:cap]] for d, idx in held_groups.items()}
    return train_groups, val


def domain_perplexities(
    model: torch.nn.Module, batches: dict[str, list], *, precision: str, vocab_size: int
) -> dict[str, float]:
    """``exp(mean CE)`` of ``model`` per domain over the target tokens of its batches (no grad, eval mode)."""
    from stillroom.eval import evaluate_lm

    out = {}
    for d, bs in batches.items():
        ce = evaluate_lm(model, bs, None, precision=precision, vocab_size=vocab_size)["heldout_ce"]
        out[d] = math.exp(min(ce, 700.0))
    return out


# ---------------------------------------------------------------------------- the sampler
class DomainSampler:
    """Draws this rank's micro-batches by domain weights ``r`` that it re-estimates every K steps.

    ``indices_by_domain``: training indices per domain (keys in a fixed order);
    ``calls_per_step``: micro-batches drawn per optimizer step (``train.grad_accum``);
    ``estimate()``: ``{domain: l_S / l_T}`` for the student as it is now (also returns the
    perplexities in ``self.last_estimate``). See the module docstring for the rules.
    """

    def __init__(
        self, *, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
        indices_by_domain: dict[str, list[int]], calls_per_step: int, interval_steps: int,
        smoothing: float, smoothing_mode: str, estimate: Callable[[], dict[str, dict[str, float]]],
        on_update: Callable[[int, dict], None] | None = None,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"DomainSampler: bad batch_size/rank/world_size {batch_size}/{rank}/{world_size}")
        counted = sum(len(v) for v in indices_by_domain.values())
        if counted != n:
            raise ValueError(f"DomainSampler: the domains hold {counted} examples but the loop samples from {n}")
        if any(not v for v in indices_by_domain.values()):
            raise ValueError("DomainSampler: a domain has no training examples")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.domains = list(indices_by_domain)
        self.indices = [list(indices_by_domain[d]) for d in self.domains]
        self.calls_per_step = calls_per_step
        self.interval_steps = interval_steps
        self.smoothing, self.smoothing_mode = smoothing, smoothing_mode
        self.estimate = estimate
        self.on_update = on_update
        # ---- resumable state
        self.calls = 0
        self.weights: list[float] | None = None
        self.updated_at = -1  # step of the latest estimate
        self.last: dict[str, dict[str, float]] = {}  # {"ratio": {d: x}, "ppl_student": ..., "ppl_teacher": ...}
        self.epochs = [0] * len(self.domains)
        self.positions = [0] * len(self.domains)
        self._orders: dict[int, list[int]] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def step(self) -> int:
        """The optimizer step of the next draw."""
        return self.calls // self.calls_per_step

    # ---- weights
    def _reestimate(self, step: int) -> None:
        est = self.estimate()
        ratios = [est["ratio"][d] for d in self.domains]
        if self.weights is None:
            self.weights = initial_weights(ratios)
        else:
            self.weights = update_weights(self.weights, ratios, smoothing=self.smoothing, mode=self.smoothing_mode)
        self.last = {k: {d: float(v[d]) for d in self.domains} for k, v in est.items()}
        self.updated_at = step
        if self.on_update is not None:
            self.on_update(step, self.snapshot())

    def snapshot(self) -> dict[str, float]:
        """The per-step metrics: weights, latest ratios and perplexities, whether this step re-estimated."""
        out: dict[str, float] = {}
        if self.weights is None:
            return out
        for d, w in zip(self.domains, self.weights):
            out[f"{PREFIX}/r/{d}"] = w
        for key, values in self.last.items():
            for d in self.domains:
                out[f"{PREFIX}/{key}/{d}"] = values[d]
        ratios = list(self.last.get("ratio", {}).values())
        if ratios:
            out[f"{PREFIX}/max_ratio"] = max(ratios)
            out[f"{PREFIX}/mean_ratio"] = sum(ratios) / len(ratios)
        out[f"{PREFIX}/updated"] = 1.0 if self.updated_at == max(0, (self.calls - 1) // self.calls_per_step) else 0.0
        return out

    # ---- per-domain orders
    def _order(self, i: int) -> list[int]:
        if i not in self._orders:
            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed("ddk-order", self.seed, self.domains[i], self.epochs[i]))
                perm = torch.randperm(len(self.indices[i]), generator=g).tolist()
                self._orders[i] = [self.indices[i][j] for j in perm]
            else:
                self._orders[i] = list(self.indices[i])
        return self._orders[i]

    def _take(self, i: int) -> int:
        if self.positions[i] >= len(self.indices[i]):  # domain exhausted: next pass, reshuffled
            self.epochs[i] += 1
            self.positions[i] = 0
            self._orders.pop(i, None)
        idx = self._order(i)[self.positions[i]]
        self.positions[i] += 1
        return idx

    def draw_domains(self, step: int, micro: int) -> list[int]:
        """Domain positions of the ``global_batch`` sequences of micro-batch ``micro`` of ``step``."""
        cum, acc = [], 0.0
        for w in self.weights:
            acc += w
            cum.append(acc)
        g = torch.Generator().manual_seed(derive_seed("ddk-domains", self.seed, step, micro))
        u = torch.rand(self.global_batch, generator=g, dtype=torch.float64).tolist()
        last = max(i for i, w in enumerate(self.weights) if w > 0)
        return [min(bisect_right(cum, x * acc), last) for x in u]

    def next_indices(self) -> list[int]:
        """This rank's next micro-batch (``batch_size`` indices into the training examples)."""
        step, micro = divmod(self.calls, self.calls_per_step)
        if micro == 0 and (self.weights is None or (step % self.interval_steps == 0 and self.updated_at != step)):
            self._reestimate(step)
        chosen = [self._take(i) for i in self.draw_domains(step, micro)]
        self.calls += 1
        lo = self.rank * self.batch_size
        return chosen[lo : lo + self.batch_size]

    # ---- checkpoint
    def state_dict(self) -> dict:
        return {
            "kind": "ddk", "calls": self.calls, "weights": self.weights, "updated_at": self.updated_at,
            "last": self.last, "epochs": list(self.epochs), "positions": list(self.positions),
            "domains": list(self.domains), "sizes": [len(v) for v in self.indices], "seed": self.seed,
            "shuffle": self.shuffle, "global_batch": self.global_batch, "calls_per_step": self.calls_per_step,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``; the domains, their sizes, seed, shuffle and batch layout must match."""
        if state.get("kind") != "ddk":
            raise ValueError("ddk: the checkpoint's sampler state is not a DDK sampler's (was it made by another "
                             "method?); resume with the method that wrote it or start a new run")
        mine = {"domains": list(self.domains), "sizes": [len(v) for v in self.indices], "seed": self.seed,
                "shuffle": self.shuffle, "global_batch": self.global_batch, "calls_per_step": self.calls_per_step}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"ddk: checkpoint has {key}={state.get(key)!r} but this run has {value!r}; "
                                 "resuming would draw different sequences")
        self.calls = int(state["calls"])
        self.weights = None if state["weights"] is None else [float(w) for w in state["weights"]]
        self.updated_at = int(state["updated_at"])
        self.last = {k: {d: float(x) for d, x in v.items()} for k, v in state["last"].items()}
        self.epochs = [int(e) for e in state["epochs"]]
        self.positions = [int(p) for p in state["positions"]]
        self._orders = {}


# ---------------------------------------------------------------------------- the method
def build(ctx: MethodContext) -> MethodPlan:
    """``method: ddk``: a :class:`DomainSampler` steered on the steer split, its metrics and its report."""
    cfg, dc = ctx.cfg, ctx.cfg.ddk
    if ctx.teacher_model is None:
        raise ValueError("method=ddk needs the teacher model in this process to measure its per-domain perplexity")
    names = [t.name for t in cfg.loss.terms]
    if not ctx.mix.needs_teacher:
        ctx.log(f"ddk: loss.terms {names} do not use the teacher (the paper's gamma=0 ablation); the teacher still "
                "sets the domain weights. The paper's loss: [{name: ce}, {name: forward_kl, weight: 0.2}]")
    elif sorted(names) != ["ce", "forward_kl"]:
        ctx.log(f"ddk: loss.terms are {names}; the paper uses ce + 0.2 * forward_kl")
    train_groups, val = domain_sets(ctx.data.train, ctx.data.steer, dc.val_max_per_domain)
    pad, bs = ctx.tokenizer.pad_token_id, cfg.eval.batch_size
    batches = {d: [collate(rows[i : i + bs], pad) for i in range(0, len(rows), bs)] for d, rows in val.items()}
    ppl_teacher = domain_perplexities(ctx.teacher_model, batches, precision=cfg.eval.precision,
                                      vocab_size=ctx.vocab_size)
    ctx.log("ddk: domains " + ", ".join(f"{d} ({len(train_groups[d])} train / {len(val[d])} steer, teacher ppl "
                                        f"{ppl_teacher[d]:.3f})" for d in train_groups)
            + f"; K={dc.interval_steps}, smoothing={dc.smoothing} ({dc.smoothing_mode})")

    def estimate() -> dict[str, dict[str, float]]:
        ppl_student = domain_perplexities(ctx.model, batches, precision=cfg.eval.precision, vocab_size=ctx.vocab_size)
        return {"ratio": {d: ppl_student[d] / ppl_teacher[d] for d in batches},
                "ppl_student": ppl_student, "ppl_teacher": dict(ppl_teacher)}

    def on_update(step: int, snap: dict) -> None:
        if ctx.topology.is_main:
            parts = ", ".join(f"{d}: ratio {snap[f'{PREFIX}/ratio/{d}']:.3f} r {snap[f'{PREFIX}/r/{d}']:.3f}"
                              for d in train_groups)
            ctx.log(f"ddk step {step}: {parts}")

    holder: dict[str, DomainSampler] = {}

    def sampler(*, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                group_size: int = 1) -> DomainSampler:
        holder["sampler"] = DomainSampler(
            n=n, batch_size=batch_size, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size,
            indices_by_domain=train_groups, calls_per_step=cfg.train.grad_accum, interval_steps=dc.interval_steps,
            smoothing=dc.smoothing, smoothing_mode=dc.smoothing_mode, estimate=estimate, on_update=on_update,
        )
        return holder["sampler"]

    def metrics() -> dict[str, float]:
        return holder["sampler"].snapshot() if "sampler" in holder else {}

    return MethodPlan(sampler=sampler, metrics=metrics, report=write_ddk_report)


METHOD = Method("ddk", steer_fraction=lambda cfg: cfg.ddk.steer_fraction, build=build)
