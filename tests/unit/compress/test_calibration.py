"""calibration_batches: packed blocks from any record format, deterministic per seed, clear errors."""

import json

import pytest
import torch

from stillroom.compress.calibration import calibration_batches
from stillroom.config.core import DataSource
from stillroom.data.errors import DataError


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_shapes_no_padding_and_determinism(tok):
    src = [DataSource(bundled="pydoc", limit=60)]
    a = calibration_batches(tok, src, seq_len=16, batches=3, batch_size=2, seed=5)
    b = calibration_batches(tok, src, seq_len=16, batches=3, batch_size=2, seed=5)
    c = calibration_batches(tok, src, seq_len=16, batches=3, batch_size=2, seed=6)
    assert len(a) == 3 and all(t.shape == (2, 16) and t.dtype == torch.long for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    rows = torch.cat(a)
    assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]  # distinct blocks, no repeats


def test_blocks_are_the_packed_record_tokens(tok, tmp_path):
    texts = [f"record number {i} says hello" for i in range(30)]
    src = [DataSource(path=_write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]))]
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = {tuple(stream[i:i + 8]) for i in range(0, len(stream) - 7, 8)}
    out = calibration_batches(tok, src, seq_len=8, batches=2, batch_size=3, seed=0)
    assert all(tuple(r.tolist()) in blocks for t in out for r in t)


def test_chat_and_prompt_completion_records(tok, tmp_path):
    chat = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello there"}]}
            for i in range(20)]
    pc = [{"prompt": f"q {i}", "completion": "an answer"} for i in range(20)]
    sources = [DataSource(path=_write_jsonl(tmp_path / "c.jsonl", chat)),
               DataSource(path=_write_jsonl(tmp_path / "p.jsonl", pc))]
    out = calibration_batches(tok, sources, seq_len=12, batches=2, batch_size=2)
    assert [tuple(t.shape) for t in out] == [(2, 12), (2, 12)]


def test_too_little_data_names_the_source(tok, tmp_path):
    src = [DataSource(path=_write_jsonl(tmp_path / "small.jsonl", [{"text": "just a few words"}] * 3))]
    with pytest.raises(DataError, match=r"small\.jsonl.*tokens.*prune\.calibration"):
        calibration_batches(tok, src, seq_len=32, batches=4, batch_size=4)


def test_heldout_records_are_skipped(tok, tmp_path):
    rows = [{"text": f"document {i} with some words in it"} for i in range(40)]
    src = [DataSource(path=_write_jsonl(tmp_path / "d.jsonl", rows))]
    every = calibration_batches(tok, src, seq_len=8, batches=1, batch_size=1)
    with pytest.raises(DataError, match="too small"):  # all records held out: nothing left
        calibration_batches(tok, src, seq_len=8, batches=1, batch_size=1, exclude_heldout_fraction=0.9999999)
    assert every[0].shape == (1, 8)
