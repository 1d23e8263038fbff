"""Teacher stores through the real CLI: k = V parity with the online teacher, SIGKILL + resume.

(Refusal of a mismatching store before step 0 is tested in-process: tests/unit/teachers/test_store_factory.py.)
"""

import json

from cli_helpers import assert_same_losses, assert_store_resumes_exactly, stillroom

NO_EVAL = ["eval.before=false", "eval.generations=0"]


def test_store_with_k_equal_v_trains_like_the_online_teacher(recipe_factory, tmp_path, tiny_teacher_dir):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tiny_teacher_dir)))
    store = tmp_path / "store_full"
    recipe = recipe_factory(
        teacher={"store": {"path": str(store), "k": vocab, "logprob_dtype": "float32"}},
        loss={"terms": [{"name": "forward_kl"}, {"name": "ce", "weight": 0.5}], "chunk_tokens": 64,
              "loss_temperature": 1.5},
    )
    out = stillroom("cache-teacher", str(recipe))
    assert f"k={vocab} of V={vocab}, float32 log-probs at T=1.5" in out.stdout
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["k"] == vocab and manifest["loss_temperature"] == 1.5

    stillroom("run", str(recipe), "name=online", *NO_EVAL)
    stillroom("run", str(recipe), "name=stored", "teacher.source=store", *NO_EVAL)
    assert_same_losses(tmp_path / "runs" / "stored", tmp_path / "runs" / "online", abs=1e-5, steps=6)


def test_sigkill_then_resume_writes_the_same_bytes(recipe_factory, tmp_path):
    recipe = recipe_factory(teacher={"store": {"k": 8, "logprob_dtype": "int8", "shard_tokens": 1024}})
    assert_store_resumes_exactly(recipe, tmp_path / "store_full", tmp_path / "store_killed")



def test_a_sampled_store_is_written_the_same_twice_and_trains_a_run(recipe_factory, tmp_path):
    """Draws are seeded per sequence (a rewritten or resumed store is byte-identical); a store-fed run reads it."""
    from helpers import file_hashes

    recipe = recipe_factory(teacher={"store": {"k": 8, "signal": "sampled", "shard_tokens": 1024}})
    a, b = tmp_path / "a", tmp_path / "b"
    out = stillroom("cache-teacher", str(recipe), f"teacher.store.path={a}")
    assert "8 tokens drawn per position" in out.stdout
    stillroom("cache-teacher", str(recipe), f"teacher.store.path={b}", "--batch-size=3")
    assert file_hashes(a) == file_hashes(b)
    c = tmp_path / "c"  # teacher.store.draw_seed: another realisation of the same store, recorded in its manifest
    stillroom("cache-teacher", str(recipe), f"teacher.store.path={c}", "teacher.store.draw_seed=1")
    assert json.loads((c / "manifest.json").read_text())["draw_seed"] == 1
    assert json.loads((a / "manifest.json").read_text())["draw_seed"] == 0
    assert file_hashes(c) != file_hashes(a)
    out = stillroom("run", str(recipe), "teacher.source=store", f"teacher.store.path={a}", *NO_EVAL)
    assert "k=8, sampled tokens" in out.stdout
    bad = stillroom("run", str(recipe), "name=other", "teacher.source=store", f"teacher.store.path={a}",
                    "teacher.store.signal=topk", *NO_EVAL, check=False)
    assert bad.returncode != 0 and "signal (store 'sampled', run 'topk')" in bad.stdout + bad.stderr


def test_signal_auto_writes_the_signal_the_loss_allows_and_a_run_of_other_terms_is_refused(recipe_factory, tmp_path):
    """``auto`` with forward_kl writes a topk_sampled store (its manifest says so) and a forward-KL run reads it;
    with jsd ``auto`` means topk, which that store is not: refused before step 0, naming the signal."""
    store = tmp_path / "auto"
    recipe = recipe_factory(teacher={"store": {"path": str(store), "k": 4, "signal": "auto", "tail_draws": 4,
                                               "logprob_dtype": "int8", "shard_tokens": 1024}})
    out = stillroom("cache-teacher", str(recipe))
    assert "int8 + 4 tail draws" in out.stdout
    assert json.loads((store / "manifest.json").read_text())["signal"] == "topk_sampled"
    out = stillroom("run", str(recipe), "teacher.source=store", *NO_EVAL)
    assert "k=4, int8 + 4 tail draws" in out.stdout
    bad = stillroom("run", str(recipe), "name=jsd", "teacher.source=store", "loss.terms=[{name: jsd}]", *NO_EVAL,
                    check=False)
    assert bad.returncode != 0 and "signal (store 'topk_sampled', run 'topk')" in bad.stdout + bad.stderr


def test_a_ranked_store_is_smaller_and_trains_exactly_as_the_plain_one(recipe_factory, tmp_path):
    """``teacher.store.id_code: ranked`` through the CLI: the manifest records it, the summary says it, and a run
    whose recipe leaves id_code at plain reads it and logs the same losses as a run from the plain store."""
    recipe = recipe_factory(teacher={"store": {"k": 4, "signal": "topk_sampled", "tail_draws": 4, "draw": "allocated",
                                               "logprob_dtype": "int8", "shard_tokens": 1024}})
    plain, ranked = tmp_path / "plain", tmp_path / "ranked"
    stillroom("cache-teacher", str(recipe), f"teacher.store.path={plain}")
    out = stillroom("cache-teacher", str(recipe), f"teacher.store.path={ranked}", "teacher.store.id_code=ranked")
    assert "ids coded by rank (id_code ranked)" in out.stdout
    mp, mr = (json.loads((s / "manifest.json").read_text()) for s in (plain, ranked))
    assert mr["id_code"] == "ranked" and mr["format_version"] == 3 and mp["format_version"] == 2
    assert mr["store_bytes"] < mp["store_bytes"]
    stillroom("run", str(recipe), "name=plain", "teacher.source=store", f"teacher.store.path={plain}", *NO_EVAL)
    stillroom("run", str(recipe), "name=ranked", "teacher.source=store", f"teacher.store.path={ranked}", *NO_EVAL)
    assert_same_losses(tmp_path / "runs" / "ranked", tmp_path / "runs" / "plain", abs=0.0, steps=6)
