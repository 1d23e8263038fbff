"""On-policy distillation (GKD, Agarwal et al. 2024; DistillSpec, Zhou et al. 2024).

``method: onpolicy`` keeps the training loop as it is and only changes where each
micro-batch's sequences come from. For micro-batch ``j`` of optimizer step ``s`` one
source is drawn with probabilities proportional to ``onpolicy.*_weight``:

* ``fixed``: the batch the sampler drew, unchanged (its own targets, e.g. the
  completion tokens of prompt/completion or chat data);
* ``student``: the student samples a continuation of each row's prompt; the
  sequence becomes ``prompt + continuation`` and **only the continuation tokens
  are targets** (GKD's on-policy data, DistillSpec's "student-generated");
* ``teacher``: the same with the loaded teacher model sampling (DistillSpec's
  "teacher-generated", produced on the fly).

The run's teacher source (``teacher.signal(batch)``: online, remote, ...) then scores
the batch as usual and every registered loss term applies, so a divergence on a
generated batch is computed over the generated tokens only.

The prompt of a row is every token before its first target token (prompt/completion
and chat data). Plain text has no prompt (all tokens are targets), so its first
``text_prompt_tokens`` tokens are used. Continuations are capped at
``max_new_tokens`` and at ``data.seq_len - len(prompt)``; with ``stop_at_eos`` a
continuation ends at EOS, which stays a target (the student learns to stop).

Determinism and resume: the source draw uses a local ``torch.Generator`` seeded from
``(run seed, step, micro-batch index)`` (identical on every process) and the sampling
one seeded from ``(run seed, step, micro-batch index, rank)``. Nothing depends on
global RNG state or on earlier steps, so a run resumed from a checkpoint at step ``s``
regenerates exactly the sequences the uninterrupted run generated from step ``s`` on.
Generation runs with the KV cache, all prompts of a micro-batch in one left-padded
batch (:func:`stillroom.generate.sample_continuations`), with the model in eval mode.

With ``onpolicy.rollout: server`` the student's continuations come from an OpenAI-compatible server instead
(:class:`stillroom.methods.rollout_server.ServerRollout`: per-row seeds derived the same way, the student's
weights synced to the server by folder reload); teacher-generated micro-batches stay in process.

Bookkeeping: the loop times this as ``generate_s`` in ``metrics.jsonl``; each
micro-batch's source, token counts and seconds go to ``<run>/onpolicy.jsonl``; a
summary line is logged about every 30 s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stillroom.config.methods import OnPolicyConfig
from stillroom.data.batch import Batch, Example, batch_prompts, collate
from stillroom.data.seeds import derive_seed
from stillroom.generate.sampling import eos_token_ids, sample_continuations
from stillroom.methods.base import Method, MethodContext, MethodPlan

if TYPE_CHECKING:
    from stillroom.methods.rollout_server import ServerRollout

SOURCES = ("fixed", "student", "teacher")
LOG_EVERY_S = 30.0


def choose_source(cfg: OnPolicyConfig, seed: int, step: int, micro_index: int) -> str:
    """The source of micro-batch ``micro_index`` of step ``step``: one of :data:`SOURCES`.

    Drawn with probability ``weight / sum(weights)`` from a generator seeded by
    ``(seed, step, micro_index)`` only, so every process (and a resumed run) agrees.
    """
    weights = [cfg.fixed_weight, cfg.student_weight, cfg.teacher_weight]
    total = sum(weights)
    if total <= 0:
        raise ValueError("onpolicy: all source weights are 0")
    gen = torch.Generator().manual_seed(derive_seed("onpolicy-source", seed, step, micro_index))
    u = float(torch.rand((), generator=gen)) * total
    acc = 0.0
    for name, w in zip(SOURCES, weights):
        acc += w
        if w > 0 and u < acc:
            return name
    return next(n for n, w in reversed(list(zip(SOURCES, weights))) if w > 0)  # u == total (rounding)


def generated_batch(
    prompts: Sequence[list[int]],
    continuations: Sequence[list[int]],
    *,
    pad_id: int,
    uids: Sequence[str],
    domains: Sequence[str | None] | None = None,
    n_bytes: Sequence[int] | None = None,
) -> Batch:
    """The batch of ``prompt + continuation`` rows where only continuation tokens are targets."""
    if len(prompts) != len(continuations) or len(prompts) != len(uids):
        raise ValueError(f"{len(prompts)} prompts, {len(continuations)} continuations, {len(uids)} uids")
    examples = []
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        if not prompt:
            raise ValueError(f"onpolicy: empty prompt for {uids[i]}")
        examples.append(Example(
            input_ids=list(prompt) + list(cont), target=[False] * len(prompt) + [True] * len(cont), uid=uids[i],
            domain=domains[i] if domains else None, n_bytes=int(n_bytes[i]) if n_bytes else 0,
        ))
    return collate(examples, pad_id)


class OnPolicySource:
    """``prepare_batches(micro_batches, step)`` for the training loop (see the module docstring).

    ``stats`` holds running totals: micro-batches per source, generated tokens and
    generation seconds per source.
    """

    def __init__(
        self,
        cfg: OnPolicyConfig,
        *,
        seed: int,
        student: torch.nn.Module,
        teacher_model: torch.nn.Module | None,
        tokenizer: Any,
        pad_id: int,
        seq_len: int,
        rank: int = 0,
        log_path: Path | None = None,
        log: Callable[[str], None] | None = None,
        server: ServerRollout | None = None,
    ) -> None:
        if cfg.teacher_weight > 0 and teacher_model is None:
            raise ValueError("onpolicy.teacher_weight > 0 needs the teacher model loaded in this process")
        self.cfg = cfg
        self.seed = seed
        self.student = student
        self.teacher_model = teacher_model
        self.tokenizer = tokenizer
        self.pad_id = int(pad_id)
        self.seq_len = int(seq_len)
        self.rank = int(rank)
        self.eos = eos_token_ids(tokenizer, student, teacher_model) if cfg.stop_at_eos else None
        self.log_path = log_path
        self.server = server
        """Samples the student's continuations when set (onpolicy.rollout=server)."""
        self.log = log
        self._log_started = False
        self._last_log = time.perf_counter()
        self.stats: dict[str, float] = {f"batches/{s}": 0 for s in SOURCES}
        self.stats.update({f"generated_tokens/{s}": 0 for s in SOURCES[1:]})
        self.stats.update({f"generate_s/{s}": 0.0 for s in SOURCES[1:]})

    # ------------------------------------------------------------------ per micro-batch
    def generate(self, batch: Batch, source: str, step: int, micro_index: int) -> Batch:
        """Replace ``batch`` by ``source``'s continuations of its prompts (source: student or teacher)."""
        model = self.student if source == "student" else self.teacher_model
        prompts = batch_prompts(batch, self.cfg.text_prompt_tokens)
        budgets = [min(self.cfg.max_new_tokens, self.seq_len - len(p)) for p in prompts]
        if min(budgets) < 1:
            i = budgets.index(min(budgets))
            raise ValueError(f"onpolicy: the prompt of {batch.uids[i]} fills data.seq_len={self.seq_len}; "
                             "nothing can be generated (raise data.seq_len or shorten the prompts)")
        if source == "student" and self.server is not None:
            conts = self.server.sample(prompts, budgets, step=step, micro_index=micro_index, stop_ids=self.eos,
                                       sampling_temperature=self.cfg.sampling_temperature, top_p=self.cfg.top_p)
        else:
            gen = torch.Generator().manual_seed(derive_seed("onpolicy-sample", self.seed, step, micro_index, self.rank))
            conts = sample_continuations(
                model, self.tokenizer, prompts, max_new_tokens=max(budgets),
                sampling_temperature=self.cfg.sampling_temperature, top_p=self.cfg.top_p,
                eos_token_id=self.eos, pad_token_id=self.pad_id, generator=gen,
            )
        conts = [c[:n] for c, n in zip(conts, budgets)]
        n_bytes = [len(self.tokenizer.decode(c, skip_special_tokens=True).encode("utf-8")) for c in conts]
        uids = [f"{u}|{source}@{step}.{micro_index}" for u in batch.uids]
        return generated_batch(prompts, conts, pad_id=self.pad_id, uids=uids, domains=batch.domains, n_bytes=n_bytes)

    def __call__(self, micro: list[Batch], step: int) -> list[Batch]:
        out, records = [], []
        for j, batch in enumerate(micro):
            source = choose_source(self.cfg, self.seed, step, j)
            self.stats[f"batches/{source}"] += 1
            rec = {"step": step + 1, "micro": j, "source": source, "rows": int(batch.input_ids.shape[0])}
            if source == "fixed":
                out.append(batch)
                rec["target_tokens"] = batch.num_targets
            else:
                t0 = time.perf_counter()
                new = self.generate(batch, source, step, j)
                dt = time.perf_counter() - t0
                out.append(new)
                self.stats[f"generated_tokens/{source}"] += new.num_targets
                self.stats[f"generate_s/{source}"] += dt
                rec.update(target_tokens=new.num_targets, generate_s=round(dt, 4),
                           prompt_tokens=int(new.attention_mask.sum()) - new.num_targets)
                if source == "student" and self.server is not None:
                    rec["weights"] = (self.server.weights or "")[:12]  # the student weights the server sampled with
            records.append(rec)
        self._write(records, step)
        self._maybe_log(step)
        return out

    # ------------------------------------------------------------------ bookkeeping
    def _write(self, records: list[dict], step: int) -> None:
        if self.log_path is None:
            return
        if not self._log_started:  # a resumed run: drop what the killed run logged after its checkpoint
            self._log_started = True
            if self.log_path.exists():
                kept = [line for line in self.log_path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= step]
                self.log_path.write_text("".join(k + "\n" for k in kept))
        with self.log_path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))

    def summary(self) -> str:
        s = self.stats
        batches = ", ".join(f"{k.split('/')[1]} {int(v)}" for k, v in s.items() if k.startswith("batches/"))
        gen = sum(v for k, v in s.items() if k.startswith("generated_tokens/"))
        secs = sum(v for k, v in s.items() if k.startswith("generate_s/"))
        return f"onpolicy: micro-batches {batches}; {int(gen)} generated tokens in {secs:.1f} s"

    def _maybe_log(self, step: int) -> None:
        now = time.perf_counter()
        if self.log is not None and now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            self.log(f"step {step + 1}: {self.summary()}")


