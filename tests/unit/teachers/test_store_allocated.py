"""``teacher.store.draw: allocated``: a sequence's tail draws shared out over its positions (store_sampled.py)."""

from __future__ import annotations

import json

import pytest
import torch
from test_store_fixtures import V, FakeTeacher, examples

from stillroom.teachers.store_format import SequenceSignal, StoreError
from stillroom.teachers.store_reader import StoreReader, StoreTeacher
from stillroom.teachers.store_sampled import (
    MAX_ALLOCATED, allocate_draws, draw_allocated, loss_rows, row_signal, sequence_generator,
)
from stillroom.teachers.store_writer import make_header, write_store


def _tails() -> torch.Tensor:
    """``[6, 5]`` probabilities outside a head: none, one token, a light and a heavy spread tail, ..."""
    return torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0],
                         [0.0, 0.2, 0.0, 0.0, 0.0],
                         [0.01, 0.01, 0.01, 0.01, 0.01],
                         [0.1, 0.1, 0.1, 0.1, 0.1],
                         [0.3, 0.05, 0.05, 0.05, 0.05],
                         [0.02, 0.0, 0.0, 0.01, 0.0]])


def test_counts_spend_the_budget_where_one_draw_leaves_most_error():
    rest = _tails()
    counts = allocate_draws(rest, 30)
    assert int(counts.sum()) == 30
    assert counts[0] == 0 and counts[1] == 1  # no tail mass: no draw; one token: one draw is exact
    a = (rest.sum(-1) ** 2 - rest.square().sum(-1)).tolist()  # the error one draw leaves at each position

    def error(d):
        return sum(x / n for x, n in zip(a, d) if x > 0)

    best = min(error((0, 1, d2, d3, d4, 29 - d2 - d3 - d4)) for d2 in range(1, 27) for d3 in range(1, 28 - d2)
               for d4 in range(1, 29 - d2 - d3))  # every split of the 29 draws the spread tails can use
    got = error(counts.tolist())
    assert got <= 1.01 * best and counts[3] > counts[4] > counts[2] >= 1
    assert got < 0.8 * error([5] * 6)  # the same 30 draws, 5 per position


def test_every_position_with_tail_mass_gets_a_draw_and_none_more_than_the_cap():
    rest = torch.full((4, 10), 0.01)
    rest[0] = torch.linspace(0.0, 0.5, 10)
    rest[1:, 1:] = 0.0  # three one-token tails: drawing them more lowers no error
    counts = allocate_draws(rest, 4 * 400)
    assert counts.tolist() == [MAX_ALLOCATED, 1, 1, 1]  # the rest of the budget is not spent
    with pytest.raises(ValueError, match="cannot give each of 4 positions"):
        allocate_draws(rest, 3)


def test_allocated_draws_are_unbiased_per_position():
    rest = _tails()
    total = torch.zeros_like(rest, dtype=torch.float64)
    runs = 3000
    for seed in range(runs):
        drawn = draw_allocated(rest, 30, torch.Generator().manual_seed(seed))
        for t in range(rest.shape[0]):
            ids = drawn[t][drawn[t] >= 0]
            if ids.numel():
                total[t].index_add_(0, ids, torch.full((ids.numel(),), float(rest[t].sum()) / ids.numel(),
                                                       dtype=torch.float64))
    torch.testing.assert_close(total / runs, rest.double(), atol=0.006, rtol=0)


def _compute(teacher: FakeTeacher, draw: str):
    def fn(batch):
        rows = []
        for e in batch:
            ids, lp, tail, extra = row_signal(teacher.logits(e.input_ids), e.uid, signal="topk_sampled", k=4,
                                              tail_draws=6, loss_temperature=1.0, draw=draw)
            rows.append(SequenceSignal(e.uid, ids, lp, tail, extra=extra))
        return rows
    return fn


def _header(exs, draw="allocated", signal="topk_sampled"):
    return make_header(exs, teacher_identity="fake", tokenizer_hash="h", vocab_size=V, k=4, loss_temperature=1.0,
                       logprob_dtype="int8", shard_tokens=200, signal=signal, tail_draws=6, draw=draw)


def test_an_allocated_store_packs_the_draws_and_reads_back_each_row(tmp_path):
    from safetensors.torch import load_file

    exs, teacher = examples(12), FakeTeacher()  # sure at some positions, spread at others: rows up to 12 draws
    compute = _compute(teacher, "allocated")
    manifest = write_store(tmp_path / "s", _header(exs), exs, compute, log=lambda _m: None)
    assert manifest["format_version"] == 2 and manifest["draw"] == "allocated" and manifest["num_shards"] > 1
    shard = load_file(str(tmp_path / "s" / manifest["shards"][1]["file"]))
    assert shard["tail_counts"].dtype == torch.uint8 and shard["tail_ids"].dim() == 1
    assert int(shard["tail_counts"].long().sum()) == shard["tail_ids"].numel()
    reader = StoreReader(tmp_path / "s")
    assert "6 tail tokens drawn per position on average (allocated)" in reader.summary()
    for e in exs:
        row = compute([e])[0]
        want = loss_rows("topk_sampled", row.topk_ids_tk, row.topk_logprobs_tk, row.tail_logmass_t,
                         row.extra["tail_ids"])
        ids, lp, tail, _ = reader.sequence(e.uid)
        assert torch.equal(ids, want[0])
        torch.testing.assert_close(lp.exp(), want[1].exp(), atol=0.01, rtol=0)  # int8 head codes
    from stillroom.data.batch import collate

    signal = StoreTeacher(reader).signal(collate(exs[:3], 0))  # rows of several widths in one batch
    widest = max(reader.sequence(e.uid)[0].shape[1] for e in exs[:3])
    assert signal.topk_ids_btk.shape[-1] == widest > 4 + 6  # wider than k + tail_draws
    for b, e in enumerate(exs[:3]):
        n = len(e.input_ids)
        mass = signal.topk_logprobs_btk[b, :n].exp().sum(-1)
        torch.testing.assert_close(mass, torch.ones(n), atol=1e-3, rtol=0)


def test_a_resumed_allocated_store_is_byte_identical_and_other_draws_are_not_resumed(tmp_path):
    from stillroom.teachers.store_writer import StoreWriter

    exs, teacher = examples(12), FakeTeacher(scale=1.0)
    first = write_store(tmp_path / "a", _header(exs), exs, _compute(teacher, "allocated"), log=lambda _m: None)
    again = json.loads((tmp_path / "a" / "manifest.json").read_text())
    (tmp_path / "a" / again["shards"][-1]["file"]).unlink()  # a lost shard: written again
    second = write_store(tmp_path / "a", _header(exs), exs, _compute(teacher, "allocated"), log=lambda _m: None)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]
    with pytest.raises(StoreError, match="draw \\(store 'allocated', run 'multinomial'\\)"):
        StoreWriter(tmp_path / "a", _header(exs, draw="multinomial"), exs)


def test_allocated_draws_need_the_topk_sampled_signal():
    exs = examples(2)
    with pytest.raises(StoreError, match="allocated with signal topk_sampled"):
        _header(exs, signal="sampled")
    from stillroom.config.load import ConfigError, load_config

    with pytest.raises((ConfigError, ValueError), match="teacher.store.draw: allocated"):
        load_config(None, ["teacher.source=store", "teacher.store.signal=sampled", "teacher.store.draw=allocated"])
