"""The `prune` section of the config tree: what `stillroom prune RECIPE` does to a model.

`stillroom prune` loads a model (default: the recipe's teacher), draws calibration
batches from data (default: the recipe's `data.sources`), then applies, in this
order, the prunings that are set: `depth` (drop whole decoder layers), `width`
(slice attention heads, MLP channels and embedding channels into a smaller config)
and `sparsity` (zero single weights; stillroom.config.sparsity). The result is a
plain Hugging Face folder with the tokenizer and a report (prune_report.json/.md).
Targets that need the model to check (more heads than it has) are refused once it is
loaded, before any work, naming the key and the model's value.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stillroom.config.core import DataSource, ModelSource, Strict
from stillroom.config.sparsity import SparsityPrune


class CalibrationConfig(Strict):
    """Calibration data: packed token blocks that pruning measures activations and distances on."""

    sources: list[DataSource] | None = Field(
        None, description="Data sources of the calibration text (any format the data pipeline reads); "
        "null: the recipe's data.sources.")
    seq_len: int = Field(128, ge=2, description="Tokens per calibration sequence (records packed end to end).")
    batches: int = Field(8, ge=1, description="Calibration batches.")
    batch_size: int = Field(4, ge=1, description="Sequences per calibration batch.")


class DepthPrune(Strict):
    """Drop whole decoder layers, keeping `num_layers`."""

    strategy: Literal["angular", "block_influence", "last_n"] = Field(
        "angular", description="angular: drop the contiguous block whose input and output hidden states are "
        "nearest in angle (Gromov et al. 2024); block_influence: drop the layers with the lowest block influence "
        "BI = 1 - mean cos(input, output) (ShortGPT, Men et al. 2024), not necessarily contiguous; last_n: drop "
        "the last layers (the naive baseline).")
    num_layers: int = Field(ge=1, description="Decoder layers kept (refused when the model has fewer).")


class WidthPrune(Strict):
    """Slice the model into a narrower one of the same depth (Minitron activation importance).

    Each field is the size kept; null keeps that dimension whole. Attention heads are pruned per KV group:
    every kept query head keeps its KV head, and each kept KV head keeps the same number of query heads.
    """

    num_attention_heads: int | None = Field(
        None, ge=1, description="Query heads kept per layer (a multiple of the KV heads kept).")
    num_key_value_heads: int | None = Field(
        None, ge=1, description="KV heads (GQA groups) kept per layer; null: every group when num_attention_heads is a "
        "multiple of the model's KV heads, else the fewest groups that hold num_attention_heads.")
    intermediate_size: int | None = Field(None, ge=1, description="MLP channels kept per layer.")
    hidden_size: int | None = Field(
        None, ge=1, description="Embedding (residual stream) channels kept, the same in every layer.")

    @model_validator(mode="after")
    def _something_and_whole_groups(self) -> "WidthPrune":
        sizes = (self.num_attention_heads, self.num_key_value_heads, self.intermediate_size, self.hidden_size)
        if all(v is None for v in sizes):
            raise ValueError("prune.width is set but keeps every dimension; set at least one of num_attention_heads, "
                             "num_key_value_heads, intermediate_size, hidden_size (or remove prune.width)")
        heads, groups = self.num_attention_heads, self.num_key_value_heads
        if heads is not None and groups is not None and heads % groups:
            raise ValueError(f"prune.width.num_attention_heads={heads} is not a multiple of "
                             f"prune.width.num_key_value_heads={groups}: every kept KV head keeps the same number "
                             "of query heads")
        return self


class PruneConfig(Strict):
    """Settings of `stillroom prune`: depth -> width -> sparsity, in that order when several are set."""

    model: ModelSource | None = Field(None, description="The model to prune; null: the recipe's teacher.model.")
    out: str | None = Field(None, description="Output Hugging Face folder; null: <output_dir>/<name>/pruned.")
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Calibration batches (angular, block influence, width "
        "importance and the wanda/sparsegpt sparsity methods read them).")
    depth: DepthPrune | None = Field(None, description="Drop decoder layers (first of the three).")
    width: WidthPrune | None = Field(None, description="Slice heads, MLP and embedding channels (second).")
    sparsity: SparsityPrune | None = Field(None, description="Zero single weights (last); stillroom.config.sparsity.")
    device: str = Field("cpu", description="Device the model is measured and pruned on (cpu, cuda, cuda:1); "
                        "the folder is written from the CPU.")
    overwrite: bool = Field(False, description="Replace an existing output folder.")
