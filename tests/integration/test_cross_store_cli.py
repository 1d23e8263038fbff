"""A cross-tokenizer teacher store through the real CLI: `cache-teacher` then `run` with teacher.source=store
trains like the online cross teacher (k = V_t, float32), a killed `cache-teacher` resumes to the same bytes, and a
store of the other tokenizer mode is refused before step 0 naming the field."""

import json

import pytest
from cli_helpers import assert_same_losses, assert_store_resumes_exactly, stillroom
from helpers import other_tokenizer

NO_EVAL = ["eval.generations=1", "eval.speed_tokens=16", "eval.heldout_sequences=8"]
STUDENT = {"from_config": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                           "num_attention_heads": 4, "num_key_value_heads": 2}}
TERMS = [{"name": "ce"}, {"name": "forward_kl"}, {"name": "uld", "params": {"support": "unmatched"}}]


@pytest.fixture
def cross_recipe(recipe_factory, tmp_path):
    folder = tmp_path / "student_tok"
    other_tokenizer(400).save_pretrained(folder)

    def make(**store):
        recipe = recipe_factory(teacher={"tokenizer_mode": "cross", "store": store},
                                student={**STUDENT, "tokenizer": str(folder)}, loss={"terms": TERMS, "chunk_tokens": 16})
        return _keep(recipe, "cross.yaml")

    return make


def _keep(recipe, name):
    """A copy of ``recipe`` under ``name`` (the recipe factory always writes recipe.yaml)."""
    kept = recipe.with_name(name)
    kept.write_text(recipe.read_text())
    return kept


def test_a_store_with_k_equal_v_trains_like_the_online_cross_teacher(cross_recipe, tmp_path, tiny_teacher_dir):
    from transformers import AutoTokenizer

    v_t = len(AutoTokenizer.from_pretrained(str(tiny_teacher_dir)))
    store = tmp_path / "store"
    recipe = cross_recipe(path=str(store), k=v_t, logprob_dtype="float32")
    out = stillroom("cache-teacher", str(recipe))
    assert f"k={v_t} of V={v_t}, float32 log-probs at T=1.0" in out.stdout
    assert "teacher positions of the student's text (tokenizer_mode cross)" in out.stdout
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["tokenizer_mode"] == "cross" and manifest["vocab_size"] == v_t
    assert manifest["student_tokenizer_hash"] and manifest["student_tokenizer_hash"] != manifest["tokenizer_hash"]

    again = stillroom("cache-teacher", str(recipe))  # a complete store: nothing to write
    assert f"teacher store {store} is already complete" in again.stdout and "this run)" not in again.stdout

    stillroom("run", str(recipe), "name=online", *NO_EVAL)
    out = stillroom("run", str(recipe), "name=stored", "teacher.source=store", *NO_EVAL)
    assert f"teacher: cross-tokenizer store {store} (k={v_t} of the teacher's {v_t} tokens, float32" in out.stdout
    stored = tmp_path / "runs" / "stored"
    assert_same_losses(stored, tmp_path / "runs" / "online", abs=1e-4, steps=6)
    rows = [json.loads(line) for line in (stored / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/uld"] > 0 and r["loss/forward_kl"] > 0 for r in rows)
    report = json.loads((stored / "report.json").read_text())
    assert report["models"]["student_after"]["bits_per_byte"] > 0 and "bits_per_byte_gap_closed" in report["summary"]


def test_a_killed_cache_teacher_resumes_to_the_same_bytes(cross_recipe, tmp_path):
    recipe = cross_recipe(k=8, logprob_dtype="int8", shard_tokens=1024)
    assert_store_resumes_exactly(recipe, tmp_path / "store_full", tmp_path / "store_killed")

def _refused(out, run_dir, field):
    assert out.returncode != 0
    message = out.stderr + out.stdout
    assert "StoreMismatch" in message and field in message, message[-2000:]
    assert not (run_dir / "metrics.jsonl").exists()  # before step 0


def test_a_store_of_the_other_tokenizer_mode_is_refused_before_step_0(recipe_factory, cross_recipe, tmp_path):
    same, cross = tmp_path / "same_store", tmp_path / "cross_store"
    stillroom("cache-teacher", str(recipe_factory(teacher={"store": {"path": str(same), "k": 8}})))
    cross_recipe_path = cross_recipe(path=str(cross), k=8)
    stillroom("cache-teacher", str(cross_recipe_path))

    out = stillroom("run", str(cross_recipe_path), "name=a", "teacher.source=store", f"teacher.store.path={same}",
                    *NO_EVAL, check=False)
    _refused(out, tmp_path / "runs" / "a", "tokenizer_mode (store 'same', run 'cross')")
    # a cross recipe's cache-teacher does not write into a same-tokenizer store either
    out = stillroom("cache-teacher", str(cross_recipe_path), f"teacher.store.path={same}", check=False)
    assert out.returncode != 0 and "tokenizer_mode (store 'same', run 'cross')" in out.stderr + out.stdout

    same_recipe = recipe_factory(teacher={"store": {"path": str(cross), "k": 8}})
    out = stillroom("run", str(same_recipe), "name=b", "teacher.source=store", *NO_EVAL, check=False)
    _refused(out, tmp_path / "runs" / "b", "tokenizer_mode (store 'cross', run 'same')")

    # hidden states at the teacher's positions would pair with no student position
    out = stillroom("cache-teacher", str(cross_recipe_path), f"teacher.store.path={tmp_path / 'hidden'}",
                    "teacher.store.hidden_layers=[1]", check=False)
    assert out.returncode != 0 and "teacher.store.hidden_layers=[1]: a cross-tokenizer store keeps no hidden" \
        in out.stderr + out.stdout
    assert not (tmp_path / "hidden").exists()
