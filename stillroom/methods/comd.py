"""CoMD: competitive multimodal distillation (Li et al. 2023, arXiv 2311.08213; spec 14.2, docs/methods/comd.md).

``method: comd`` trains the student in rounds of ``train.steps / comd.rounds`` steps, inside the one loop:

1. **instruction tuning**: every micro-batch is drawn from the pool of (instruction, teacher answer) sequences
   (``replace_batches``; the rows the loop drew from the data set are set aside), and the recipe's loss terms
   (forward KL to the teacher on the answer tokens, CE, ...) apply as usual;
2. **assessment** (before each later round): the student answers ``probe_per_family`` fresh instructions per
   family greedily, the teacher answers them too, and the judge (exact match, ``check_answer``) marks the
   student's failures;
3. **augmentation**: ``augment_per_round`` fresh instructions of the failed probes' families, one level higher
   (capped at 3), are answered by the teacher (greedy) and join the pool.

The first pool holds ``initial_per_family`` instructions per family. ``one_shot`` is the baseline arm: one round
on a pool of ``comd.budget`` instructions drawn at step 0 uniformly over families and levels, as many teacher
answers as the rounds put in the pool. Instructions come from the scene-question generator
(:mod:`stillroom.domains.vl.vqa`) seeded by (run seed, round); no instruction equals a held-out question.

State and resume: the pool (token ids included), the round log and the counts are the sampler's state
(:class:`ComdSampler`), so they are checkpointed with the run; micro-batch draws are seeded by (seed, step,
micro-batch) alone. A run resumed at a round boundary redoes that round's assessment from the restored weights
(greedy, so identically). Logged per round (``comd.jsonl``-style lines in the log and ``comd.json``): the
student's failure rate per family, the pool size, teacher answers used (pool) and judge answers (probes). The
report adds the exact-match accuracy of student and teacher per family and level on held-out questions.

On a VLM (a ``vlm`` run; recipe ``comd_vlm``) every instruction is a new scene rendered to
``<run>/comd_images/<round>-<kind>-<k>.png`` (pool, probe and held-out scenes), asked with its image: pool items
encode as the data pipeline's VQA records (image tokens after BOS, the pixels read with the pipeline's settings)
and the pool state records the image paths (:mod:`stillroom.methods.comd_pool`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from stillroom.config.comd import ComdConfig
from stillroom.data.batch import Batch, ExampleSampler, collate
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.shapes import SPLITS
from stillroom.domains.vl.vqa import QA
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.files import write_atomic
from stillroom.methods.comd_pool import (
    Answerer, Instruction, PoolImages, PoolItem, Wanted, accuracy_table, draw_instructions, judge_failures,
    uniform_wanted,
)

REPORT = "comd.json"
IMAGES = "comd_images"
"""The run folder's subfolder of the scenes CoMD renders on a VLM."""
HELDOUT_STREAM = 202
"""Extra seed entry of the held-out questions (with scenes.seed and the held-out split)."""


