"""`teacher.memo` through the real CLI: a remembered online teacher trains exactly as a float32 store of the same
settings, on a small training set (`data.train_max`) seen for several epochs, and runs the teacher once per
sequence."""

import json

import pytest

from cli_helpers import assert_same_losses, stillroom

NO_EVAL = ["eval.before=false", "eval.generations=0"]


@pytest.mark.parametrize("store", [{"k": 8}, {"signal": "topk_sampled", "k": 4, "tail_draws": 6}])
def test_memo_trains_like_a_float32_store_of_the_same_settings(recipe_factory, tmp_path, store):
    path = tmp_path / "store"
    recipe = recipe_factory(
        teacher={"store": {"path": str(path), "logprob_dtype": "float32", **store}},
        data={"train_max": 3},
        loss={"terms": [{"name": "forward_kl"}, {"name": "ce", "weight": 0.5}], "chunk_tokens": 64},
        train={"micro_batch_size": 2, "steps": 6},
    )
    out = stillroom("cache-teacher", str(recipe))
    assert json.loads((path / "manifest.json").read_text())["sequences"] == 3, out.stdout
    memo = stillroom("run", str(recipe), "name=memo", "teacher.memo=true", *NO_EVAL)
    assert "remembered per training sequence" in memo.stdout + memo.stderr
    stillroom("run", str(recipe), "name=stored", "teacher.source=store", *NO_EVAL)
    assert_same_losses(tmp_path / "runs" / "memo", tmp_path / "runs" / "stored", abs=1e-5, steps=6)


def test_memo_is_refused_beside_a_store_source(recipe_factory):
    recipe = recipe_factory()
    proc = stillroom("run", str(recipe), "teacher.memo=true", "teacher.source=store", check=False)
    assert proc.returncode != 0 and "teacher.memo remembers the online teacher" in proc.stderr
