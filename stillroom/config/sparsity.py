"""Sparsity settings (issue 12; spec section 5; docs/methods/sparsity.md): one-shot pruning of linear layers'
weights to a target fraction or an N:M pattern (``prune.sparsity``, read by ``stillroom prune``) and sparse
fine-tuning with the zeros held fixed (``student.fixed_sparsity``).

A linear layer is chosen when its ``named_modules()`` name is one of ``modules`` or ends with ``.<entry>``
(``q_proj`` chooses ``model.layers.3.self_attn.q_proj``).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from stillroom.config.base import Strict

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The linear layers of a Llama-style decoder block (attention and MLP); the output head is left dense."""


def _check_fraction(value: float, where: str) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{where}={value}: a sparsity fraction must lie strictly between 0 and 1 "
                         "(0.5 zeroes half of the weights)")
    return value


class SparsityPrune(Strict):
    """``prune.sparsity``: zero weights of the chosen linear layers in place (the shapes stay)."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        "magnitude",
        description="magnitude: drop the smallest |W| (no data); wanda: drop the smallest |W_ij| * ||X_j||_2 in "
        "each output row (X: the layer's calibration inputs); sparsegpt: the OBS-style one-shot solver that "
        "zeroes weights and updates the remaining ones of each row to keep the layer's output (calibration "
        "inputs, layer by layer, each layer's inputs computed through the already pruned layers before it).",
    )
    fraction: float | None = Field(
        None, description="Unstructured target: the fraction of each chosen layer's weights set to zero, in (0, 1).")
    n_m: tuple[int, int] | None = Field(
        None,
        description="Semi-structured N:M instead of `fraction`, e.g. [2, 4]: at most N nonzeros in each group of "
        "M consecutive input weights of every output row (the input dimension must be divisible by M).",
    )
    per_layer: dict[str, float] = Field(
        default_factory=dict,
        description="Module-name regex (re.search on the full name) -> fraction, overriding `fraction` for the "
        "modules it matches (the first matching entry wins), e.g. {'layers\\.0\\.': 0.3}; needs `fraction`.",
    )
    modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_LINEARS),
        description="The linear layers to sparsify: names or name endings (see the module docstring).",
    )
    magnitude_scope: Literal["layer", "row"] = Field(
        "layer",
        description="method magnitude: rank |W| over the whole weight matrix (layer; as the Wanda repository's "
        "magnitude baseline) or within each output row (row; Wanda's comparison group). Wanda always ranks "
        "within each output row; SparseGPT within each column block.",
    )
    block_size: int = Field(
        128, ge=1,
        description="method sparsegpt: columns solved together (the official code's blocksize); a multiple of M "
        "for N:M.",
    )
    dampening: float = Field(
        0.01, gt=0.0,
        description="method sparsegpt: added to the Hessian's diagonal as this fraction of its mean diagonal "
        "(the official code's percdamp) so the Cholesky factorisation exists.",
    )

    @field_validator("fraction")
    @classmethod
    def _fraction_in_range(cls, value: float | None) -> float | None:
        return None if value is None else _check_fraction(value, "prune.sparsity.fraction")

    @field_validator("per_layer")
    @classmethod
    def _per_layer_valid(cls, value: dict[str, float]) -> dict[str, float]:
        for pattern, fraction in value.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"prune.sparsity.per_layer: {pattern!r} is not a regular expression ({e})") from e
            _check_fraction(fraction, f"prune.sparsity.per_layer[{pattern!r}]")
        return value

    @model_validator(mode="after")
    def _one_target(self) -> "SparsityPrune":
        if (self.fraction is None) == (self.n_m is None):
            raise ValueError("prune.sparsity: give exactly one of `fraction` (unstructured, e.g. 0.5) or `n_m` "
                             "(semi-structured, e.g. [2, 4])")
        if self.n_m is not None:
            n, m = self.n_m
            if not 0 < n < m:
                raise ValueError(f"prune.sparsity.n_m={list(self.n_m)}: N:M needs 0 < N < M (2:4 keeps 2 of 4)")
            if self.per_layer:
                raise ValueError("prune.sparsity.per_layer sets per-module fractions; it needs `fraction`, not `n_m`")
            if self.method == "sparsegpt" and self.block_size % m:
                raise ValueError(f"prune.sparsity.block_size={self.block_size} must be a multiple of M={m} so no "
                                 "N:M group straddles two SparseGPT blocks")
        if not self.modules:
            raise ValueError("prune.sparsity.modules is empty: name the linear layers to sparsify (e.g. q_proj)")
        return self


class FixedSparsity(Strict):
    """``student.fixed_sparsity``: train a sparse student with its zeros held fixed (SquareHead's setting).

    At load, mask = (weight != 0) for every chosen linear layer; after every optimizer step (and after a resume
    restores the optimizer state) the masked weights are set to zero again, so AdamW's momentum cannot regrow
    them. Load the pruned student with `student.model` (e.g. the folder `stillroom prune` wrote).
    """

    modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_LINEARS),
        description="The linear layers whose zeros stay fixed: names or name endings, as prune.sparsity.modules.",
    )

    @model_validator(mode="after")
    def _some_modules(self) -> "FixedSparsity":
        if not self.modules:
            raise ValueError("student.fixed_sparsity.modules is empty: name the sparse linear layers (e.g. q_proj)")
        return self
