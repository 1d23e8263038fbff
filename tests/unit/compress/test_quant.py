"""Fake quantization on llama.cpp's Q8_0 / Q4_0 grids and its export: the grid is gguf-py's, bit for bit; the
straight-through gradient reaches the latent weight; parameter names do not change; a quant-aware student's
logits are those of its exported HF folder and of its GGUF loaded by transformers (and by stillroom)."""

import numpy as np
import pytest
import torch
import yaml
from gguf import GGMLQuantizationType, quants
from helpers import tiny_llama
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from stillroom.compress.quant import (FakeQuantLinear, fake_quantize, grid_weight, make_quant_aware, on_grid,
                                      quantized_layers)
from stillroom.compress.quant_export import (GgufExportError, check_gguf_exportable, export_model, gguf_path,
                                             quantize_folder, save_folder, write_gguf)
from stillroom.config.core import StudentConfig
from stillroom.config.quantize import QuantizeConfig
from stillroom.models.gguf import load_gguf

QTYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def _hard_weights() -> torch.Tensor:
    """Random rows at several scales, an all-zero block, a block whose largest magnitude is tied (+m and -m) and
    a block of weights exactly half way between grid points."""
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(8, 96, generator=g) * s for s in (1.0, 1e-3, 1e-7, 50.0)])
    w[0, :32] = 0
    w[1, :32] = torch.linspace(-1, 1, 32)
    w[2, :32] = torch.arange(32, dtype=torch.float32) - 15.5  # halves: rounding ties
    return w


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_the_grid_is_gguf_pys_bit_for_bit(fmt):
    w = _hard_weights()
    reference = quants.dequantize(quants.quantize(w.numpy(), QTYPES[fmt]), QTYPES[fmt])
    ours = grid_weight(w, fmt).numpy()
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), reference.view(np.uint32))
    assert not np.array_equal(ours, w.numpy())  # it did round


def test_the_straight_through_gradient_reaches_the_latent_weight():
    torch.manual_seed(0)
    w = torch.randn(6, 64, requires_grad=True)
    x, g = torch.randn(3, 64), torch.randn(3, 6)
    out = torch.nn.functional.linear(x, fake_quantize(w, "q4_0"))
    assert torch.equal(out, x @ grid_weight(w, "q4_0").T)  # the forward is the grid weight's
    (out * g).sum().backward()
    assert torch.allclose(w.grad, g.T @ x)  # d/dW of the grid weight's output, passed straight through


