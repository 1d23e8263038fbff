"""GenerationStore: append/read, resume without duplicates or gaps, torn-tail repair, corruption, locking."""

from __future__ import annotations

import json
import logging

import pytest

from stillroom.datagen.store import (
    GenerationStore,
    StoreCorruptError,
    StoreLockedError,
    make_key,
    validate_record,
)


def rec(pid: str, s: int, text: str | None = "out", **extra) -> dict:
    r = {"key": make_key(pid, s), "prompt_id": pid, "sample_index": s, "teacher": "t", "settings": {"seed": 0},
         "text": text}
    r.update(extra)
    return r


def test_append_read_roundtrip(tmp_path):
    path = tmp_path / "deep" / "gen.jsonl"
    with GenerationStore(path) as st:
        assert st.done_keys() == set() and len(st) == 0
        assert st.append([rec("a", 0), rec("a", 1, text="héllo")]) == 2
        assert st.append([]) == 0
        assert st.done_keys() == {"a#0", "a#1"} and "a#1" in st
    with GenerationStore(path, read_only=True) as ro:
        rows = ro.read()
    assert [r["key"] for r in rows] == ["a#0", "a#1"] and rows[1]["text"] == "héllo"
    assert path.read_bytes().endswith(b"\n")


def test_duplicates_never_written(tmp_path):
    path = tmp_path / "g.jsonl"
    with GenerationStore(path) as st:
        st.append([rec("a", 0)])
        assert st.append([rec("a", 0), rec("b", 0), rec("b", 0, text="other")]) == 1
        assert st.duplicates_skipped == 2
    with GenerationStore(path) as st:
        assert st.append([rec("a", 0), rec("b", 0)]) == 0
        assert st.duplicates_skipped == 2
    assert len(path.read_text().splitlines()) == 2


def test_error_records_counted(tmp_path):
    with GenerationStore(tmp_path / "g.jsonl") as st:
        st.append([rec("a", 0), rec("a", 1, text=None, error="empty output"), rec("b", 0, text="", error="empty output")])
        assert st.errors == 2 and st.stats()["records"] == 3
    with GenerationStore(tmp_path / "g.jsonl") as st:
        assert st.errors == 2


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"key": "a#0"}, "missing 'prompt_id'"),
        (dict(rec("a", 0), key="a#1"), "prompt_id#sample_index"),
        (dict(rec("a", 0), sample_index=True), "'sample_index' must be int"),
        (dict(rec("a", 0), settings=[1]), "'settings' must be dict"),
        (dict(rec("a", 0), text=None), "only in a record with an 'error'"),
        (dict(rec("a", 0), error=3), "'error' must be a str"),
        ({k: v for k, v in rec("a", 0).items() if k != "text"}, "'text' must be present"),
    ],
)
def test_invalid_records_rejected_before_writing(tmp_path, bad, msg):
    assert validate_record(bad) is not None
    with GenerationStore(tmp_path / "g.jsonl") as st:
        with pytest.raises(ValueError, match=msg):
            st.append([rec("ok", 0), bad])
        assert len(st) == 0
    assert (tmp_path / "g.jsonl").read_bytes() == b""


def _write_full(path, n):
    with GenerationStore(path) as st:
        st.append([rec(f"p{i}", 0) for i in range(n)])


def test_torn_line_without_newline_is_truncated_and_redone(tmp_path, caplog):
    path = tmp_path / "g.jsonl"
    _write_full(path, 3)
    whole = json.dumps(rec("p3", 0)) + "\n"
    with open(path, "ab") as f:  # a crash in the middle of writing the 4th record
        f.write(whole[: len(whole) // 2].encode())
    with caplog.at_level(logging.WARNING), GenerationStore(path) as st:
        assert st.torn_lines_repaired == 1
        assert st.done_keys() == {"p0#0", "p1#0", "p2#0"}
        assert "torn" in caplog.text
        # the job redoes exactly the missing record
        missing = [f"p{i}#0" for i in range(5) if f"p{i}#0" not in st.done_keys()]
        assert missing == ["p3#0", "p4#0"]
        st.append([rec("p3", 0), rec("p4", 0)])
    with GenerationStore(path) as st:
        assert st.torn_lines_repaired == 0
        keys = [r["key"] for r in st.read()]
    assert keys == [f"p{i}#0" for i in range(5)]  # no duplicates, no gaps


def test_torn_line_with_newline_but_invalid_json_is_truncated(tmp_path):
    path = tmp_path / "g.jsonl"
    _write_full(path, 2)
    with open(path, "ab") as f:
        f.write(b'{"key": "p2#0", "prompt_id"\n')
    with GenerationStore(path) as st:
        assert st.torn_lines_repaired == 1 and len(st) == 2
    assert len(path.read_text().splitlines()) == 2


def test_read_only_ignores_torn_tail_without_touching_file(tmp_path):
    path = tmp_path / "g.jsonl"
    _write_full(path, 2)
    with open(path, "ab") as f:
        f.write(b'{"key": "p2')
    before = path.read_bytes()
    with GenerationStore(path, read_only=True) as ro:
        assert len(ro) == 2 and [r["key"] for r in ro.read()] == ["p0#0", "p1#0"]
        with pytest.raises(RuntimeError, match="not open for writing"):
            ro.append([rec("x", 0)])
    assert path.read_bytes() == before
    with pytest.raises(FileNotFoundError):
        GenerationStore(tmp_path / "absent.jsonl", read_only=True)


def test_corruption_before_the_last_line_raises_with_file_and_line(tmp_path):
    path = tmp_path / "g.jsonl"
    _write_full(path, 3)
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = "garbage\n"
    path.write_text("".join(lines))
    with pytest.raises(StoreCorruptError, match=r"g\.jsonl:2: not valid JSON"):
        GenerationStore(path)
    with pytest.raises(StoreCorruptError):  # the failed open released its lock
        GenerationStore(path)


def test_duplicate_key_in_file_is_corruption(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(rec("a", 0)) + "\n" + json.dumps(rec("a", 0)) + "\n")
    with pytest.raises(StoreCorruptError, match=":2: duplicate key"):
        GenerationStore(path)


def test_second_writer_is_refused_until_first_closes(tmp_path):
    path = tmp_path / "g.jsonl"
    first = GenerationStore(path)
    with pytest.raises(StoreLockedError, match="another process"):
        GenerationStore(path)
    GenerationStore(path, read_only=True).close()  # readers are fine
    first.close()
    GenerationStore(path).close()


def test_teacher_settings_listed(tmp_path):
    with GenerationStore(tmp_path / "g.jsonl") as st:
        st.append([rec("a", 0), rec("b", 0), dict(rec("c", 0), teacher="u")])
        assert sorted(x["teacher"] for x in st.teacher_settings()) == ["t", "u"]
