"""`stillroom transfer`: fine-tuning transfer (diff vectors, Lin et al. 2025; spec 14e).

out = new_base + scale * (fine_tuned - base), tensor by tensor in float64. The three inputs must share the
architecture, the parameter names and shapes and the tokenizer; see ``stillroom.compress.transfer``.
"""

from __future__ import annotations

from pydantic import Field

from stillroom.config.core import Strict


class TransferConfig(Strict):
    """`stillroom transfer --fine-tuned A --base B --new-base C --out D [--scale 1.0]`."""

    fine_tuned: str = Field(description="Hugging Face folder (safetensors) of the fine-tuned model m'_s.")
    base: str = Field(description="Folder of the base m_s that `fine_tuned` was fine-tuned from (same architecture).")
    new_base: str = Field(description="Folder of the newer base m_t that receives the diff vector (same architecture "
                          "and tokenizer as `base`).")
    out: str = Field(description="Output folder: new_base + scale * (fine_tuned - base) as safetensors, with the "
                     "fine-tuned model's config and tokenizer (built in a temporary folder, then renamed).")
    scale: float = Field(1.0, description="Factor lambda on the diff vector (1.0 in the paper; 0 copies new_base).")
    overwrite: bool = Field(False, description="Replace `out` if it exists (otherwise refuse).")