def test_quant_aware_keeps_names_values_and_only_changes_the_forward(tok):
    model = tiny_llama(len(tok), layers=2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = make_quant_aware(model, QuantizeConfig(format="q8_0"))
    assert len(names) == 2 * 7 and all(isinstance(m, FakeQuantLinear) for m in quantized_layers(model).values())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    plain = on_grid(model)
    assert not quantized_layers(plain) and quantized_layers(model)  # the copy is plain; the model unchanged
    ids = torch.randint(0, len(tok), (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_exported_folder_and_gguf_compute_the_fake_quant_forward(tok, tmp_path, fmt):
    model = tiny_llama(len(tok), layers=2, seed=1)
    cfg = QuantizeConfig(format=fmt)
    make_quant_aware(model, cfg)
    ids = torch.randint(0, len(tok), (2, 11), generator=torch.Generator().manual_seed(2))
    folder = tmp_path / "student"
    save_folder(export_model(model, cfg), tok, folder)
    write_gguf(model, tok, gguf_path(folder), log=lambda _: None)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gg = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="student.gguf", dtype=torch.float32).eval()
    rehomed, gguf_tok = load_gguf(gguf_path(folder))
    grid = {f"{n}.weight": grid_weight(m.weight, fmt) for n, m in quantized_layers(model).items()}
    for name, weight in gg.state_dict().items():  # the quantized tensors are the grid, bit for bit
        assert torch.equal(weight, grid.get(name, model.state_dict()[name])), name
    with torch.no_grad():
        trained = model(ids).logits
        for other in (hf, gg, rehomed):
            assert torch.equal(other(ids).logits, trained)
    text = "Built-in functions, 1234 and def f(x):"
    assert gguf_tok(text).input_ids == tok(text).input_ids and gguf_tok.chat_template == tok.chat_template


def test_ptq_of_a_folder_is_round_to_nearest(tok, tmp_path):
    src = tmp_path / "src"
    save_folder(tiny_llama(len(tok), layers=1, seed=3), tok, src)
    out = quantize_folder(src, QuantizeConfig(format="q4_0", export=["hf"]), tmp_path / "q", log=lambda _: None)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ptq = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    w = original.model.layers[0].mlp.down_proj.weight
    assert torch.equal(ptq.model.layers[0].mlp.down_proj.weight, grid_weight(w, "q4_0"))
    assert torch.equal(ptq.lm_head.weight, original.lm_head.weight) and not gguf_path(out).exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        quantize_folder(src, QuantizeConfig(), out, log=lambda _: None)


def test_bad_settings_are_refused_with_the_fix(tok):
    with pytest.raises(ValidationError, match="stay full precision"):
        QuantizeConfig(modules=["q_proj", "lm_head"])
    with pytest.raises(ValidationError, match="trainable=full"):
        StudentConfig(quantize=QuantizeConfig(), trainable="lora")
    narrow = tiny_llama(len(tok), layers=1, hidden=16, seed=0)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj has 16 input features.*remove 'q_proj'"):
        make_quant_aware(narrow, QuantizeConfig())
    with pytest.raises(ValueError, match="match no linear layer"):
        make_quant_aware(narrow, QuantizeConfig(modules=["query"]))


def test_a_tokenizer_gguf_cannot_describe_is_refused(tok):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    word_tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    model = tiny_llama(len(tok), layers=1, seed=0)
    with pytest.raises(GgufExportError, match="WordLevel.*Remove 'gguf' from student.quantize.export"):
        check_gguf_exportable(model, word_tok)
    assert any("NFKC" in line for line in check_gguf_exportable(model, tok))  # the tiny tokenizer: a caveat only


def test_the_qad_recipe_quantizes_the_teacher_itself():
    from pathlib import Path

    from stillroom.config.load import load_config

    recipe = Path(__file__).resolve().parents[3] / "stillroom" / "recipes" / "qad_smollm2.yaml"
    cfg = load_config(recipe)
    assert cfg.student.model == cfg.teacher.model and cfg.student.quantize.format == "q4_0"
    assert "forward_kl" in [t.name for t in cfg.loss.terms] and yaml.safe_load(recipe.read_text())["baseline"]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_on_cuda_the_grid_and_gradient_stay_on_the_device_and_match_the_cpu(fmt):
    w = _hard_weights()
    w_cuda = w.cuda().requires_grad_()
    grid = fake_quantize(w_cuda, fmt)
    assert grid.device == w_cuda.device and torch.equal(grid.cpu(), grid_weight(w, fmt))
    grid.sum().backward()
    assert w_cuda.grad.device == w_cuda.device and torch.equal(w_cuda.grad, torch.ones_like(w_cuda))


def test_the_evaluation_cache_follows_every_change_of_the_weight(tok):
    """Without grad the grid weight is cached (evaluation costs what the exported model does); after an
    optimizer step, load_state_dict or a format change the forward equals a fresh computation again."""
    model = tiny_llama(len(tok), layers=1, seed=4)
    make_quant_aware(model, QuantizeConfig(format="q4_0"))
    ids = torch.randint(0, len(tok), (2, 7), generator=torch.Generator().manual_seed(5))

    def uncached() -> torch.Tensor:  # the plain path: a fresh grid copy, no cache
        with torch.no_grad():
            return on_grid(model)(ids).logits

    with torch.no_grad():
        first = model(ids).logits
        assert torch.equal(first, model(ids).logits) and torch.equal(first, uncached())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(ids).logits.square().mean().backward()
    opt.step()
    with torch.no_grad():
        stepped = model(ids).logits
    assert not torch.equal(stepped, first) and torch.equal(stepped, uncached())
    model.load_state_dict(tiny_llama(len(tok), layers=1, seed=6).state_dict())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, uncached())
    make_quant_aware(model, QuantizeConfig(format="q8_0"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, uncached())
