"""The student before training takes its speed from the student after it, only while the architecture is the same."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stillroom.eval.speed import architecture_key
from stillroom.run.training import speed_before


def _tiny(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_trained_weights_keep_the_architecture_so_the_rate_is_shared():
    student, lines = _tiny(), []
    key = architecture_key(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)  # training changes the numbers, not the computation
    rows = {"teacher": {"tokens_per_s": 10.0}, "student_before": {"heldout_ce": 5.0},
            "student_after": {"heldout_ce": 3.0, "tokens_per_s": 40.0}}
    out = speed_before(rows, key, student, lines.append)
    assert out["student_before"] == {"heldout_ce": 5.0, "tokens_per_s": 40.0}
    assert "student_before" in lines[0] and "same architecture" in lines[0]
    assert rows["student_before"] == {"heldout_ce": 5.0}  # the input rows are not changed


def test_a_changed_architecture_is_not_given_another_models_speed():
    key, lines = architecture_key(_tiny(2)), []
    rows = {"student_before": {"heldout_ce": 5.0}, "student_after": {"tokens_per_s": 40.0}}
    out = speed_before(rows, key, _tiny(3), lines.append)
    assert "tokens_per_s" not in out["student_before"]
    assert "changed" in lines[0]


def test_a_measured_before_speed_is_kept_and_no_row_is_invented():
    student = _tiny()
    key, lines = architecture_key(student), []
    rows = {"student_before": {"tokens_per_s": 7.0}, "student_after": {"tokens_per_s": 40.0}}
    assert speed_before(rows, key, student, lines.append)["student_before"]["tokens_per_s"] == 7.0
    rows = {"student_after": {"tokens_per_s": 40.0}}  # eval.before: false
    assert speed_before(rows, key, student, lines.append) == rows
    assert lines == []
