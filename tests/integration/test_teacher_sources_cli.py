"""`stillroom run` with teacher.source=remote (our server on loopback) and =ensemble, against online."""

import json

import pytest
import torch
from conftest import stillroom
from transformers import AutoModelForCausalLM, AutoTokenizer

FP32 = {"micro_batch_size": 4, "precision": "fp32", "warmup_steps": 1, "lr": 1e-3, "steps": 3}
QUIET = ["eval.before=false", "eval.generations=0"]


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_remote_teacher_with_full_top_k_matches_online(recipe_factory, tmp_path, tiny_teacher_dir):
    from stillroom.teachers.server import RunningServer, TeacherService, create_app

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    vocab = model.config.vocab_size
    server = RunningServer(create_app(TeacherService(model, tok, model_name="tiny", max_top_k=vocab)))
    try:
        recipe = recipe_factory(train=FP32)
        stillroom("run", str(recipe), "name=online", *QUIET)
        stillroom("run", str(recipe), "name=remote", "teacher.source=remote", f"teacher.remote.url={server.url}",
                  "teacher.remote.model=tiny", f"teacher.remote.top_k={vocab}", *QUIET)
    finally:
        server.stop()
    online, remote = _losses(tmp_path / "runs" / "online"), _losses(tmp_path / "runs" / "remote")
    assert remote == pytest.approx(online, abs=1e-4)
    assert (tmp_path / "runs" / "remote" / "remote_cache.jsonl").stat().st_size > 0


def test_ensemble_of_the_same_teacher_twice_matches_online(recipe_factory, tmp_path, tiny_teacher_dir):
    recipe = recipe_factory(train=FP32)
    stillroom("run", str(recipe), "name=online", *QUIET)
    member = f"{{source: online, dtype: float32, model: {{path: {tiny_teacher_dir}}}}}"
    stillroom("run", str(recipe), "name=ens", "teacher.source=ensemble", f"teacher.ensemble=[{member}, {member}]", *QUIET)
    assert _losses(tmp_path / "runs" / "ens") == pytest.approx(_losses(tmp_path / "runs" / "online"), abs=1e-5)
