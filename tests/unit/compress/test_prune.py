"""prune(): the report adds up, sparsity runs last, refusals come before work, and the shipped SmolLM2 recipes
keep about half of the non-embedding parameters."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import save_tiny_teacher
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from stillroom.compress.depth import PruneTargetError
from stillroom.compress.prune import prune
from stillroom.config.schema import RunConfig

RECIPES = Path(__file__).resolve().parents[3] / "stillroom" / "recipes"
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("t") / "model", pretrain_steps=0)


def _cfg(teacher_dir, tmp_path, **prune_section) -> RunConfig:
    return RunConfig.model_validate({
        "output_dir": str(tmp_path), "teacher": {"model": {"path": str(teacher_dir)}},
        "data": {"sources": [{"bundled": "pydoc", "limit": 30}], "seq_len": 32},
        "prune": {"calibration": {"seq_len": 16, "batches": 2, "batch_size": 2}, **prune_section}})


def test_report_adds_up_and_sparsity_comes_last(teacher_dir, tmp_path):
    cfg = _cfg(teacher_dir, tmp_path, depth={"strategy": "last_n", "num_layers": 3}, width={"intermediate_size": 40},
               sparsity={"method": "magnitude", "fraction": 0.5})
    result = prune(cfg, log=lambda _m: None)
    assert result.folder == tmp_path / "run" / "pruned"
    report = json.loads((result.folder / "prune_report.json").read_text())
    assert sum(r["params_before"] for r in report["rows"]) == report["params_before"] == result.params_before
    assert sum(r["params_after"] for r in report["rows"]) == report["params_after"] == result.params_after
    assert [r["kept_as"] for r in report["rows"][:4]] == [0, 1, 2, None]
    model = AutoModelForCausalLM.from_pretrained(result.folder)
    mlp = model.model.layers[0].mlp.up_proj.weight
    assert mlp.shape[0] == 40 and (mlp == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert report["rows"][0]["zeros"] == sum(int((p == 0).sum()) for p in model.model.layers[0].parameters())


def test_refusals_before_any_work(teacher_dir, tmp_path):
    with pytest.raises(PruneTargetError, match="nothing to do"):
        prune(_cfg(teacher_dir, tmp_path), log=lambda _m: None)
    with pytest.raises(PruneTargetError, match=r"prune.width.intermediate_size=999 but the model has intermediate_size=64"):
        prune(_cfg(teacher_dir, tmp_path, width={"intermediate_size": 999}), log=lambda _m: None)
    (tmp_path / "run" / "pruned").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="prune.overwrite"):
        prune(_cfg(teacher_dir, tmp_path, depth={"strategy": "last_n", "num_layers": 2}), log=lambda _m: None)


def _non_embedding(changes: dict) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, **changes}))
    return sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()


@pytest.mark.parametrize("recipe", ["prune_smollm2_width", "prune_smollm2_depth"])
def test_shipped_recipes_halve_smollm2(recipe):
    section = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())["prune"]
    changes = dict(section.get("width") or {})
    if "depth" in section:
        changes["num_hidden_layers"] = section["depth"]["num_layers"]
    assert _non_embedding(changes) / _non_embedding({}) == pytest.approx(0.5, abs=0.01)
