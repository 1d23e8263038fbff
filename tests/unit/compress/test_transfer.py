"""Fine-tuning transfer: exact arithmetic, scale, extra vocabulary rows, named errors before any work."""

import json

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stillroom.compress.transfer import (
    ArchitectureMismatch, TensorMismatch, TokenizerMismatch, transfer, transfer_tensor,
)
from stillroom.config.transfer import TransferConfig


def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def trio(tmp_path, tok):
    """fine_tuned, base, new_base: three tiny Llamas of one architecture and tokenizer (hidden 16, 1 layer)."""
    return [_save(tiny_llama(len(tok), layers=1, hidden=16, seed=s), tok, tmp_path / name)
            for s, name in ((1, "ft"), (2, "base"), (3, "new"))]


def _weights(folder):
    return load_file(f"{folder}/model.safetensors")


def test_transfer_tensor_exact_in_float64():
    ft = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    base = torch.tensor([[0.5, 2.0], [1.0, 1.0]])
    new = torch.tensor([[10.0, 20.0], [30.0, 40.0]], dtype=torch.bfloat16)
    out = transfer_tensor(ft, base, new, 1.0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), torch.tensor([[10.5, 20.0], [32.0, 43.0]]))
    half = transfer_tensor(ft, base, new.float(), 0.5)
    assert torch.equal(half, torch.tensor([[10.25, 20.0], [31.0, 41.5]]))
    # float64 math: 1e8 + (1 + 2^-20 - 1) is exact in float64 and rounds once to float32
    big = transfer_tensor(torch.tensor([1.0 + 2 ** -20]), torch.tensor([1.0]), torch.tensor([1.0]), 1.0)
    assert big.item() == pytest.approx(1.0 + 2 ** -20, abs=0)


def test_transfer_tensor_zero_pads_extra_vocab_rows():
    ft_vd = torch.arange(6.0).view(3, 2)  # 3 rows: one more than the bases
    base_vd, new_vd = torch.ones(2, 2), torch.full((2, 2), 5.0)
    out = transfer_tensor(ft_vd, base_vd, new_vd, 2.0)
    assert out.shape == (3, 2)
    assert torch.equal(out[:2], new_vd + 2.0 * (ft_vd[:2] - base_vd))
    assert torch.equal(out[2], 2.0 * ft_vd[2])  # the bases' padded rows are zero


def test_transfer_folders_exact_scale_and_report(trio, tmp_path):
    ft, base, new = trio
    out = transfer(TransferConfig(fine_tuned=ft, base=base, new_base=new, out=str(tmp_path / "out"), scale=0.5),
                   log=lambda _m: None)
    w_ft, w_base, w_new, w_out = (_weights(f) for f in (ft, base, new, out))
    assert set(w_out) == set(w_new)
    for name, t in w_out.items():
        expect = (w_new[name].double() + 0.5 * (w_ft[name].double() - w_base[name].double())).float()
        assert torch.equal(t, expect), name
    report = json.loads((out / "transfer.json").read_text())
    assert report["scale"] == 0.5 and report["padded_vocab_rows"] == 0
    assert len(report["inputs"]["base"]["weights_sha256"]) == 64
    assert report["diff_norm"]["tensors"] == len(w_out) and report["diff_norm"]["total"] > 0
    loaded = AutoModelForCausalLM.from_pretrained(out)  # a plain HF folder
    assert loaded.config.tie_word_embeddings
    with pytest.raises(FileExistsError, match="--overwrite"):
        transfer(TransferConfig(fine_tuned=ft, base=base, new_base=new, out=str(out)), log=lambda _m: None)
    transfer(TransferConfig(fine_tuned=ft, base=base, new_base=new, out=str(out), scale=0.0, overwrite=True),
             log=lambda _m: None)
    assert all(torch.equal(_weights(out)[n], w_new[n]) for n in w_new)  # scale 0 copies new_base


def test_extra_vocab_rows_of_the_fine_tuned_model_are_padded(tmp_path, tok):
    base, new = (_save(tiny_llama(len(tok), layers=1, hidden=16, seed=s, tie=False), tok, tmp_path / n)
                 for s, n in ((2, "base"), (3, "new")))
    ft_tok = tiny_tokenizer()
    ft_tok.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|call|>"]})
    ft_model = tiny_llama(len(tok), layers=1, hidden=16, seed=1, tie=False)
    ft_model.resize_token_embeddings(len(ft_tok), mean_resizing=False)
    ft = _save(ft_model, ft_tok, tmp_path / "ft")
    logs = []
    out = transfer(TransferConfig(fine_tuned=ft, base=base, new_base=new, out=str(tmp_path / "out")), log=logs.append)
    assert any("zero-padding" in line for line in logs)
    w_ft, w_base, w_new, w_out = (_weights(f) for f in (ft, base, new, out))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        v = w_base[name].shape[0]
        assert w_out[name].shape[0] == v + 2
        assert torch.equal(w_out[name][v:], w_ft[name][v:])
        assert torch.allclose(w_out[name][:v], w_new[name] + w_ft[name][:v] - w_base[name], atol=1e-6)
    assert len(AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight) == len(ft_tok)


def test_different_architectures_are_refused_before_any_work(trio, tmp_path, tok):
    ft, base, _ = trio
    deeper = _save(tiny_llama(len(tok), layers=2, hidden=16, seed=3), tok, tmp_path / "deeper")
    with pytest.raises(ArchitectureMismatch, match="num_hidden_layers: 1 vs 2"):
        transfer(TransferConfig(fine_tuned=ft, base=base, new_base=deeper, out=str(tmp_path / "o")),
                 log=lambda _m: None)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()


def test_different_shapes_and_names_are_named(trio, tmp_path, tok):
    ft, base, new = trio
    weights = _weights(new)
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:, :8].contiguous()
    from safetensors.torch import save_file

    save_file(weights, f"{new}/model.safetensors")
    with pytest.raises(TensorMismatch, match="model.layers.0.mlp.up_proj.weight"):
        transfer(TransferConfig(fine_tuned=ft, base=base, new_base=new, out=str(tmp_path / "o")), log=lambda _m: None)
    weights.pop("model.layers.0.mlp.up_proj.weight")
    save_file(weights, f"{new}/model.safetensors")
    with pytest.raises(TensorMismatch, match="only in fine_tuned.*up_proj"):
        transfer(TransferConfig(fine_tuned=ft, base=base, new_base=new, out=str(tmp_path / "o")), log=lambda _m: None)


def test_different_tokenizers_are_refused(trio, tmp_path, tok):
    ft, base, _ = trio
    other_tok = tiny_tokenizer(seed_text="zebra quokka xylophone " * 2000)
    assert other_tok.get_vocab() != tok.get_vocab()
    other = _save(tiny_llama(len(tok), layers=1, hidden=16, seed=3), other_tok, tmp_path / "other")
    with pytest.raises(TokenizerMismatch, match="different tokenizers"):
        transfer(TransferConfig(fine_tuned=ft, base=base, new_base=other, out=str(tmp_path / "o")),
                 log=lambda _m: None)
    with pytest.raises(TokenizerMismatch, match="does not extend its base"):
        transfer(TransferConfig(fine_tuned=other, base=base, new_base=base, out=str(tmp_path / "o")),
                 log=lambda _m: None)
