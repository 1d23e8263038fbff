"""Packing with ``data.attention: within_documents``: document boundaries from the pipeline through collate
(positions, the block mask, no target across a boundary), whole chat records packed, the store fingerprint."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from stillroom.config.schema import DataConfig, DataSource
from stillroom.data import IGNORE, build_splits, collate
from stillroom.data.batch import Example, document_mask
from stillroom.data.packing import fit_blocks, refuse_within_documents
from stillroom.teachers.store_format import data_fingerprint


def _text_source(tmp_path, n=30):
    rows = [{"text": f"Document {i}: " + "the quick brown fox jumps. " * (1 + i % 5)} for i in range(n)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return DataSource(path=str(path))


def _chat_source(tmp_path, n=40):
    rows = [{"messages": [{"role": "user", "content": "Q? " * (1 + i % 7)},
                          {"role": "assistant", "content": "An answer. " * (1 + (3 * i) % 4)}]} for i in range(n)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return DataSource(path=str(path))


def test_collate_restarts_positions_masks_blocks_and_keeps_the_padding_mask():
    a = Example([5, 6, 7, 8, 9], [True, True, True, False, True], uid="a", doc_lens=[3, 2])
    b = Example([1, 2, 3], [False, True, True], uid="b")  # not packed: one document, then padding
    batch = collate([a, b], pad_id=0)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]  # 2D padding mask kept
    # no target across the boundary: position 2 (last of doc 0) does not predict 8 (first of doc 1)
    assert batch.target_ids[0].tolist() == [6, 7, IGNORE, 9, IGNORE]
    inputs = batch.model_inputs()
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids"}
    allowed = inputs["attention_mask"][:, 0] == 0  # [B, T, T]
    assert inputs["attention_mask"].shape == (2, 1, 5, 5) and inputs["attention_mask"].dtype == torch.float32
    assert allowed[0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                         [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert allowed[1, 3].int().tolist() == [0, 0, 0, 1, 0]  # the padding tail attends only to itself
    varlen = batch.model_inputs(varlen=True)
    assert set(varlen) == {"input_ids", "position_ids"}
    moved = batch.to("cpu")
    assert torch.equal(moved.position_ids, batch.position_ids)
    plain = collate([b], pad_id=0)
    assert plain.position_ids is None and set(plain.model_inputs()) == {"input_ids", "attention_mask"}


def test_document_mask_matches_a_hand_built_block_causal_mask():
    pos = torch.tensor([[0, 1, 0, 0, 1, 2]])
    want = torch.zeros(6, 6, dtype=torch.bool)
    for lo, hi in ((0, 2), (2, 3), (3, 6)):
        want[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert torch.equal(document_mask(pos)[0, 0] == 0, want)


def test_an_example_with_bad_boundaries_is_refused():
    with pytest.raises(ValueError, match="must be positive and sum to its 4 tokens"):
        Example([1, 2, 3, 4], [True] * 4, uid="x", doc_lens=[1, 2])
    with pytest.raises(ValueError, match="first token is a target"):
        Example([1, 2, 3, 4], [True] * 4, uid="x", doc_lens=[2, 2])


def test_text_packing_within_documents_keeps_blocks_and_drops_only_boundary_targets(tmp_path, tiny_tokenizer):
    src = _text_source(tmp_path)
    cfg = dict(sources=[src], seq_len=48, heldout_fraction=0.2)
    across = build_splits(DataConfig(**cfg), tiny_tokenizer, seed=0)
    within = build_splits(DataConfig(**cfg, attention="within_documents"), tiny_tokenizer, seed=0)
    assert [e.input_ids for e in within.train] == [e.input_ids for e in across.train]  # same blocks
    assert [e.uid for e in within.train] == [e.uid for e in across.train]
    excluded = 0
    for a, w in zip(across.train + across.heldout, within.train + within.heldout):
        assert a.doc_lens is None and sum(w.doc_lens) == len(w.input_ids)
        starts = [sum(w.doc_lens[:i]) for i in range(1, len(w.doc_lens))]
        assert all(a.target[s] and not w.target[s] for s in starts)  # text: every token was a target
        assert [t for i, t in enumerate(a.target) if i not in starts] == \
            [t for i, t in enumerate(w.target) if i not in starts]
        excluded += len(starts)
        assert w.n_bytes < a.n_bytes or not starts
    assert excluded > 0 and within.stats["boundary_targets_excluded"] == excluded
    assert across.stats["boundary_targets_excluded"] == 0
    assert within.stats["train_target_tokens"] == across.stats["train_target_tokens"] - sum(
        len(e.doc_lens) - 1 for e in within.train)
    # a store written for the across-documents blocks does not match the within-documents run
    assert data_fingerprint(within.train) != data_fingerprint(across.train)
    assert data_fingerprint(across.train) == data_fingerprint(
        [Example(e.input_ids, e.target, e.uid) for e in across.train])  # unchanged for existing stores


def test_chat_records_are_packed_whole_with_their_masks_and_less_padding(tmp_path, tiny_tokenizer):
    src = _chat_source(tmp_path)
    cfg = dict(sources=[src], seq_len=96, heldout_fraction=0.2)
    single = build_splits(DataConfig(**cfg), tiny_tokenizer, seed=0)
    packed = build_splits(DataConfig(**cfg, attention="within_documents"), tiny_tokenizer, seed=0)
    assert single.stats["packed_records"] == 0
    for one, blocks in ((single.train, packed.train), (single.heldout, packed.heldout)):
        assert len(blocks) < len(one)
        by_record = {e.meta["record"]: e for e in one}
        seen = []
        for block in blocks:
            assert len(block.input_ids) <= 96 and block.meta["packed"]
            at = 0
            for record, n in zip(block.meta["records"], block.doc_lens):
                e = by_record[record]  # the conversation, whole, with its own target flags
                assert block.input_ids[at : at + n] == e.input_ids
                assert block.target[at + 1 : at + n] == e.target[1:] and not block.target[at]
                at += n
            seen += block.meta["records"]
            assert block.n_bytes == sum(by_record[r].n_bytes for r in block.meta["records"])
        assert sorted(seen) == sorted(by_record)  # every conversation exactly once
    stats = packed.stats
    assert stats["packed_records"] == len(single.train) + len(single.heldout)
    assert stats["padding_fraction_packed"] < stats["padding_fraction_unpacked"]
    assert stats["train_target_tokens"] == single.stats["train_target_tokens"]  # chat targets all kept
    # deterministic
    again = build_splits(DataConfig(**cfg, attention="within_documents"), tiny_tokenizer, seed=1)
    assert [e.uid for e in again.train] == [e.uid for e in packed.train]


def test_fit_blocks_is_best_fit_decreasing_within_capacity():
    lengths = [5, 9, 3, 7, 2, 4, 10, 1]
    blocks = fit_blocks(lengths, 10)
    assert sorted(i for b in blocks for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in blocks)
    assert len(blocks) == 5 and blocks[0] == [6]  # 41 tokens: 5 blocks is the lower bound
    assert fit_blocks(lengths, 10) == blocks
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 10\]"):
        fit_blocks([11], 10)


@pytest.mark.parametrize("teacher,vlm,why", [
    ({"tokenizer_mode": "cross", "source": "online"}, None, "cross-tokenizer"),
    ({"tokenizer_mode": "same", "source": "remote"}, None, "remote teacher"),
    ({"tokenizer_mode": "same", "source": "ensemble", "ensemble": [SimpleNamespace(source="online"),
                                                                     SimpleNamespace(source="remote")]},
     None, "remote teacher"),
    ({"tokenizer_mode": "same", "source": "online"}, object(), "image records"),
])
def test_within_documents_refuses_what_cannot_keep_documents_apart(teacher, vlm, why):
    cfg = SimpleNamespace(data=DataConfig(attention="within_documents"),
                          teacher=SimpleNamespace(**{"ensemble": [], **teacher}), vlm=vlm)
    with pytest.raises(ValueError, match=f"data.attention=within_documents: .*{why}.*data.attention=across_documents"):
        refuse_within_documents(cfg)
    cfg.data = DataConfig()  # across documents (the default): nothing to refuse
    refuse_within_documents(cfg)


def test_an_ensemble_of_in_process_teachers_may_read_packed_documents():
    cfg = SimpleNamespace(data=DataConfig(attention="within_documents"), vlm=None,
                          teacher=SimpleNamespace(tokenizer_mode="same", source="ensemble",
                                                  ensemble=[SimpleNamespace(source="online"), SimpleNamespace(source="store")]))
    refuse_within_documents(cfg)


def test_batch_select_carries_every_row_field_so_routed_members_see_the_packed_documents():
    examples = [Example([5, 6, 7, 8, 9], [False, True, False, True, True], "a", doc_lens=[2, 3]),
                Example([1, 2, 3], [False, True, True], "b"), Example([4, 4, 4, 4], [False, False, True, True], "c",
                                                                       doc_lens=[1, 3])]
    batch = collate(examples, pad_id=0)
    batch.target_weight = torch.rand(batch.input_ids.shape)
    sub = batch.select([2, 0])
    assert sub.uids == ["c", "a"]
    for name in ("input_ids", "attention_mask", "target_ids", "n_bytes", "target_weight", "position_ids"):
        assert torch.equal(getattr(sub, name), getattr(batch, name)[[2, 0]]), name
    full, part = batch.model_inputs(), sub.model_inputs()
    assert torch.equal(part["attention_mask"], full["attention_mask"][[2, 0]])  # the block mask of those rows
