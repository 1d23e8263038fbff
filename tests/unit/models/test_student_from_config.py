"""student.from_config: a fresh student from the teacher's config with some fields changed."""

import pytest
import torch
from helpers import tiny_llama

from stillroom.config.schema import StudentConfig
from stillroom.models import student_from_config


def test_builds_a_smaller_model_sharing_the_vocabulary():
    teacher = tiny_llama(96, layers=4, hidden=32)
    student = student_from_config(teacher, {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32,
                                            "num_attention_heads": 2, "num_key_value_heads": 1}, seed=3)
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student.config.head_dim == 8
    assert teacher.config.num_hidden_layers == 4  # the teacher's config is untouched
    ids = torch.randint(0, 96, (2, 7))
    out = student.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert out.shape == (2, 10)
    again = student_from_config(teacher, {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32,
                                          "num_attention_heads": 2, "num_key_value_heads": 1}, seed=3)
    for a, b in zip(student.parameters(), again.parameters()):
        assert torch.equal(a, b)  # seeded


def test_refuses_vocab_changes_and_unknown_keys():
    teacher = tiny_llama(96, layers=2, hidden=32)
    with pytest.raises(ValueError, match="vocab_size"):
        student_from_config(teacher, {"vocab_size": 50})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        student_from_config(teacher, {"num_hiden_layers": 1})


def test_config_origin_rules():
    cfg = StudentConfig(from_config={"num_hidden_layers": 2})
    assert cfg.from_teacher is None
    with pytest.raises(ValueError, match="not both"):
        StudentConfig(from_config={"num_hidden_layers": 2}, model={"path": "x"})
