"""Config sections of the ``masked_diffusion`` domain and of ``method: dparallel`` (spec 13; docs/methods/dparallel.md).

``domain: masked_diffusion`` trains a small masked-diffusion language model (a bidirectional ``BertForMaskedLM``
over value tokens, a separator and ``[MASK]``; :mod:`stillroom.models.masked_diffusion`) on a deterministic toy
task (sort or copy ``task.length`` tokens), decodes it semi-autoregressively in blocks of ``block_size`` and
measures accuracy against the number of decoding steps (:mod:`stillroom.domains.masked_diffusion`).

The base model is trained here once with the masked-diffusion objective and cached; its slow-sampler answers
to the training prompts are the self-distillation data (cached too); the student starts as a copy of it.

This module imports :mod:`stillroom.config.core` only (``config.domains`` and ``config.methods`` register the
sections).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class MdTaskConfig(Strict):
    """The task: a prompt of ``length`` value tokens, a separator, and the answer (``length`` tokens): the prompt
    sorted ascending (``sort``) or repeated (``copy``); with ``shifts > 1`` every segment of ``segment`` answer tokens
    is shifted by one offset ``s in 0 .. shifts-1`` (mod ``values``), drawn per segment in the training answers:
    several right answers, one verifier."""

    kind: Literal["sort", "copy"] = Field("sort", description="sort: the answer is the prompt sorted ascending; "
                                          "copy: the answer is the prompt itself.")
    shifts: int = Field(1, ge=1, description="Offsets a segment of the answer may take (1: the deterministic task). "
                        "With more, the training answers draw one per segment, so a segment is uncertain until one "
                        "of its tokens is decoded; an answer is right when every segment is one allowed shift of "
                        "the sorted/copied segment.")
    segment: int = Field(2, ge=1, description="Answer tokens that share one shift (with shifts > 1).")
    length: int = Field(32, ge=2, le=256, description="Tokens in the prompt and in the answer (the response length R).")
    values: int = Field(16, ge=2, le=1000, description="Distinct value tokens (ids 0 .. values-1; the separator and "
                        "[MASK] follow).")
    train_prompts: int = Field(4000, ge=8, description="Training prompts (the base model's data; their slow-sampler "
                               "answers are the self-distillation data).")
    heldout_prompts: int = Field(256, ge=4, description="Held-out prompts the report decodes.")
    seed: int = Field(0, description="Seed of the prompts (fixed by default, so every run seed sees the same task).")

    @model_validator(mode="after")
    def _segments(self) -> "MdTaskConfig":
        if self.shifts > 1 and (self.length % self.segment or self.shifts > self.values):
            raise ValueError(f"masked_diffusion.task: shifts > 1 needs segment={self.segment} to divide "
                             f"length={self.length} and shifts={self.shifts} <= values={self.values}")
        return self


class MdModelConfig(Strict):
    """The bidirectional transformer (``BertForMaskedLM``, no causal mask, dropout 0)."""

    hidden_size: int = Field(64, ge=8, description="Hidden size.")
    layers: int = Field(4, ge=1, description="Transformer layers.")
    heads: int = Field(4, ge=1, description="Attention heads (must divide hidden_size).")
    intermediate_size: int = Field(256, ge=8, description="MLP width.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "MdModelConfig":
        if self.hidden_size % self.heads:
            raise ValueError(f"masked_diffusion.model: heads={self.heads} must divide hidden_size={self.hidden_size}")
        return self


class MdBaseConfig(Strict):
    """The base model: a folder (``BertForMaskedLM`` written by ``save_pretrained``) or trained here once with the
    masked-diffusion objective (LLaDA: ``t ~ U(eps, 1)``, each answer token masked with probability ``t``, CE on
    the masked tokens weighted ``1/t``), cached under ``<cache_dir>/masked_diffusion/base/<key>/``."""

    path: str | None = Field(None, description="A BertForMaskedLM folder whose vocab_size is task.values + 2 (the "
                             "separator, then [MASK]); null: train one here.")
    steps: int = Field(3000, ge=1, description="Optimizer steps of the base model trained here.")
    batch_size: int = Field(64, ge=1, description="Sequences per step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (warm-up, then cosine to 10%).")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    min_mask_prob: float = Field(1e-3, gt=0, lt=1, description="eps of t ~ U(eps, 1) (LLaDA's 1e-3).")
    seed: int | None = Field(None, description="Seed of the base model's weights and masks (null: the run's seed).")


class MdEvalConfig(Strict):
    """What the report decodes: every held-out prompt with the slow sampler at each ``tokens_per_step`` and the
    entropy-threshold decoder at each ``thresholds`` entry; accuracy and steps for each."""

    tokens_per_step: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], description="Slow-sampler settings: "
                                       "tokens unmasked per step (lowest entropy first); steps = R / this.")
    thresholds: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2],
                                    description="Entropy thresholds (nats) of the parallel decoder: each step "
                                    "unmasks every masked position of the current block whose entropy is below it "
                                    "(at least one).")
    threshold: float = Field(0.3, ge=0, description="The threshold whose accuracy and tokens per step the report's "
                             "table shows (the sweep is in report.json and decoding.md).")
    batch_size: int = Field(256, ge=1, description="Prompts decoded at once.")

    @model_validator(mode="after")
    def _sweeps(self) -> "MdEvalConfig":
        if not self.tokens_per_step or min(self.tokens_per_step) < 1:
            raise ValueError(f"masked_diffusion.eval.tokens_per_step={self.tokens_per_step}: give entries >= 1")
        if not self.thresholds or min(self.thresholds) < 0:
            raise ValueError(f"masked_diffusion.eval.thresholds={self.thresholds}: give entries >= 0")
        return self


class MaskedDiffusionConfig(Strict):
    """``domain: masked_diffusion`` (see the module docstring)."""

    domain: ClassVar[str] = "masked_diffusion"

    task: MdTaskConfig = Field(default_factory=MdTaskConfig)
    model: MdModelConfig = Field(default_factory=MdModelConfig)
    base: MdBaseConfig = Field(default_factory=MdBaseConfig)
    block_size: int = Field(8, ge=1, description="Block length B of semi-autoregressive decoding (and of dParallel's "
                            "training masks): blocks are decoded left to right, positions inside a block in any "
                            "order.")
    distill_tokens_per_step: int = Field(1, ge=1, description="Tokens per step of the slow sampler that writes the "
                                         "self-distillation answers (1: R steps, the base model's slowest decoding).")
    eval: MdEvalConfig = Field(default_factory=MdEvalConfig)

    @model_validator(mode="after")
    def _sizes(self) -> "MaskedDiffusionConfig":
        if self.block_size > self.task.length:
            raise ValueError(f"masked_diffusion.block_size={self.block_size} is longer than the answer "
                             f"(task.length={self.task.length}); set block_size <= task.length")
        too_big = [k for k in self.eval_tokens() if k > self.block_size]
        if too_big:
            raise ValueError(f"masked_diffusion: tokens per step {too_big} exceed block_size={self.block_size} (a "
                             "step unmasks positions of one block); lower them")
        return self

    def eval_tokens(self) -> list[int]:
        """Every tokens-per-step setting a sampler of this run uses (the report's and the self-distillation's)."""
        return [*self.eval.tokens_per_step, self.distill_tokens_per_step]


class DParallelConfig(Strict):
    """``method: dparallel`` (domain masked_diffusion): certainty-forcing self-distillation. Per example a block k
    is drawn, earlier blocks clean, later ones masked; inside block k each token is masked with ``mask_ratio``
    (mask M) and the complementary mask is the second pass; ``L = CE(M) + CE(not M) + beta (Lcert(M) +
    Lcert(not M))``, Lcert the mean entropy of ``softmax(logits / certainty_temperature)`` over the masked
    positions already predicted correctly. The baseline (``baseline: true``) is the same masks with beta 0."""

    method: ClassVar[str] = "dparallel"

    beta: float = Field(2.0, ge=0, description="Weight of the certainty (entropy) term (official code: 2).")
    certainty_temperature: float = Field(0.5, gt=0, description="T_c of the entropy term's softmax(logits / T_c) "
                                         "(official code: 0.5).")
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="Probability that a token of the active block is in mask M "
                              "(its complement is the second pass; official code: 0.5).")

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "masked_diffusion":
            raise ValueError(f"method=dparallel distils masked-diffusion language models; set domain: "
                             f"masked_diffusion (got {run.domain!r})")
