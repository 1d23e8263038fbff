"""student.new_tokenizer: a byte-level BPE trained on the run's training records only, with the teacher's special
tokens and chat template, reused when its settings and data are unchanged."""

import json

from helpers import tiny_tokenizer

from stillroom.config.schema import RunConfig
from stillroom.models.new_tokenizer import STAMP, new_student_tokenizer
from stillroom.teachers.token_bytes import token_bytes


def _cfg(tmp_path, data, vocab=340):
    return RunConfig.model_validate({
        "output_dir": str(tmp_path / "runs"), "teacher": {"tokenizer_mode": "cross"},
        "student": {"from_config": {"num_hidden_layers": 1}, "new_tokenizer": {"vocab_size": vocab}},
        "data": {"sources": [{"path": str(data)}], "heldout_fraction": 0.5},
    })


def test_trained_on_training_records_with_the_teachers_specials(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"zebra{i} quokka{i} " * 20}) + "\n" for i in range(40)))
    cfg = _cfg(tmp_path, data)
    teacher = tiny_tokenizer()
    logs = []
    tok = new_student_tokenizer(cfg, teacher, logs.append)
    assert 256 < len(tok) <= 340 and "trained a" in logs[0]
    assert tok.eos_token == teacher.eos_token and "<|im_start|>" in tok.all_special_tokens
    assert tok.chat_template == teacher.chat_template
    token_bytes(tok)  # spells any text back (byte-level)
    stamp = json.loads((cfg.run_dir / "student_tokenizer" / STAMP).read_text())
    assert 5 < stamp["records"] < 35  # about half of the 40 records are held out and not read
    again = new_student_tokenizer(cfg, teacher, logs.append)
    assert "trained earlier" in logs[-1] and again.get_vocab() == tok.get_vocab()
    other = new_student_tokenizer(_cfg(tmp_path, data, vocab=310), teacher, logs.append)
    assert "trained a" in logs[-1] and len(other) <= 310
