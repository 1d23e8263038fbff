"""teacher.cross.vocab_map=min_edit_distance through the real CLI: every teacher token counts for its nearest
student token, the run trains and reports, the map is cached under the run's cache_dir; uld's unmatched support
is refused with it."""

import json
import math

import pytest
from cli_helpers import stillroom
from helpers import other_tokenizer

pytest.importorskip("rapidfuzz", reason="the optional extra stillroom[cross]")

NO_EVAL = ["eval.generations=1", "eval.speed_tokens=16", "eval.heldout_sequences=8"]
STUDENT = {"from_config": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                           "num_attention_heads": 4, "num_key_value_heads": 2}}
TEACHER = {"tokenizer_mode": "cross", "cross": {"vocab_map": "min_edit_distance"}}
TERMS = [{"name": "ce"}, {"name": "forward_kl"}, {"name": "uld", "params": {"support": "all"}}]


@pytest.fixture
def student_tokenizer(tmp_path):
    folder = tmp_path / "student_tok"
    other_tokenizer(300).save_pretrained(folder)  # smaller than the teacher's 320: several teacher tokens per column
    return folder


def test_a_min_edit_distance_run_trains_and_caches_its_map(recipe_factory, tmp_path, student_tokenizer):
    recipe = recipe_factory(teacher=TEACHER, student={**STUDENT, "tokenizer": str(student_tokenizer)},
                            loss={"terms": TERMS, "chunk_tokens": 16}, cache_dir=str(tmp_path / "cache"))
    out = stillroom("run", str(recipe), *NO_EVAL)
    assert "cross-tokenizer: student 300 tokens, teacher 320; min_edit_distance map: 317/320 teacher tokens" \
        in out.stdout, out.stdout[-2000:]
    assert "by nearest spelling" in out.stdout
    cached = list((tmp_path / "cache" / "cross_vocab").glob("min_edit-*.safetensors"))
    assert len(cached) == 1
    run_dir = tmp_path / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(math.isfinite(r["loss/forward_kl"]) and r["loss/forward_kl"] > 0
                                  and r["loss/uld"] > 0 for r in rows)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["models"]["student_after"]["bits_per_byte"] > 0


def test_uld_on_the_unmatched_support_is_refused(recipe_factory, tmp_path, student_tokenizer):
    terms = [{"name": "ce"}, {"name": "uld", "params": {"support": "unmatched"}}]
    recipe = recipe_factory(teacher=TEACHER, student={**STUDENT, "tokenizer": str(student_tokenizer)},
                            loss={"terms": terms, "chunk_tokens": 16})
    out = stillroom("run", str(recipe), *NO_EVAL, check=False)
    assert out.returncode != 0
    assert "support: unmatched" in out.stderr + out.stdout and "min_edit_distance" in out.stderr + out.stdout
