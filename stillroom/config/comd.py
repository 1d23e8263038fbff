"""Settings of ``method: comd`` (CoMD, competitive multimodal distillation; spec 14.2, docs/methods/comd.md).

Rounds of (a) distillation on a pool of (instruction, teacher answer) pairs, (b) assessment: the student answers
a probe set greedily and a judge (exact match with the teacher's answer) marks its failures, (c) augmentation:
fresh, harder instructions of the failing families, answered by the teacher, join the pool. Instructions come
from the procedural scene questions (:mod:`stillroom.domains.vl.vqa`: text form, or on a VLM (a ``vlm`` run) a
new scene rendered to an image and asked with it). ``one_shot`` is the baseline
arm: one round on as many teacher answers, drawn uniformly over the families.

This section imports :mod:`stillroom.config.core` and :mod:`stillroom.config.scenes` only (``config.methods``
registers it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field, field_validator

from stillroom.config.core import Strict
from stillroom.config.scenes import QA_FAMILIES, ScenesConfig

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class ComdConfig(Strict):
    """CoMD's rounds, pool, judge and augmentor (module docstring). Teacher answers in the pool over the run:
    ``initial_per_family x len(families) + (rounds - 1) x augment_per_round`` (``budget``), the same in both
    arms; the probes' teacher answers are the judge's and are counted apart."""

    method: ClassVar[str] = "comd"

    rounds: int = Field(4, ge=1, description="Rounds; each trains train.steps / rounds steps on the pool as it "
                        "stands (CoMD: 4).")
    one_shot: bool = Field(False, description="The baseline arm: no assessment or augmentation; the pool is drawn "
                           "at step 0 with as many teacher answers as the rounds would use, uniformly over families "
                           "and levels, and trained on for all train.steps.")
    families: list[str] = Field(default_factory=lambda: list(QA_FAMILIES), description="Question families in the "
                                "pool, the probes and the report.")
    levels: list[int] = Field(default_factory=lambda: [1, 2, 3], description="Levels (1 easy .. 3 hard) the "
                              "initial pool, the probes and the one-shot pool draw uniformly from.")
    initial_per_family: int = Field(32, ge=1, description="Teacher-answered instructions per family in the first "
                                    "round's pool.")
    augment_per_round: int = Field(96, ge=0, description="Teacher-answered instructions added before each later "
                                   "round, spread over the failed probes: each adds its family at one level higher "
                                   "(capped at 3); uniform over families when nothing failed.")
    probe_per_family: int = Field(24, ge=1, description="Fresh probe instructions per family the student answers "
                                  "at each assessment (levels drawn from `levels`); the teacher answers them too, "
                                  "as the judge's reference (these answers never enter the pool).")
    max_answer_tokens: int = Field(8, ge=1, description="Most tokens of a generated answer (teacher and student, "
                                   "greedy; stops at EOS).")
    generation_batch_size: int = Field(64, ge=1, description="Prompts per generation call.")
    eval_per_level: int = Field(20, ge=1, description="Held-out questions per family and level in comd.json's "
                                "exact-match table (ground-truth answers; drawn from scenes.seed's held-out stream, "
                                "the same for every run seed, and never put in the pool).")
    scenes: ScenesConfig = Field(default_factory=lambda: ScenesConfig(max_objects=4),
                                 description="Scene settings of every instruction (held-out questions use scenes.seed; "
                                 "pool and probe instructions the run's seed).")

    @field_validator("families")
    @classmethod
    def _known_families(cls, value: list[str]) -> list[str]:
        unknown = [f for f in value if f not in QA_FAMILIES]
        if unknown or not value:
            raise ValueError(f"comd.families: unknown {unknown} or empty; choose from {list(QA_FAMILIES)}")
        return value

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, value: list[int]) -> list[int]:
        if not value or any(v not in (1, 2, 3) for v in value):
            raise ValueError(f"comd.levels must be a non-empty list of 1, 2, 3 (got {value})")
        return value

    @property
    def budget(self) -> int:
        """Teacher answers that enter the pool over the whole run (both arms)."""
        return self.initial_per_family * len(self.families) + (self.rounds - 1) * self.augment_per_round

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "lm":
            raise ValueError(f"method=comd distils language models (text scene questions): set domain: lm "
                             f"(got {run.domain!r})")
        if run.train.steps % self.rounds:
            raise ValueError(f"train.steps={run.train.steps} must split into comd.rounds={self.rounds} equal "
                             "rounds; make it a multiple")
        first = self.budget if self.one_shot else self.initial_per_family * len(self.families)
        if first < run.train.micro_batch_size:
            raise ValueError(f"the first pool holds {first} teacher answers, fewer than train.micro_batch_size="
                             f"{run.train.micro_batch_size}; raise comd.initial_per_family")
