"""Command sections of the config tree: settings of the commands other than ``run``.

``stillroom generate`` reads ``generate``, ``stillroom select`` reads ``select``;
a recipe may carry them beside the training sections (one recipe generates data
and trains on it). The commands that take no recipe (``spec-eval``,
``serve-teacher``, ``draft-data``, ``merge``, ``conditional-extend``,
``conditional-demo-data``, ``preference-data``) are each a function of one section
below; their command-line flags are the section's fields.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from stillroom.config.core import ModelSource, Strict
from stillroom.config.methods import ConditionalConfig


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


# ------------------------------------------------------------------ flag-driven commands
#
# The commands below take no recipe: their flags are these sections' fields
# (stillroom.cli.sections builds the flags from them, `--field-name`, and reads them
# back into the section, so every default is the one written here).


def _model_ref(value: str) -> str:
    """A model as a user types it (``builtin:NAME``, a ``.gguf`` file, an HF folder or hub id): checked, kept
    as typed."""
    if not value.strip():
        raise ValueError("a model reference cannot be empty (builtin:NAME, a .gguf file or an HF folder)")
    from pydantic import ValidationError

    from stillroom.models.load import model_source

    try:
        model_source(value)
    except ValidationError as err:
        raise ValueError(f"{value!r} is not a model stillroom knows: {err.errors()[0]['msg']}") from None
    return value


ModelRef = Annotated[str, AfterValidator(_model_ref)]
"""``builtin:smollm2-135m-instruct``, a ``.gguf`` file, or an HF folder / hub id, as
:func:`stillroom.models.model_source` reads them."""

_MODEL_REF_HELP = "builtin:smollm2-135m-instruct, a .gguf file, or a Hugging Face folder / hub id"


class SpecEvalConfig(Strict):
    """`stillroom spec-eval`: how well a draft serves a target in speculative decoding."""

    target: ModelRef = Field(description=f"The target model ({_MODEL_REF_HELP}).")
    draft: ModelRef = Field(description="The draft model (same forms as target; it must share the target's tokenizer).")
    gamma: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 3, 5], min_length=1, description="Draft tokens per round (several: a sweep)."
    )
    data: str = Field(
        "bundled:instructions", description="Prompts: bundled:NAME or a .jsonl/.json/.parquet/.txt file (chat "
        "messages up to the last user turn, `prompt`, or the first words of `text`); for a vision-language "
        "(LLaVA) target, a VQA records.jsonl whose records give `prompt` and `image` (relative to its folder)."
    )
    prompts: int = Field(8, ge=1, description="Number of prompts (the first N readable records of `data`).")
    on_bad_record: Literal["stop", "skip"] = Field(
        "stop", description="A malformed record of `data` stops the command (naming file:line) or is skipped."
    )
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt.")
    modes: list[Literal["greedy", "sampling"]] = Field(
        default_factory=lambda: ["greedy", "sampling"], min_length=1, description="Decoding modes measured."
    )
    sampling_temperature: float = Field(1.0, gt=0, description="Temperature of the sampling mode.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus (top-p) of the sampling mode.")
    seed: int = Field(0, description="Seed of the bundled prompt generator and of sampling (prompt i uses seed + i).")
    stop_at_eos: bool = Field(
        False, description="Stop a prompt at EOS; off: always emit max_new_tokens (same token count in every run)."
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype of both models.")
    device: str = Field("cpu", description="Torch device of both models: cpu, cuda, cuda:1, ...")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch; unset: torch's choice. On a busy machine, 1 keeps "
        "multi-threaded matmuls of a few rows from stalling and distorting the timings."
    )
    out: str | None = Field(
        None, description="Output folder (report.json, report.md, block_efficiency.png); unset: "
        "runs/spec-eval/<draft>-vs-<target>, named after the two models."
    )


class ServeTeacherConfig(Strict):
    """`stillroom serve-teacher`: a local teacher behind an OpenAI-compatible HTTP API."""

    model: ModelRef = Field(description=f"The model served ({_MODEL_REF_HELP}).")
    host: str = Field("127.0.0.1", description="Bind address (loopback unless you say otherwise).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype (auto: bfloat16 where bf16 matmuls are fast, else float32)."
    )
    device: str = Field("cpu", description="Torch device of the model.")
    max_top_k: int = Field(64, ge=1, description="Largest prompt_logprobs a request may ask for.")
    served_model_name: str | None = Field(
        None, description="Name clients send as `model`; unset: the last part of the model reference."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding an API key that clients must send as a Bearer token "
        "(the key itself never goes on the command line); unset: no key."
    )
    cache_dir: str | None = Field(None, description="Stillroom model cache (builtin models); unset: the user cache.")
    log_requests: bool = Field(
        True, description="One line per request on stderr: method, path, model, prompt tokens, top-k, max tokens, "
        "status, milliseconds (never the API key or the prompt text)."
    )
    allow_reload: bool = Field(
        False, description="Answer POST /v1/load_weights {path}: load a Hugging Face folder (safetensors, same "
        "architecture and vocabulary) as the served model, so an on-policy run (onpolicy.rollout=server) can sync "
        "its student; off: that request gets 403."
    )


class DraftDataConfig(Strict):
    """`stillroom draft-data`: a draft model's distillation data, the target's own completions of chat prompts."""

    target: ModelRef = Field(description=f"The target model that writes the completions ({_MODEL_REF_HELP}).")
    out: str = Field(description="Prompt/completion JSONL to write (its resumable store is <out>.store.jsonl).")
    data: str = Field("bundled:instructions", description="Chat records: bundled:NAME or a .jsonl/.json/.parquet file.")
    prompts: int = Field(200, ge=1, description="Number of records used (the first N readable ones).")
    data_seed: int = Field(
        0, description="Seed of the bundled generator (another seed keeps spec-eval's prompts apart)."
    )
    on_bad_record: Literal["stop", "skip"] = Field(
        "stop", description="A malformed record of `data` stops the command (naming file:line) or is skipped."
    )
    max_new_tokens: int = Field(128, ge=1, description="Most tokens per completion (stops earlier at EOS).")
    sampling_temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus (top-p) of the sampling.")
    greedy: bool = Field(False, description="Greedy decoding instead of sampling (needs n_samples=1).")
    n_samples: int = Field(1, ge=1, description="Completions per prompt.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch (one durable store append per batch).")
    seed: int = Field(0, description="Sampling seed (each batch is seeded from it and its prompts).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype of the target.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; unset: torch's choice.")


class MergeConfig(Strict):
    """`stillroom merge`: SLERP of two models of the same architecture, tensor by tensor."""

    a: str = Field(description="First Hugging Face model folder (safetensors; t=0 gives it).")
    b: str = Field(description="Second model folder, same architecture (t=1 gives it).")
    out: str = Field(description="Output folder (built in a temporary folder, then renamed).")
    t: float = Field(0.5, ge=0.0, le=1.0, description="Interpolation weight of b, in [0, 1].")
    overwrite: bool = Field(False, description="Replace `out` if it exists (otherwise refuse).")


class ConditionalExtendConfig(Strict):
    """`stillroom conditional-extend`: add conditional training's control tokens to a model."""

    src: ModelRef = Field(description=f"The model to extend ({_MODEL_REF_HELP}).")
    dst: str = Field(description="Output folder (safetensors + tokenizer) for `method: conditional`.")
    aligned_token: str = Field(
        ConditionalConfig.model_fields["aligned_token"].default,
        description="Control token added for aligned segments (must match conditional.aligned_token).",
    )
    misaligned_token: str = Field(
        ConditionalConfig.model_fields["misaligned_token"].default,
        description="Control token added for misaligned segments (must match conditional.misaligned_token).",
    )


