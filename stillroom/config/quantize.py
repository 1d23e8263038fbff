"""``student.quantize``: quantization-aware training / distillation (QAT, QAD) on llama.cpp's block grids.

The student's linear layers compute with weights rounded to a llama.cpp block format (the forward of the
quantized model) while the optimizer updates full-precision latent weights (straight-through estimator);
the saved student is then exported on exactly that grid (:mod:`stillroom.compress.quant_export`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from stillroom.config.base import Strict

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL_PRECISION = ("embed_tokens", "lm_head")


class QuantizeConfig(Strict):
    """Which weights are trained on which grid, and what the saved student becomes."""

    format: Literal["q8_0", "q4_0"] = Field(
        "q4_0",
        description="llama.cpp block format of the quantized weights: blocks of 32 consecutive input weights of "
        "a row share one float16 scale d (symmetric, no offset). q8_0: d = max|w| / 127, q = round(w / d) in "
        "[-127, 127] (8.5 bits per weight); q4_0: d = (the weight of largest magnitude, with its sign) / -8, "
        "q = clamp(trunc(w / d + 8.5), 0, 15) - 8 in [-8, 7] (4.5 bits per weight). Rounding as gguf-py's "
        "reference `quants.py` (bit for bit).",
    )
    modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_LINEARS),
        description="Linear layers quantized, by the last part of their module name (as LoRA's target_modules). "
        "Their input width must be a multiple of 32 (the block). The token embeddings and the output head stay "
        "full precision (llama.cpp's quantizer also keeps the output tensor, or the tied embedding, at higher "
        "precision than Q4_0: Q6_K/Q8_0).",
    )
    export: list[Literal["hf", "gguf"]] = Field(
        default_factory=lambda: ["hf", "gguf"],
        description="What the saved student becomes. hf: `student/` holds the dequantized grid weights (plain "
        "transformers computes exactly what was trained); without it, `student/` holds the latent "
        "full-precision weights (to continue quantization-aware training). gguf: also `student.gguf` beside "
        "the folder, the quantized tensors in this format (Llama-family models with a byte-level BPE "
        "tokenizer; anything else is refused before training).",
    )

    @field_validator("modules")
    @classmethod
    def _linears_only(cls, modules: list[str]) -> list[str]:
        kept = [m for m in modules if m in FULL_PRECISION]
        if kept:
            raise ValueError(f"student.quantize.modules: {kept} stay full precision (embeddings and the output "
                             "head are not quantized); list linear layers such as q_proj, down_proj")
        if not modules:
            raise ValueError("student.quantize.modules is empty; name the linear layers to quantize")
        return modules


class QuantizeFolderConfig(Strict):
    """`stillroom quantize`: round-to-nearest post-training quantization of a model folder (no training)."""

    folder: str = Field(description="Hugging Face model folder (safetensors) to quantize.")
    out: str = Field(description="Output HF folder holding the dequantized grid weights (built beside, renamed); "
                     "the GGUF goes beside it as <out>.gguf.")
    format: Literal["q8_0", "q4_0"] = Field("q4_0", description="llama.cpp block format (see student.quantize.format).")
    modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEARS),
                               description="Linear layers quantized, by the last part of their module name.")
    gguf: bool = Field(True, description="Also write <out>.gguf (Llama-family models, byte-level BPE tokenizer).")
    overwrite: bool = Field(False, description="Replace `out` (and <out>.gguf) if they exist (otherwise refuse).")

    def quantize_config(self) -> QuantizeConfig:
        """The grid settings as ``student.quantize`` would give them."""
        return QuantizeConfig(format=self.format, modules=self.modules, export=["hf", "gguf"] if self.gguf else ["hf"])
