"""Settings of ``method: mend`` (MEND, meta demonstration distillation, Li et al. ICLR 2024; spec 12,
docs/methods/mend.md).

A frozen LLM (``teacher.model``) and a small demonstration distiller (the student's body, plus ``summary_len``
learned summary embeddings and a projector when the widths differ) that turns K demonstrations into
``summary_len`` vectors S_D. Loss: ``CE(LLM(S_D ; x)) + loss_lambda * KL(LLM(D ; x) || LLM(S_D ; x))`` over the
x positions, at ``loss_temperature``; the ``pretrain`` stage has the KD term only.

This section imports :mod:`stillroom.config.core` only (``config.methods`` registers it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class MendConfig(Strict):
    """MEND's two stages on the one loop (module docstring)."""

    method: ClassVar[str] = "mend"

    stage: Literal["pretrain", "finetune"] = Field(
        "finetune", description="pretrain: meta-distillation pre-training on plain text (format: text), each record "
        "split into a demonstration part and an input part, KD term only; finetune: meta-training records "
        "{demonstrations, prompt, completion}, task CE on the answer + loss_lambda * KD.")
    summary_len: int = Field(100, ge=1, le=4096, description="l: distilled vectors per demonstration set "
                             "(the scripts' virtual_demo_len, 100; the CPU check uses 8).")
    loss_lambda: float = Field(1.0, ge=0.0, description="lambda: weight of the KD term (the official loss_lambda).")
    loss_temperature: float = Field(1.0, gt=0.0, description="T of KL(softmax(z_t / T) || softmax(z_s / T)).")
    pretrain_split: float = Field(0.8, gt=0.0, lt=1.0, description="stage pretrain: the fraction of a text's "
                                  "tokens that forms its demonstration part (the rest is the input x; script: 0.8).")
    demos_field: str = Field("demonstrations", description="stage finetune: record field holding the list of K "
                             "demonstration strings; the query x is the source's prompt_field, its answer the "
                             "completion_field.")
    demo_separator: str = Field("", description="Text put between two demonstrations (and after the last) when "
                                "they are concatenated into D.")
    init: str | None = Field(None, description="A folder holding a saved distiller (mend_distiller.safetensors + "
                             ".json, what a MEND run writes into <run>/distiller) to start from, e.g. the pretrain "
                             "stage's; null: the student as loaded and fresh summary embeddings.")
    eval_path: str | None = Field(None, description="JSONL of meta-test records (unseen tasks; the finetune "
                                  "format) the report's three arms are measured on; null: the held-out split.")
    eval_max: int = Field(200, ge=1, description="At most this many evaluation records for the three arms.")

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "lm":
            raise ValueError(f"method=mend distils demonstrations for a causal LM: set domain: lm (got {run.domain!r})")
        terms = [t.name for t in run.loss.terms]
        if terms != ["ce"]:
            raise ValueError(f"method=mend trains its own CE + KD objective (mend.loss_lambda, "
                             f"mend.loss_temperature); loss.terms ({terms}) must be [{{name: ce}}]")
        if run.teacher.source != "online":
            raise ValueError(f"method=mend runs the frozen LLM (teacher.model) in process, on the full and the "
                             f"distilled contexts; set teacher.source: online (got {run.teacher.source!r})")
        if run.baseline:
            raise ValueError("method=mend has no cross-entropy baseline (the student is the distiller, not a "
                             "language model of the data); set baseline: false. The report compares no "
                             "demonstrations, full in-context learning and distilled vectors instead")
        if run.train.eval_every:
            raise ValueError("method=mend: train.eval_every measures a language model, but MEND's player is the "
                             "distiller; set train.eval_every: 0 (the report measures the three inputs at the end)")
        if run.student.trainable != "full":
            raise ValueError("method=mend trains the whole distiller; set student.trainable: full")


class MendTasksConfig(Strict):
    """Synthetic key -> value mapping tasks for MEND's CPU check (:mod:`stillroom.datagen.mend_tasks`).

    A task is a random function from ``keys`` to ``values``; a record shows ``demos`` of its pairs (every key at
    least once) and asks the value of one shown key. Meta-test tasks are never meta-training tasks.
    """

    out: str = Field("data/mend", description="Folder for train.jsonl, test.jsonl, pretrain.jsonl, icl.jsonl "
                     "and llm_init/ (a random tiny Llama + character tokenizer for the frozen LLM).")
    seed: int = Field(0, description="Seed of the tasks, the records and the random LLM.")
    keys: str = Field("abcdefgh", min_length=2, description="Key symbols (one character each, distinct).")
    values: str = Field("01234567", min_length=2, description="Value symbols (one character each, distinct).")
    demos: int = Field(16, ge=1, description="K: demonstrations (key>value pairs) per record.")
    train_tasks: int = Field(400, ge=1, description="Meta-training tasks (train.jsonl).")
    test_tasks: int = Field(100, ge=1, description="Unseen meta-test tasks (test.jsonl).")
    queries_per_task: int = Field(4, ge=1, description="Records per task, each with its own demonstrations.")
    pretrain_texts: int = Field(1000, ge=0, description="Plain-text sequences of demonstrations (pretrain.jsonl, "
                                "for stage pretrain) from further tasks.")
    icl_texts: int = Field(4000, ge=0, description="Plain-text sequences of pairs (icl.jsonl) to pretrain the "
                           "frozen LLM for in-context learning, from further tasks.")
    icl_items: int = Field(24, ge=2, description="Items per icl.jsonl sequence: pairs, and queries of keys shown "
                           "before (their values are predictable in context).")
    llm_layers: int = Field(2, ge=1, description="Layers of the random tiny Llama in llm_init/.")
    llm_hidden: int = Field(64, ge=8, description="Width of the random tiny Llama in llm_init/.")

    @model_validator(mode="after")
    def _symbols(self) -> "MendTasksConfig":
        for name in ("keys", "values"):
            text = getattr(self, name)
            if len(set(text)) != len(text) or set(text) & set(SEPARATORS) or any(c.isspace() for c in text):
                raise ValueError(f"mend tasks: {name}={text!r} must be distinct characters, no whitespace and none of "
                                 f"{SEPARATORS!r}")
        if set(self.keys) & set(self.values):
            raise ValueError(f"mend tasks: keys {self.keys!r} and values {self.values!r} share characters; make them "
                             "disjoint (a key followed by a value is read as one pair token)")
        return self


SEPARATORS = ";?"
"""A demonstration is ``{key}{value};``, a query ``{key}?``."""
