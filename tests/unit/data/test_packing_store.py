"""Teacher stores and ``data.attention: within_documents``: a store of packed blocks holds the block-masked
teacher (as the online teacher gives it), and a store of the same blocks scored across documents is refused."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama

from stillroom.config.schema import DataConfig, DataSource
from stillroom.data import build_splits, collate
from stillroom.teachers.signal import Fingerprint, OnlineTeacher
from stillroom.teachers.store_format import StoreMismatch, data_fingerprint
from stillroom.teachers.store_reader import StoreReader, StoreTeacher, run_expectation
from stillroom.teachers.store_writer import make_header, model_compute, write_store

TEACHER = "local:/t@local#sha256:0123456789abcdef"


def _splits(tmp_path, tokenizer, attention):
    rows = [{"text": f"Note {i}: " + "a short line of text. " * (1 + i % 4)} for i in range(24)]
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return build_splits(DataConfig(sources=[DataSource(path=str(path))], seq_len=40, heldout_fraction=0.0,
                                   attention=attention), tokenizer, seed=0)


def _store(folder, examples, model, vocab):
    header = make_header(examples, teacher_identity=TEACHER, tokenizer_hash="a" * 64, vocab_size=vocab, k=vocab,
                         loss_temperature=1.0, logprob_dtype="float32", shard_tokens=120)
    write_store(folder, header, examples, model_compute(model, k=vocab, loss_temperature=1.0, vocab_size=vocab,
                                                        pad_id=0, batch_size=3), log=lambda s: None)
    return StoreReader(folder)


def test_a_store_of_packed_blocks_matches_the_online_teacher_and_refuses_the_other_attention(tmp_path, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    model = tiny_llama(vocab, layers=2, max_positions=64, seed=0)
    within = _splits(tmp_path, tiny_tokenizer, "within_documents").train
    across = _splits(tmp_path, tiny_tokenizer, "across_documents").train
    assert any(len(e.doc_lens) > 1 for e in within)
    fingerprint = Fingerprint(teacher=TEACHER, tokenizer_hash="a" * 64, vocab_size=vocab)
    expected = run_expectation(fingerprint=fingerprint, data_fingerprint=data_fingerprint(within), k=vocab,
                               loss_temperature=1.0, logprob_dtype="float32")

    reader = _store(tmp_path / "within", within, model, vocab)
    reader.check_run(expected, hidden_layers=[])
    batch = collate(within[:4], pad_id=0)
    stored = StoreTeacher(reader, fingerprint=fingerprint).signal(batch)
    online = OnlineTeacher(model, vocab_size=vocab, fingerprint=fingerprint).signal(batch)
    dense_bt = torch.log_softmax(online.logits_btv, dim=-1).gather(-1, stored.topk_ids_btk)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(stored.topk_logprobs_btk[real], dense_bt[real], rtol=0, atol=1e-5)

    with pytest.raises(StoreMismatch, match="data_fingerprint"):  # the same blocks, scored across documents
        _store(tmp_path / "across", across, model, vocab).check_run(expected, hidden_layers=[])
