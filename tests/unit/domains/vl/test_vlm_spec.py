"""Speculative decoding of a VLM measured: spec-eval with image prompts (lossless, report written), and SpecVLM's
acceptance curve during training (measured before step 1 and every eval_every steps, read back from
metrics.jsonl into the curve files and report.md)."""

import json

import pytest
import torch
from vlm_helpers import tiny_vlm, write_tiny_vqa

from stillroom.config.core import DataConfig, DataSource
from stillroom.config.schema import RunConfig
from stillroom.data import build_splits
from stillroom.data.pipeline import DataSplits
from stillroom.domains.vl.vlm_data import image_prompts
from stillroom.domains.vl.vlm_model import vlm_student
from stillroom.domains.vl.vlm_teacher import vlm_encoder
from stillroom.generate.spec_eval import run_spec_eval
from stillroom.methods import METHODS
from stillroom.methods.base import MethodContext

SPEC_TERMS = [{"name": "soft_ce", "weight": 0.1}, {"name": "hidden_smooth_l1", "params": {"layers": "last"}}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    records = write_tiny_vqa(tmp_path_factory.mktemp("vqa") / "scenes")
    target, tok = tiny_vlm(records)
    draft = vlm_student(target, {"text_config": {"num_hidden_layers": 1}}, seed=1)
    return records, target.eval(), draft.eval(), tok


def test_spec_eval_with_image_prompts(pair, tmp_path):
    records, target, draft, tok = pair
    ids, pixels = image_prompts(str(records), 3, target, tok, None)
    assert len(ids) == 3 and pixels[0].shape == (1, 3, 16, 16)
    assert ids[0][1:5] == [target.config.image_token_index] * 4
    report = run_spec_eval(target, draft, tok, ids, [2], max_new_tokens=5, modes=["greedy"], out_dir=tmp_path,
                           pixel_values=pixels, warmup=False)
    row = report["results"][0]
    assert row["matches_target_greedy"] is True and row["generated_tokens"] == 15
    assert (tmp_path / "report.md").is_file() and (tmp_path / "block_efficiency.png").is_file()
    with pytest.raises(ValueError, match="2 pixel_values for 3 prompts"):
        run_spec_eval(target, draft, tok, ids, [2], max_new_tokens=2, modes=["greedy"], out_dir=tmp_path,
                      pixel_values=pixels[:2], warmup=False)


def test_acceptance_curve_before_and_during_training(pair, tmp_path):
    records, target, draft, tok = pair
    data = build_splits(DataConfig(sources=[DataSource(path=str(records))], seq_len=64, heldout_fraction=0.0),
                        tok, 0, vlm_encoder(target, None, "image"))
    cfg = RunConfig(method="specvlm", vlm={}, student={"from_config": {}}, loss={"terms": SPEC_TERMS},
                    specvlm={"eval_every": 2, "prompts": 3, "gamma": 2, "max_new_tokens": 6})
    logs = []
    ctx = MethodContext(cfg=cfg, run_dir=tmp_path, model=target, data=DataSplits(train=data.train,
                        heldout=data.train[:3]), tokenizer=tok, teacher_model=target, vocab_size=len(tok),
                        topology=None, mix=None, log=logs.append)
    plan = METHODS["specvlm"].plan(ctx)  # the target as its own draft: every proposal accepted
    assert "acceptance length 3.000 (alpha 1.000" in logs[0]  # 6 tokens in 2 rounds of 2 + 1
    assert plan.replace_batches(["b"], 0) == ["b"] and plan.metrics() == {}
    plan.replace_batches([], 1)
    point = plan.metrics()
    assert point["spec_alpha"] == 1.0 and point["spec_accept_len"] == 3.0 and point["spec_accepted_per_round"] == 2.0
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0, **point}) + "\n"
                                            + json.dumps({"step": 3, "loss": 0.9}) + "\n")
    (tmp_path / "report.md").write_text("# report\n")
    plan.report(tmp_path)
    curve = json.loads((tmp_path / "specvlm_curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2]
    assert "| 2 | 3.000 | 1.000 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "specvlm_curve.png").stat().st_size > 0


def test_specvlm_settings_are_checked():
    base = dict(method="specvlm", vlm={}, student={"from_config": {}})
    with pytest.raises(ValueError, match="no term that reads the teacher"):
        RunConfig(**base, loss={"terms": [{"name": "ce"}]})
    with pytest.raises(ValueError, match="set baseline: false"):
        RunConfig(**base, loss={"terms": SPEC_TERMS}, baseline=True)
    assert RunConfig(**base, loss={"terms": SPEC_TERMS}).specvlm.gamma == 3
