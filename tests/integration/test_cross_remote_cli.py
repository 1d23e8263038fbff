"""teacher.tokenizer_mode=cross with teacher.source=remote through the real CLI: a student with its own tokenizer
learns from the tiny teacher served on loopback; with top_k = the teacher's whole vocabulary its losses (and those
of an ensemble with a remote member) are the online cross run's; a rerun reads the answered rows from the cache."""

import json
import shutil

import pytest

from cli_helpers import assert_same_losses, run_losses, stillroom
from helpers import load_saved, other_tokenizer
from loopback import serve, teacher_app

QUIET = ["eval.generations=1", "eval.speed_tokens=16", "eval.heldout_sequences=8"]
STUDENT = {"from_config": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                           "num_attention_heads": 4, "num_key_value_heads": 2}}
TERMS = [{"name": "ce"}, {"name": "forward_kl"}, {"name": "uld", "params": {"support": "unmatched"}}]


def test_remote_cross_run_with_whole_vocabulary_top_k_matches_online(recipe_factory, tmp_path, tiny_teacher_dir):
    folder = tmp_path / "student_tok"
    other_tokenizer(400).save_pretrained(folder)
    model, tok = load_saved(tiny_teacher_dir)
    vocab = len(tok)
    recipe = recipe_factory(teacher={"tokenizer_mode": "cross"}, student={**STUDENT, "tokenizer": str(folder)},
                            loss={"terms": TERMS, "chunk_tokens": 16})
    stillroom("run", str(recipe), "name=online", *QUIET)
    with serve(teacher_app(model, tok, max_top_k=vocab)) as server:
        out = stillroom("run", str(recipe), "name=remote", "teacher.source=remote", f"teacher.remote.url={server.url}",
                        "teacher.remote.model=tiny", f"teacher.remote.top_k={vocab}", *QUIET)
    assert f"teacher: remote {server.url}" in out.stdout and "cross-tokenizer: student 400 tokens" in out.stdout
    runs = tmp_path / "runs"
    remote, online = run_losses(runs / "remote"), run_losses(runs / "online")
    assert len(remote) == len(online) == 6 and abs(remote[0] - online[0]) <= 1e-4
    assert_same_losses(runs / "remote", runs / "online", abs=1e-4)
    rows, want = ([json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
                  for name in ("remote", "online"))
    for term in ("loss/forward_kl", "loss/uld"):  # each teacher term, not only their sum with CE
        assert all(r[term] > 0 for r in rows) and [r[term] for r in rows] == pytest.approx([w[term] for w in want],
                                                                                          abs=1e-4)
    report = json.loads((runs / "remote" / "report.json").read_text())
    assert report["models"]["student_after"]["bits_per_byte"] > 0
    assert (runs / "remote" / "remote_cache.jsonl").stat().st_size > 0


def test_remote_cross_run_with_small_top_k_trains_and_reads_answered_rows_from_its_cache(recipe_factory, tmp_path,
                                                                                       tiny_teacher_dir):
    folder = tmp_path / "student_tok"
    other_tokenizer(400).save_pretrained(folder)
    model, tok = load_saved(tiny_teacher_dir)
    recipe = recipe_factory(teacher={"tokenizer_mode": "cross"}, student={**STUDENT, "tokenizer": str(folder)},
                            loss={"terms": TERMS, "chunk_tokens": 16}, train={"steps": 3})
    args = ["teacher.source=remote", "teacher.remote.model=tiny", "teacher.remote.top_k=8", *QUIET,
            "eval.before=false"]
    runs = tmp_path / "runs"
    with serve(teacher_app(model, tok, max_top_k=8)) as server:
        stillroom("run", str(recipe), "name=a", f"teacher.remote.url={server.url}", *args)
    lines = (runs / "a" / "remote_cache.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["top_k"] == 8 and len(lines) == 1 + 3 * 4  # 3 steps of 4 rows
    (runs / "b").mkdir(parents=True)
    shutil.copy(runs / "a" / "remote_cache.jsonl", runs / "b" / "remote_cache.jsonl")
    with serve(teacher_app(model, tok, max_top_k=8)) as server:  # a fresh server: every row comes from the cache
        stillroom("run", str(recipe), "name=b", f"teacher.remote.url={server.url}", *args)
    assert (runs / "b" / "remote_cache.jsonl").read_text().splitlines() == lines  # nothing new was asked
    assert_same_losses(runs / "b", runs / "a", abs=0, steps=3)


def test_a_remote_member_of_a_cross_ensemble_with_whole_vocabulary_top_k_matches_online(recipe_factory, tmp_path,
                                                                                        tiny_teacher_dir):
    folder = tmp_path / "student_tok"
    other_tokenizer(400).save_pretrained(folder)
    model, tok = load_saved(tiny_teacher_dir)
    vocab = len(tok)
    terms = [{"name": "ce"}, {"name": "forward_kl"}]  # an averaged ensemble mixes matched tokens, not ranks
    recipe = recipe_factory(teacher={"tokenizer_mode": "cross"}, student={**STUDENT, "tokenizer": str(folder)},
                            loss={"terms": terms, "chunk_tokens": 16}, train={"steps": 3})
    args = [*QUIET, "eval.before=false"]
    stillroom("run", str(recipe), "name=online", *args)
    online = f"{{source: online, dtype: float32, model: {{path: {tiny_teacher_dir}}}}}"
    with serve(teacher_app(model, tok, max_top_k=vocab)) as server:
        remote = f"{{source: remote, remote: {{url: '{server.url}', model: tiny, top_k: {vocab}}}}}"
        stillroom("run", str(recipe), "name=ens", "teacher.source=ensemble", f"teacher.ensemble=[{online}, {remote}]",
                  *args)
    assert_same_losses(tmp_path / "runs" / "ens", tmp_path / "runs" / "online", abs=1e-4, steps=3)
    assert (tmp_path / "runs" / "ens" / "member1" / "remote_cache.jsonl").stat().st_size > 0
