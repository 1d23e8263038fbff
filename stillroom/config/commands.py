"""Command sections of the config tree: settings of the commands other than ``run``.

``stillroom generate`` reads ``generate``, ``stillroom select`` reads ``select``;
a recipe may carry them beside the training sections (one recipe generates data
and trains on it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stillroom.config.core import ModelSource, Strict


class GenerateInput(Strict):
    """Problems made on the fly instead of a file (`generate.input: {bundled: arithmetic, n: 200}`)."""

    bundled: Literal["arithmetic"] = Field("arithmetic", description="Generator (stillroom.data.arithmetic).")
    n: int = Field(200, ge=1, description="How many problems.")
    seed: int = Field(0, description="Seed of the problem generator (not of sampling).")
    levels: list[int] = Field(default_factory=lambda: [1, 2, 3], description="Difficulty levels (1, 2, 3) to cycle.")


class GenerateExport(Strict):
    """Write a training file from the generation store (after generating, or with `--export-only`)."""

    path: str | None = Field(
        None, description="Training JSONL to write (replaced atomically; {output_dir} and {name} are filled in); "
        "unset: no export.",
    )
    format: Literal["prompt_completion", "messages", "rationale"] | None = Field(
        None, description="prompt_completion: {prompt, completion}; messages: one user + one assistant turn; "
        "rationale: {input, rationale, label, answer} for step_by_step. Default: rationale when "
        "mode=rationale, else prompt_completion.",
    )
    prompt_template: str = Field(
        "{question}", description="What the student sees (str.format over the input record's fields)."
    )
    keep: Literal["all", "verified", "first_verified"] = Field(
        "all", description="all: every usable sample; verified: samples the verifier accepts; first_verified: the "
        "lowest-index accepted sample per prompt (verified and first_verified need generate.verifier).",
    )
    fallback_to_original: bool = Field(
        False, description="When no sample of a prompt is kept (failed verifier, malformed), keep the record's "
        "original target `original_field` once instead (self-data distillation).",
    )
    original_field: str = Field("completion", description="Input record field with the original target.")
    answer_trigger: str = Field(
        "The answer is", description="mode=rationale: the text before it is the rationale, after it the label."
    )
    cut_at: str | list[str] | None = Field(
        "Q:", description="mode=rationale: drop the teacher text from the first of these markers on (the next "
        "few-shot item), e.g. ['Q:', '\\n\\n'].",
    )
    label_type: Literal["llm", "gt"] = Field(
        "gt", description="mode=rationale: label from the record's `answer_field` (gt, the reference code's "
        "default) or from the teacher's text (llm: unlabeled data).",
    )
    drop_parse_failures: bool = Field(
        False, description="mode=rationale: drop samples without the answer trigger (they are always counted; the "
        "reference code keeps them with label ' ').",
    )


class GenerateConfig(Strict):
    """`stillroom generate`: ask a teacher for completions, rationales or rewrites of a data set."""

    input: str | GenerateInput | None = Field(
        None, description="JSONL/JSON/parquet file of records, or {bundled: arithmetic, n, seed, levels}."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first `limit` input records.")
    id_field: str = Field("id", description="Record field with the unique prompt id (the resume key).")
    template: str | None = Field(
        None, description="Prompt sent to the teacher: str.format over the record's fields, e.g. '{question}'. "
        "In rewrite mode it also sees the original target, e.g. '{question} ... {completion}'.",
    )
    mode: Literal["completion", "rationale", "rewrite"] = Field(
        "completion", description="completion: answer the prompt; rationale: chain of thought parsed into "
        "rationale + label at export; rewrite: restate the record's original target (self-data distillation).",
    )
    n_samples: int = Field(1, ge=1, description="Samples per prompt.")
    sampling_temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy, n_samples=1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus (top-p) of the sampling.")
    max_new_tokens: int = Field(256, ge=1, description="Most tokens generated per sample.")
    batch_size: int = Field(8, ge=1, description="Prompts per teacher call (one durable store append per batch).")
    seed: int = Field(0, description="Sampling seed (each batch is seeded from it and its prompts).")
    chat: bool | None = Field(
        None, description="Send each prompt as one user chat turn (local: the tokenizer's chat template; remote: "
        "/chat/completions). Default: local when the tokenizer has a chat template; remote always.",
    )
    output: str | None = Field(
        None, description="Generation store (JSONL, appended as results arrive; {output_dir} and {name} are "
        "filled in); default <output_dir>/<name>/generations.jsonl.",
    )
    verifier: str | None = Field(
        None, description="numeric | string | package.module:function (fn(text, record) -> bool); checks samples "
        "against `answer_field` for the summary and `export.keep`.",
    )
    answer_field: str = Field("answer", description="Record field with the reference answer (for the verifier).")
    on_error: Literal["record", "raise"] = Field(
        "record", description="A failed teacher call: record (retry prompt by prompt, store what still fails as "
        "error records) or raise (stop; a rerun resumes). Malformed outputs are always stored and counted.",
    )
    max_failed_calls_in_a_row: int = Field(
        8, ge=1, description="on_error=record: stop after this many failed teacher calls in a row (the teacher is "
        "down, not one prompt bad); the unfinished batch is not stored, so a rerun retries it.",
    )
    allow_mixed_settings: bool = Field(
        False, description="Allow appending to a store written by another teacher or with other settings."
    )
    export: GenerateExport = Field(default_factory=GenerateExport, description="Training file written from the store.")


class SelectConfig(Strict):
    """`stillroom select`: MiniPLM difference sampling (Gu et al. 2025) of a text corpus."""

    fraction: float = Field(0.5, gt=0.0, le=1.0, description="Keep the top fraction of documents by score.")
    output: str | None = Field(None, description="Where the selected documents are written (JSONL, text only).")
    reference: ModelSource | None = Field(
        None,
        description="The small reference LM (score = NLL_ref - NLL_teacher). Must share the teacher's tokenizer, "
        "and should be weak or trained on data disjoint from the scored corpus. Required by `stillroom select`.",
    )
    batch_size: int = Field(8, ge=1, description="Instances per no-grad scoring forward pass.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "fp32",
        description="Autocast dtype of the scoring passes (auto: bf16 only where bf16 matmuls are fast). "
        "fp32 gives exact NLLs; bf16 rounding can reorder near-tied instances.",
    )
    resume: bool = Field(
        True,
        description="Reuse the scores of an interrupted run (<output>.scores.partial.jsonl, appended per batch) "
        "when its teacher, reference and data fingerprint match.",
    )
