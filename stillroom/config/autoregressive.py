"""Config section of the ``autoregressive`` domain: one-step generators distilled from an autoregressive teacher
over discrete tokens (issue 15, spec 12.6; docs/domains.md, docs/methods/dd2.md).

``domain: autoregressive`` works on the spec's exact-evaluation toy: a codebook of ``codebook_size`` fixed
random vectors in R^2 and sequences of 4 token ids from a procedural joint with strong correlations, whose
exact probabilities over all ``V^4`` sequences are computed. The teacher is a tiny Hugging Face
``LlamaForCausalLM`` trained here once on sequences drawn from that joint and cached (or a folder of one); its
own joint is enumerable, so the report measures exact total variation. The student is a one-step generator
(:mod:`stillroom.domains.autoregressive.nets`) that maps a noise sequence to continuous tokens at once.

This module imports :mod:`stillroom.config.core` only (``config.domains`` registers the section).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict

SEQUENCE_LENGTH = 4
"""Positions of the toy's sequences (the procedural joint is defined for exactly four)."""


class ArToyConfig(Strict):
    """The codebook and the procedural joint (spec 12.6): ``q1 ~ Cat(pi)``; ``q2 = partner(q1)`` with probability
    ``partner_prob``; ``q3 = (q1 + q2) mod V`` with probability ``rule_prob``; ``q4 = q1`` with probability
    ``repeat_prob``; otherwise each is uniform over the codebook. ``pi`` and ``partner`` (a permutation without
    fixed points) come from ``seed``."""

    codebook_size: int = Field(8, ge=2, le=16, description="V: codebook vectors (token ids 0 .. V-1); the joint "
                               "has V^4 outcomes, enumerated exactly.")
    min_distance: float = Field(0.5, gt=0, description="Smallest distance between two codebook vectors (drawn "
                                "uniformly in [-scale, scale]^2 until they satisfy it).")
    scale: float = Field(1.5, gt=0, description="Half-width of the square the codebook vectors are drawn in.")
    partner_prob: float = Field(0.8, ge=0, le=1, description="P(q2 = partner(q1)).")
    rule_prob: float = Field(0.6, ge=0, le=1, description="P(q3 = (q1 + q2) mod V).")
    repeat_prob: float = Field(0.7, ge=0, le=1, description="P(q4 = q1).")
    seed: int = Field(0, description="Seed of the codebook, pi and the partner permutation.")

    @model_validator(mode="after")
    def _codebook_fits(self) -> "ArToyConfig":
        # V discs of radius min_distance / 2 must fit in the square (a loose packing bound, so drawing ends).
        if self.codebook_size * (self.min_distance / 2) ** 2 * 3.2 > (2 * self.scale) ** 2:
            raise ValueError(f"autoregressive.toy: {self.codebook_size} vectors at least {self.min_distance} apart "
                             f"do not fit in [-{self.scale}, {self.scale}]^2; raise toy.scale or lower min_distance")
        return self


class MarkovModesConfig(Strict):
    """``dataset: markov_modes`` (spec 9.7): ``conditions`` conditions, each a mixture of ``len(mode_weights)``
    modes; every mode a distinct first-order Markov chain over ``vocab`` tokens (initial distribution and
    transition rows softmax of seeded N(0, 1) logits times ``sharpness``), sequences of ``length`` tokens. The
    teacher reads ``[condition id, y_1 .. y_L]`` (condition ids follow the vocabulary, the last id is the null
    condition); exact likelihoods: :mod:`stillroom.domains.autoregressive.markov`."""

    conditions: int = Field(5, ge=1, le=64, description="C: conditions (token ids vocab .. vocab+C-1; vocab+C is "
                            "the null condition).")
    mode_weights: list[float] = Field([0.4, 0.3, 0.2, 0.1], min_length=1, description="Weights of each "
                                      "condition's modes (M = len; must sum to 1).")
    vocab: int = Field(16, ge=2, le=256, description="V: tokens of the sequences.")
    length: int = Field(12, ge=2, le=62, description="L: tokens per sequence (after the condition token).")
    sharpness: float = Field(3.0, gt=0, description="Scale of the N(0, 1) logits of every chain's initial and "
                             "transition distributions (higher: more peaked modes).")
    null_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of training examples whose condition is "
                                 "replaced by the null id (condition dropout, what CFG needs).")
    seed: int = Field(0, description="Seed of the chains.")

    @model_validator(mode="after")
    def _weights_sum(self) -> "MarkovModesConfig":
        if min(self.mode_weights) <= 0 or abs(sum(self.mode_weights) - 1) > 1e-6:
            raise ValueError(f"autoregressive.markov.mode_weights={self.mode_weights} must be positive and sum to 1")
        return self


