"""teacher.tokenizer_mode=cross through the real CLI: a student with its own tokenizer learns from the tiny
teacher; the report compares bits per byte; text the teacher's tokenizer rewrites fails before step 0."""

import json

import pytest
from cli_helpers import stillroom
from helpers import other_tokenizer

NO_EVAL = ["eval.generations=1", "eval.speed_tokens=16", "eval.heldout_sequences=8"]
STUDENT = {"from_config": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                           "num_attention_heads": 4, "num_key_value_heads": 2}}
TERMS = [{"name": "ce"}, {"name": "forward_kl"}, {"name": "uld", "params": {"support": "unmatched"}}]


@pytest.fixture
def student_tokenizer(tmp_path):
    folder = tmp_path / "student_tok"
    other_tokenizer(400).save_pretrained(folder)
    return folder


def test_a_student_with_its_own_tokenizer_trains(recipe_factory, tmp_path, student_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe_factory(teacher={"tokenizer_mode": "cross"}, student={**STUDENT, "tokenizer": str(student_tokenizer)},
                            loss={"terms": TERMS, "chunk_tokens": 16}, baseline=True)
    out = stillroom("run", str(recipe), *NO_EVAL)
    assert "cross-tokenizer: student 400 tokens, teacher 320;" in out.stdout and "align with a teacher position" \
        in out.stdout
    run_dir = tmp_path / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["loss/uld"] > 0 and r["loss/forward_kl"] > 0 for r in rows)
    report = json.loads((run_dir / "report.json").read_text())
    models = report["models"]
    assert models["teacher"]["kl_teacher_student"] is None and models["student_after"]["top1_agreement"] is None
    assert set(report["deltas"]["student_after"]) == {"bits_per_byte"}
    assert "bits_per_byte_gap_closed" in report["summary"]
    assert any("KL and top-1 agreement to the teacher are not shown" in n for n in report["notes"])
    assert models["teacher"]["bits_per_byte"] > 0 and models["student_after"]["bits_per_byte"] > 0
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert student.config.vocab_size == 400 and len(AutoTokenizer.from_pretrained(run_dir / "student")) == 400


def test_text_the_teacher_rewrites_fails_before_step_0(recipe_factory, tmp_path, student_tokenizer):
    data = tmp_path / "data.jsonl"
    lines = [{"text": f"record {i}: plain words here"} for i in range(12)]
    lines[5] = {"text": "record 5: a ﬁne ligature"}  # the tiny teacher's tokenizer applies NFKC: "ﬁ" -> "fi"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    recipe = recipe_factory(teacher={"tokenizer_mode": "cross"}, student={**STUDENT, "tokenizer": str(student_tokenizer)},
                            loss={"terms": TERMS, "chunk_tokens": 16},
                            data={"sources": [{"path": str(data)}], "pack": False, "heldout_fraction": 0.2})
    out = stillroom("run", str(recipe), *NO_EVAL, check=False)
    assert out.returncode != 0
    message = out.stderr + out.stdout
    assert "sequence data:5:" in message and "diverge at character 12" in message, message[-1500:]
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists() or \
        not any((tmp_path / "runs" / "tiny" / "checkpoints").iterdir())
