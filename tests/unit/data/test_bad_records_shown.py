"""Skipped bad records are shown where they are read (file:line and why), and unknown chat roles are bad records."""

import json

from stillroom.config.core import DataConfig, DataSource
from stillroom.data import build_splits
from stillroom.data.errors import BadRecord
from stillroom.data.formats import TextEncoder, encode_record
from stillroom.data.pipeline import bad_record_lines

TEXT = "Every word of this sentence is ordinary English prose about reading data files line by line. "


def _write(path, rows):
    path.write_text("\n".join(rows) + "\n")
    return path


def test_build_splits_logs_the_first_bad_records_with_file_and_line(tmp_path, tiny_tokenizer):
    rows = [json.dumps({"text": f"{i} {TEXT}"}) for i in range(30)]
    rows[4] = "{broken"
    rows[9] = json.dumps({"text": 7})
    path = _write(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(sources=[DataSource(path=str(path))], seq_len=32, heldout_fraction=0.2, on_bad_record="skip")
    lines: list[str] = []
    splits = build_splits(cfg, tiny_tokenizer, seed=0, log=lines.append)
    assert splits.stats["records_bad"] == 2
    assert lines[0].startswith("data: 2 bad record(s) skipped (data.on_bad_record=skip)")
    assert lines[1].startswith(f"  {path}:5: invalid JSON")
    assert lines[2].startswith(f"  {path}:10: field 'text' must be a string")
    assert len(lines) == 3
    assert build_splits(cfg, tiny_tokenizer, seed=0).stats["records_bad"] == 2  # no log: nothing printed


def test_bad_record_lines_count_what_they_do_not_show():
    stats = {"records_bad": 30, "bad_record_examples": [f"f.jsonl:{i}: invalid JSON" for i in range(20)]}
    lines = bad_record_lines(stats, shown=3)
    assert lines[1:4] == ["  f.jsonl:0: invalid JSON", "  f.jsonl:1: invalid JSON", "  f.jsonl:2: invalid JSON"]
    assert lines[4] == "  ... and 27 more (report.md lists the first 20)"
    assert bad_record_lines({"records_bad": 0, "bad_record_examples": []}) == []


def _chat(*roles):
    return {"messages": [{"role": r, "content": f"turn {i}"} for i, r in enumerate(roles)]}


def test_unknown_roles_are_refused_and_template_roles_accepted(tiny_tokenizer):
    enc = TextEncoder(tiny_tokenizer, add_eos=True)
    src = DataSource(path="chat.jsonl")
    for roles in [("system", "user", "assistant"), ("user", "assistant", "tool", "assistant")]:
        assert encode_record(_chat(*roles), "messages", src, enc) is not None
    try:
        encode_record(_chat("user", "wizard", "assistant"), "messages", src, enc)
    except BadRecord as bad:
        assert "messages[1].role is 'wizard'" in bad.reason and "system, user, assistant, tool" in bad.reason
    else:
        raise AssertionError("a 'wizard' turn was accepted")
    tiny_tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'ipython' %}[tool output]{% endif %}"
                                    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    enc = TextEncoder(tiny_tokenizer, add_eos=True)
    assert "ipython" in enc.chat_roles()
    assert encode_record(_chat("user", "ipython", "assistant"), "messages", src, enc) is not None
