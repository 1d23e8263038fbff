"""Readers and the bad-record policy: locations in messages, counts, empty sources."""

from __future__ import annotations

import json

import pytest

from stillroom.config.schema import DataConfig, DataSource
from stillroom.data import DataError, build_splits


def _cfg(*sources: DataSource, **kw) -> DataConfig:
    kw.setdefault("seq_len", 64)
    kw.setdefault("heldout_fraction", 0.0)
    return DataConfig(sources=list(sources), **kw)


def _write_jsonl(path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


GOOD = {"prompt": "What is 2 + 2?", "completion": " It is 4."}


def test_jsonl_bad_line_stop_names_file_and_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [GOOD, GOOD, '{"prompt": "x" "completion": "y"}', GOOD])
    with pytest.raises(DataError) as err:
        build_splits(_cfg(DataSource(path=str(path))), tiny_tokenizer, seed=0)
    msg = str(err.value)
    assert f"{path}:3: invalid JSON (Expecting ','" in msg
    assert "data.on_bad_record=skip" in msg and "fix the line" in msg


def test_jsonl_bad_lines_skip_are_counted(tmp_path, tiny_tokenizer):
    path = tmp_path / "data.jsonl"
    rows = [GOOD, "{not json", GOOD, "[1, 2]", {"prompt": "only a prompt"}, "", GOOD, {"prompt": 3, "completion": "x"}]
    _write_jsonl(path, rows)
    splits = build_splits(_cfg(DataSource(path=str(path)), on_bad_record="skip"), tiny_tokenizer, seed=0)
    s = splits.stats
    assert len(splits.train) == 3
    assert s["records_bad"] == 4 and s["records_skipped"] == 4
    assert s["records_read"] == 7  # the blank line is not a record
    joined = "\n".join(s["bad_record_examples"])
    assert f"{path}:2: invalid JSON" in joined
    assert f"{path}:4: expected a JSON object, got list" in joined
    assert f"{path}:5: missing field 'completion'" in joined
    assert f"{path}:8: field 'prompt' must be a string, got int" in joined
    assert s["per_source"]["data"]["records_bad"] == 4


def test_missing_field_stop_names_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, [GOOD, {"prompt": "p"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'completion'.*fix the line"):
        build_splits(_cfg(DataSource(path=str(path))), tiny_tokenizer, seed=0)


def test_empty_file_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        build_splits(_cfg(DataSource(path=str(path))), tiny_tokenizer, seed=0)


def test_all_records_bad_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, ["{", "{"])
    with pytest.raises(DataError, match=r"bad\.jsonl: none of its 2 records is usable \(bad: 2.*first problem"):
        build_splits(_cfg(DataSource(path=str(path)), on_bad_record="skip"), tiny_tokenizer, seed=0)


def test_unknown_fields_error_names_them(tmp_path, tiny_tokenizer):
    path = tmp_path / "odd.jsonl"
    _write_jsonl(path, [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"cannot infer the record format.*\['answer', 'question'\]"):
        build_splits(_cfg(DataSource(path=str(path))), tiny_tokenizer, seed=0)


def test_missing_file_and_bad_suffix(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="file not found"):
        build_splits(_cfg(DataSource(path=str(tmp_path / "nope.jsonl"))), tiny_tokenizer, seed=0)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        build_splits(_cfg(DataSource(path=str(csv))), tiny_tokenizer, seed=0)


def test_json_list_reader(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, 5, GOOD]), encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json\[1\]: expected a JSON object, got int"):
        build_splits(_cfg(DataSource(path=str(path))), tiny_tokenizer, seed=0)
    splits = build_splits(_cfg(DataSource(path=str(path)), on_bad_record="skip"), tiny_tokenizer, seed=0)
    assert len(splits.train) == 2 and splits.stats["records_bad"] == 1
    path.write_text(json.dumps({"a": 1}), encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        build_splits(_cfg(DataSource(path=str(path))), tiny_tokenizer, seed=0)


def test_parquet_reader(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = [{"text": f"Document number {i} is about the assert statement."} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    splits = build_splits(_cfg(DataSource(path=str(path)), pack=False), tiny_tokenizer, seed=0)
    assert len(splits.train) == 5
    assert splits.stats["per_source"]["d"]["format"] == "text"
    assert tiny_tokenizer.decode(splits.train[3].input_ids[:-1]) == rows[3]["text"]


def test_datasets_save_to_disk_reader(tmp_path, tiny_tokenizer):
    import datasets

    rows = {"prompt": [f"Question {i}:" for i in range(6)], "completion": [f" answer {i}." for i in range(6)]}
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    splits = build_splits(_cfg(DataSource(dataset=str(folder))), tiny_tokenizer, seed=0)
    assert len(splits.train) == 6
    assert splits.stats["per_source"]["ds-train"]["format"] == "prompt_completion"

    dd = tmp_path / "dd"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(dd))
    with pytest.raises(DataError, match=r"no split 'train'; it has \['validation'\]"):
        build_splits(_cfg(DataSource(dataset=str(dd))), tiny_tokenizer, seed=0)
    splits = build_splits(_cfg(DataSource(dataset=str(dd), split="validation", limit=4)), tiny_tokenizer, seed=0)
    assert len(splits.train) == 4 and splits.stats["records_read"] == 4


def test_txt_reader_blank_line_blocks(tmp_path, tiny_tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph,\nstill first.\n\n\nSecond one.\n   \nThird.\n", encoding="utf-8")
    splits = build_splits(_cfg(DataSource(path=str(path)), pack=False), tiny_tokenizer, seed=0)
    texts = [tiny_tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in splits.train]
    assert texts == ["First paragraph,\nstill first.", "Second one.", "Third."]


def test_empty_text_records_are_counted(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.jsonl"
    _write_jsonl(path, [{"text": "Some words here."}, {"text": "   "}, {"text": "More words."}])
    splits = build_splits(_cfg(DataSource(path=str(path)), pack=False), tiny_tokenizer, seed=0)
    assert len(splits.train) == 2
    assert splits.stats["dropped_empty"] == 1 and splits.stats["records_skipped"] == 1
