"""GGUF files as plain Hugging Face models: dequantized, re-homed into an ordinary model class, saveable."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from stillroom.models.errors import ModelLoadError


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file: dequantized weights re-homed into a plain model, plus its tokenizer."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelLoadError(f"GGUF file {file} not found; check `model.gguf`")
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ModelLoadError("reading GGUF files needs the `gguf` package: pip install gguf") from err
    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name)
        tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"{file}: transformers cannot load this GGUF file ({err})") from err
    model = rehome(quantized).to(dtype)
    return model, tok


def rehome(model: PreTrainedModel) -> PreTrainedModel:
    """A plain model of the same class holding ``model``'s weights, without its quantization config.

    transformers marks GGUF-loaded models as quantized (``hf_quantizer``,
    ``config.quantization_config``), which blocks ordinary saving and training.
    The copy is a regular fp32 model: ``save_pretrained`` writes safetensors.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]
    with no_init_weights():
        plain = type(model)(config)
    state = {k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    result = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "all_tied_weights_keys", {}) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"re-homing the GGUF model failed: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def fix_special_tokens(tok: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Make padding possible: pad = eos when the tokenizer has no pad token (in place).

    Also mirrors pad/eos into ``model.generation_config`` when those are unset there.
    """
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        if gen.pad_token_id is None and tok.pad_token_id is not None:
            gen.pad_token_id = tok.pad_token_id
        if gen.eos_token_id is None and tok.eos_token_id is not None:
            gen.eos_token_id = tok.eos_token_id