class ArTeacherConfig(Strict):
    """The teacher: a ``LlamaForCausalLM`` folder, or built from these sizes and trained here once with cross-entropy
    on the training sequences (cached under ``<cache_dir>/autoregressive_teachers/<key>/``)."""

    path: str | None = Field(None, description="A folder `AutoModelForCausalLM.from_pretrained` loads, with "
                             "vocab_size = codebook_size + 1 (the last id is the BOS/condition token); null: train "
                             "one here.")
    hidden_size: int = Field(32, ge=4, description="Llama hidden size.")
    layers: int = Field(2, ge=1, description="Llama decoder layers.")
    heads: int = Field(2, ge=1, description="Attention heads (must divide hidden_size).")
    intermediate_size: int = Field(64, ge=4, description="Llama MLP width.")
    steps: int = Field(400, ge=1, description="Optimizer steps of the teacher trained here.")
    batch_size: int = Field(256, ge=1, description="Sequences per step.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (warm-up, then cosine to 10%).")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    seed: int | None = Field(None, description="Seed of the teacher's weights and batches (null: the run's seed).")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ArTeacherConfig":
        if self.hidden_size % self.heads:
            raise ValueError(f"autoregressive.teacher: heads={self.heads} must divide hidden_size={self.hidden_size}")
        return self


class ArNetConfig(Strict):
    """The one-step generator (the student) and DD2's guidance network share this shape: a GRU backbone over a
    shifted sequence of 2-D inputs -> feature ``f_i``, and an MLP head ``(x_i, t, f_i) -> 2-D output``."""

    hidden: int = Field(32, ge=2, description="GRU width d (the feature f_i).")
    head_width: int = Field(64, ge=2, description="Hidden width of the MLP head (two hidden layers, SiLU).")
    time_features: int = Field(16, ge=2, description="sin/cos features of the noise level t fed to the head.")


class ArEvalConfig(Strict):
    """What the report measures (exact TV against the teacher's enumerated joint)."""

    samples: int = Field(20000, ge=100, description="Generator samples per row (snapped to the nearest codeword).")
    seed: int = Field(0, description="Seed of the evaluation noise (every row draws from the same noise).")
    speed_batch: int = Field(1024, ge=1, description="Sequences per timed batch (samples/s).")
    cfg_gamma: float = Field(3.0, ge=1, description="markov_modes: CFG strength of the report's `teacher_cfg` row "
                             "(logits gamma * l(c) + (1 - gamma) * l(null)).")
    diversity_group: int = Field(8, ge=2, description="markov_modes: samples per condition whose mean pairwise "
                                 "1 - cos of bag-of-bigram embeddings is the diversity D (averaged over groups).")


class AutoregressiveConfig(Strict):
    """``domain: autoregressive``: a one-step generator distilled from an autoregressive teacher over codebook
    tokens (see the module docstring)."""

    domain: ClassVar[str] = "autoregressive"

    dataset: Literal["codebook", "markov_modes"] = Field("codebook", description="codebook: the exact-evaluation "
                                                         "toy of spec 12.6 (one-step generators, dd2); markov_modes: "
                                                         "spec 9.7's conditional Markov-mode sequences (cfg_distill).")
    toy: ArToyConfig = Field(default_factory=ArToyConfig)
    markov: MarkovModesConfig = Field(default_factory=MarkovModesConfig)
    train_sequences: int = Field(20000, ge=16, description="Training sequences drawn from the true joint (the "
                                 "teacher's data).")
    data_seed: int = Field(0, description="Seed of the training sequences.")
    teacher: ArTeacherConfig = Field(default_factory=ArTeacherConfig)
    generator: ArNetConfig = Field(default_factory=ArNetConfig)
    eval: ArEvalConfig = Field(default_factory=ArEvalConfig)