def build(ctx: MethodContext) -> MethodPlan:
    """``method: onpolicy``: each micro-batch's sequences come from the source drawn for it."""
    oc, cfg = ctx.cfg.onpolicy, ctx.cfg
    if "ce" in [t.name for t in cfg.loss.terms] and oc.student_weight > 0:
        ctx.log("onpolicy: a 'ce' term on student-generated batches fits the student to its own samples; "
                "it is usually meant for fixed data only")
    ctx.log(f"onpolicy: sources fixed/student/teacher weights {oc.fixed_weight}/{oc.student_weight}/"
            f"{oc.teacher_weight}, sampling_temperature={oc.sampling_temperature}, top_p={oc.top_p}, "
            f"max_new_tokens={oc.max_new_tokens}")
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    main = ctx.topology.is_main
    server = None
    if oc.rollout == "server":
        from stillroom.methods.rollout_server import ServerRollout  # httpx: the serve extra

        if ctx.topology.world_size > 1:
            raise ValueError("onpolicy.rollout=server runs in one process (every process would sync the server's "
                             "weights); run without torchrun or use onpolicy.rollout=local")
        where = oc.server.weights_dir
        weights_dir = Path(where).expanduser() if where else ctx.run_dir / "rollout_weights"
        server = ServerRollout(oc.server, student=ctx.model, tokenizer=ctx.tokenizer, weights_dir=weights_dir,
                               lora=cfg.student.trainable == "lora", seed=cfg.seed, log=ctx.log)
        server.check()
    source = OnPolicySource(
        oc, seed=cfg.seed, student=ctx.model, teacher_model=ctx.teacher_model, tokenizer=ctx.tokenizer,
        pad_id=ctx.tokenizer.pad_token_id, seq_len=cfg.data.seq_len, rank=ctx.topology.rank,
        log_path=ctx.run_dir / "onpolicy.jsonl" if main else None, log=ctx.log if main else None, server=server,
    )
    return MethodPlan(replace_batches=source)


METHOD = Method("onpolicy", build=build)