class ConditionalDemoDataConfig(Strict):
    """`stillroom conditional-demo-data`: the synthetic BAD-word corpus as text JSONL."""

    out: str = Field(description="JSONL file to write ({\"text\": ...} per document).")
    docs: int = Field(2000, ge=1, description="Number of documents.")
    seed: int = Field(0, description="Seed of the corpus generator.")
    bad_fraction: float = Field(0.10, ge=0.0, le=1.0, description="Fraction of sentences that contain BAD.")
    toxic_doc_fraction: float = Field(
        0.10, gt=0.0, lt=1.0, description="Fraction of 'toxic' documents, where BAD sentences concentrate."
    )


class PreferenceDataConfig(Strict):
    """`stillroom preference-data`: REDI's D_SFT (sft.jsonl) and D_Pref (pref.jsonl) from verified generations."""

    out: str = Field(description="Folder for sft.jsonl (D_SFT) and pref.jsonl (D_Pref).")
    export: str | None = Field(
        None, description="`stillroom generate` export (prompt_completion, keep: all, with a verifier): the rows "
        "carry the verdicts. Give this, or `store` with `items`."
    )
    store: str | None = Field(None, description="Generation store (JSONL) written by `stillroom generate`.")
    items: str | None = Field(
        None, description="JSONL of the problems the store's generations answer (id, prompt, answer); with `store`."
    )
    verifier: str = Field(
        "numeric", description="With `store`: numeric, string or package.module:function (fn(text, item) -> bool)."
    )
    id_field: str = Field("id", description="With `store`: item field matching the generations' prompt_id.")
    prompt_field: str = Field("prompt", description="With `store`: item field with the prompt text the student sees.")
    dedupe: bool = Field(True, description="Keep identical correct texts of one problem once in D_SFT.")
    group_size: int | None = Field(
        None, ge=2, description="With `export`: also write <out>/groups.jsonl for method copg, every problem with "
        "exactly this many teacher samples as {id, prompt, completions, rewards} (reward 1.0 verified, else 0.0; "
        "set copg.group_size to the same number)."
    )

    @model_validator(mode="after")
    def _one_input(self) -> "PreferenceDataConfig":
        if (self.export is None) == (self.store is None) or (self.store is None) != (self.items is None):
            raise ValueError("give `export`, or `store` together with `items` (--export, or --store with --items)")
        if self.group_size is not None and self.export is None:
            raise ValueError("--group-size reads the verdicts of `stillroom generate`'s export: give --export")
        return self