class ComdRounds:
    """The pool and the rounds of one run (module docstring); ``state_dict`` is all of its state."""

    def __init__(self, cfg: ComdConfig, *, seed: int, steps: int, student: torch.nn.Module,
                 teacher: torch.nn.Module, answerer: Answerer, pad_id: int, rank: int, world_size: int,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.seed, self.student, self.teacher = cfg, seed, student, teacher
        self.answerer, self.pad_id, self.rank, self.world_size, self.log = answerer, pad_id, rank, world_size, log
        self.steps_per_round = steps if cfg.one_shot else steps // cfg.rounds
        self.images = answerer.images
        self.heldout = heldout_questions(cfg, seed, self.images)
        self.exclude = frozenset(i.key for i in self.heldout)
        for question in self.heldout:  # the longest prompts (level 3, full scenes) must fit: fail before step 0
            answerer.prompt_ids(question.prompt)
        self.pool: list[PoolItem] = []
        self.rounds: list[dict] = []
        self.teacher_answers = 0
        self.judge_answers = 0

    # ---------------------------------------------------------------- rounds
    def ensure_round(self, step: int) -> None:
        """Start every round due by ``step`` that has not started (at most one, except after a resume)."""
        while len(self.rounds) <= step // self.steps_per_round:
            self._start_round(len(self.rounds), step)

    def _start_round(self, r: int, step: int) -> None:
        rng = np.random.default_rng([self.seed, 3030, r])
        failure_rate = None
        if r == 0:
            n = self.cfg.budget if self.cfg.one_shot else self.cfg.initial_per_family * len(self.cfg.families)
            wanted = uniform_wanted(self.cfg, rng, n)
        else:
            failed, failure_rate = self._assess(rng, r)
            wanted = self._augment(rng, failed)
        drawn = draw_instructions(self.cfg, rng, wanted, self.exclude, self.images, tag=f"r{r + 1}-pool")
        new = self.answerer.pool_items(self.teacher, drawn)
        self.pool += new
        self.teacher_answers += len(new)
        added: dict[str, int] = {}
        for item in new:
            added[f"{item.family}/{item.level}"] = added.get(f"{item.family}/{item.level}", 0) + 1
        entry = {"round": r + 1, "step": step, "pool": len(self.pool), "added": added,
                 "teacher_answers": self.teacher_answers, "judge_answers": self.judge_answers,
                 "failure_rate": failure_rate}
        self.rounds.append(entry)
        rates = "" if failure_rate is None else " failure rate " + ", ".join(
            f"{f} {v:.2f}" for f, v in failure_rate.items())
        self.log(f"comd round {r + 1} at step {step}: pool {len(self.pool)} (+{len(new)}), teacher answers "
                 f"{self.teacher_answers}, judge answers {self.judge_answers}{rates}")

    def _assess(self, rng: np.random.Generator, r: int) -> tuple[list[Wanted], dict[str, float]]:
        """The student's failures on fresh probes: ``(failed (family, level) list, failure rate per family)``."""
        per = self.cfg.probe_per_family
        wanted = [(f, int(rng.choice(self.cfg.levels))) for f in self.cfg.families for _ in range(per)]
        probes = draw_instructions(self.cfg, rng, wanted, self.exclude, self.images, tag=f"r{r + 1}-probe")
        prompts, images = [p.prompt for p in probes], [p.image for p in probes]
        teacher = [text for _, _, text in self.answerer.answer(self.teacher, prompts, images)]
        student = [text for _, _, text in self.answerer.answer(self.student, prompts, images)]
        self.judge_answers += len(probes)
        failures = judge_failures(probes, teacher, student)
        rate = {f: float(np.mean([x for p, x in zip(probes, failures) if p.qa.family == f])) for f in self.cfg.families}
        return [(p.qa.family, p.qa.level) for p, x in zip(probes, failures) if x], rate

    def _augment(self, rng: np.random.Generator, failed: list[Wanted]) -> list[Wanted]:
        """``augment_per_round`` instructions: the failed probes in a random order, cycled, each one level
        harder (capped at 3); uniform over families and levels when nothing failed."""
        n = self.cfg.augment_per_round
        if not failed:
            return uniform_wanted(self.cfg, rng, n)
        shuffled = [failed[i] for i in rng.permutation(len(failed))]
        harder = [(family, min(level + 1, 3)) for family, level in shuffled]
        return [harder[k % len(harder)] for k in range(n)]

    # ---------------------------------------------------------------- the loop's slots
    def replace_batches(self, micro: list[Batch], step: int) -> list[Batch]:
        """The step's micro-batches drawn from the pool (same count and size as the loop's)."""
        self.ensure_round(step)
        return [self._draw(step, j, len(b.uids)) for j, b in enumerate(micro)]

    def _draw(self, step: int, j: int, size: int) -> Batch:
        """Micro-batch ``j`` of ``step``: ``size`` pool items for this rank, seeded by (seed, step, j) only."""
        gen = torch.Generator().manual_seed(derive_seed("comd-draw", self.seed, step, j))
        total = size * self.world_size
        if total <= len(self.pool):
            picks = torch.randperm(len(self.pool), generator=gen)[:total]
        else:
            picks = torch.randint(len(self.pool), (total,), generator=gen)
        mine = picks[self.rank * size:(self.rank + 1) * size].tolist()
        ref_of = None if self.images is None else self.images.ref_of
        return collate([self.pool[i].example(f"comd-{i}", ref_of) for i in mine], self.pad_id)

    def metrics(self) -> dict[str, float]:
        return {"comd/round": float(len(self.rounds)), "comd/pool": float(len(self.pool)),
                "comd/teacher_answers": float(self.teacher_answers)}

    def state_dict(self) -> dict:
        return {"pool": [p.state() for p in self.pool], "rounds": self.rounds,
                "teacher_answers": self.teacher_answers, "judge_answers": self.judge_answers}

    def load_state_dict(self, state: dict) -> None:
        self.pool = [PoolItem(**p) for p in state["pool"]]
        self.rounds = list(state["rounds"])
        self.teacher_answers = int(state["teacher_answers"])
        self.judge_answers = int(state["judge_answers"])

    # ---------------------------------------------------------------- report
    def evaluate(self) -> dict:
        """Exact-match accuracy of student and teacher on the held-out questions (ground truth), and the
        student's agreement with the teacher (the teacher's answers as the reference: what distillation aims at)."""
        prompts, images = [i.prompt for i in self.heldout], [i.image for i in self.heldout]
        answers = {name: [t for _, _, t in self.answerer.answer(model, prompts, images)]
                   for name, model in (("student", self.student), ("teacher", self.teacher))}
        as_taught = [Instruction(i.prompt, QA(i.qa.question, t, i.qa.family, i.qa.level), i.image, i.text)
                     for i, t in zip(self.heldout, answers["teacher"])]
        return {"student": accuracy_table(self.heldout, answers["student"]),
                "teacher": accuracy_table(self.heldout, answers["teacher"]),
                "agreement": accuracy_table(as_taught, answers["student"])}

    def report(self, run_dir: Path) -> dict:
        """``comd.json``: the arm, the budget, the rounds and the held-out exact-match tables."""
        result = {"arm": "one_shot" if self.cfg.one_shot else "rounds", "budget": self.cfg.budget,
                  "teacher_answers": self.teacher_answers, "judge_answers": self.judge_answers,
                  "pool_by_family": _count(self.pool), "rounds": self.rounds, "heldout": self.evaluate()}
        write_atomic(run_dir / REPORT, json.dumps(result, indent=2) + "\n")
        s = result["heldout"]["student"]
        self.log(f"comd: held-out exact match {s['overall']:.3f} (hard, level 3: {s['hard']:.3f}); {run_dir / REPORT}")
        return result


class ComdSampler:
    """The loop's sampler over the data set (its rows are replaced) carrying the pool: checkpointing the
    sampler's state checkpoints the pool and the rounds."""

    def __init__(self, inner: ExampleSampler, rounds: ComdRounds) -> None:
        self.inner, self.rounds = inner, rounds

    def next_indices(self) -> list[int]:
        return self.inner.next_indices()

    def state_dict(self) -> dict:
        return {"examples": self.inner.state_dict(), "comd": self.rounds.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["examples"])
        self.rounds.load_state_dict(state["comd"])


def heldout_questions(cfg: ComdConfig, run_seed: int, images: PoolImages | None = None) -> list[Instruction]:
    """``eval_per_level`` questions per family and level from the held-out stream of ``scenes.seed`` (the
    run's seed when null): the same set for every run seed, so arms and seeds are compared on one set."""
    seed = run_seed if cfg.scenes.seed is None else cfg.scenes.seed
    rng = np.random.default_rng([seed, SPLITS["heldout"], HELDOUT_STREAM])
    wanted = [(f, lvl) for f in cfg.families for lvl in (1, 2, 3) for _ in range(cfg.eval_per_level)]
    return draw_instructions(cfg, rng, wanted, images=images, tag="heldout")


def pool_images(ctx: MethodContext) -> PoolImages | None:
    """A VLM run's :class:`PoolImages` (``None`` for a text run): the teacher's image tokens, and the image
    settings of the data pipeline's first training record (so pool pixels are read exactly as the data's)."""
    if ctx.cfg.vlm is None:
        return None
    template = next((ex.image for ex in ctx.data.train if ex.image is not None), None)
    if template is None:
        raise ValueError("method=comd in a `vlm` run needs image records in the training data (the VQA folder "
                         "format: image, prompt, completion); the data has none")
    from stillroom.domains.vl.vlm_model import image_token_count

    config = ctx.teacher_model.config
    image_ids = (int(config.image_token_index),) * image_token_count(config)
    return PoolImages(ctx.run_dir / IMAGES, image_ids, lambda path: dataclasses.replace(template, path=path))


def _count(pool: list[PoolItem]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in pool:
        out[item.family] = out.get(item.family, 0) + 1
    return out


def build(ctx: MethodContext) -> MethodPlan:
    cfg: ComdConfig = ctx.cfg.comd
    if ctx.teacher_model is None:
        raise ValueError("method=comd needs the teacher model in this process (it answers the instructions)")
    answerer = Answerer(cfg, ctx.tokenizer, add_eos=ctx.cfg.data.add_eos, seq_len=ctx.cfg.data.seq_len,
                        images=pool_images(ctx))
    rounds = ComdRounds(cfg, seed=ctx.cfg.seed, steps=ctx.cfg.train.steps, student=ctx.model,
                        teacher=ctx.teacher_model, answerer=answerer, pad_id=ctx.tokenizer.pad_token_id,
                        rank=ctx.topology.rank, world_size=ctx.topology.world_size, log=ctx.log)

    def sampler(**kw: Any) -> ComdSampler:
        return ComdSampler(ExampleSampler(**kw), rounds)

    def report(run_dir: Path) -> dict | None:
        return rounds.report(run_dir) if ctx.topology.is_main else None

    return MethodPlan(sampler=sampler, replace_batches=rounds.replace_batches, metrics=rounds.metrics,
                      report=report)


METHOD = Method("comd", build=build)
