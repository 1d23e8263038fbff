"""``teacher.store.id_code: ranked``: ids coded by their rank in each shard's frequency table (store_ids.py)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from test_store_fixtures import V, FakeTeacher, examples

from stillroom.teachers.store_format import SequenceSignal, StoreError
from stillroom.teachers.store_ids import (
    choose_widths, decode_ids, decode_stream, encode_ids, encode_stream, pack_bits, rank_table, unpack_bits,
)
from stillroom.teachers.store_reader import StoreReader, StoreTeacher
from stillroom.teachers.store_sampled import row_signal
from stillroom.teachers.store_writer import StoreWriter, make_header, write_store


@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 9, 13, 16, 17, 25])
def test_packed_bits_equal_numpys_bit_packing_and_read_back(width):
    rng = np.random.default_rng(width)
    for n in (0, 1, 3, 8, 1001):
        values = rng.integers(0, 1 << width, n)
        packed = pack_bits(values, width)
        reference = np.packbits(((values[:, None] >> np.arange(width)) & 1).astype(np.uint8).reshape(-1),
                                bitorder="little")
        assert packed.tobytes() == reference.tobytes()
        assert np.array_equal(unpack_bits(packed, width, n), values)
    with pytest.raises(ValueError, match="wider than 25 bits"):
        pack_bits(np.ones(3, dtype=np.int64), 26)


def _zipf_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    return torch.randperm(vocab, generator=g)[torch.multinomial(p, n, replacement=True, generator=g)]


def test_the_widths_are_the_fewest_bits_of_any_four_classes():
    ranks = rank_of_ids(_zipf_ids(3000, 200, 0))
    distinct = int(ranks.max()) + 1
    counts = np.bincount(ranks.numpy(), minlength=distinct)

    def bits(ws):  # classes of 2**w consecutive ranks; None where the four do not cover every rank
        starts = np.cumsum([0] + [1 << w for w in ws])
        if starts[-1] < distinct:
            return None
        return sum(int(counts[starts[c] : starts[c + 1]].sum()) * w for c, w in enumerate(ws))

    every = [b for ws in itertools.product(range(9), repeat=4) if (b := bits(ws)) is not None]
    chosen = choose_widths(ranks, distinct)
    assert bits(chosen) == min(every)
    assert bits(chosen) < 0.85 * len(ranks) * 8  # a skewed table codes well under log2(200) ~ 7.6 bits an id


def test_three_distinct_ids_need_no_index_bits():
    ids = torch.tensor([5, 9, 5, 2, 9, 5] * 10)
    coded = encode_stream(ids, 12)
    assert coded["layout"][:4].tolist() == [0, 0, 0, 0] and coded["bits"].numel() == 0  # the class says which id
    assert torch.equal(decode_stream(coded), ids)


def rank_of_ids(ids: torch.Tensor) -> torch.Tensor:
    table = rank_table(ids, int(ids.max()) + 1)
    rank_of = torch.zeros(int(ids.max()) + 1, dtype=torch.int64)
    rank_of[table] = torch.arange(table.numel())
    return rank_of[ids]


@pytest.mark.parametrize("shape, vocab", [((500, 8), 49152), ((777,), 300), ((1, 1), 5), ((0,), 10),
                                          ((64, 3), 300_000)])
def test_a_coded_tensor_reads_back_exactly(shape, vocab):
    n = int(np.prod(shape))
    ids = _zipf_ids(max(n, 1), vocab, 1)[:n].reshape(shape)
    if shape == (1, 1):
        ids = torch.tensor([[4]])
    dtype = torch.int32 if vocab > 65536 else torch.uint16
    plain = {"topk_ids": ids.to(dtype), "offsets": torch.tensor([0, shape[0]])}
    coded = encode_ids(plain, vocab)
    assert "topk_ids" not in coded and coded["topk_ids.present"].numel() == (vocab + 7) // 8
    back = decode_ids(coded, dtype)
    assert set(back) == set(plain) and back["topk_ids"].dtype == dtype
    assert torch.equal(back["topk_ids"], plain["topk_ids"])
    assert decode_ids(plain, dtype) is plain  # a plain shard passes through


def test_one_class_can_hold_the_most_frequent_id_in_zero_bits():
    ids = torch.cat([torch.full((900,), 7), torch.arange(8, 108)])  # one id 90% of the time
    coded = encode_stream(ids, 108)
    assert int(coded["layout"][0]) == 0  # class 0: that id alone, no index bits
    assert coded["bits"].numel() < 100  # the 100 other ids: about 7 bits each
    assert torch.equal(decode_stream(coded), ids)


# ---------------------------------------------------------------- through real stores


def _compute(teacher: FakeTeacher, signal: str, draw: str):
    def fn(batch):
        rows = []
        for e in batch:
            lg = teacher.logits(e.input_ids)
            ids, lp, tail, extra = row_signal(lg, e.uid, signal=signal, k=4, tail_draws=6, loss_temperature=1.0,
                                              draw=draw)
            hidden = {0: teacher.hidden[0][torch.tensor(e.input_ids)]}
            rows.append(SequenceSignal(e.uid, ids, lp, tail, hidden, extra=extra))
        return rows
    return fn


def _header(exs, signal, draw, id_code):
    return make_header(exs, teacher_identity="fake", tokenizer_hash="h", vocab_size=V, k=4, loss_temperature=1.0,
                       logprob_dtype="int8", hidden_layers=[0], hidden_size=8, shard_tokens=200, signal=signal,
                       tail_draws=6, draw=draw, id_code=id_code)


@pytest.mark.parametrize("signal, draw", [("topk", "multinomial"), ("topk_sampled", "multinomial"),
                                          ("topk_sampled", "allocated"), ("sampled", "multinomial")])
def test_a_ranked_store_reads_back_bit_for_bit_what_a_plain_one_holds(tmp_path, signal, draw):
    exs, teacher = examples(30), FakeTeacher(scale=1.0)
    compute = _compute(teacher, signal, draw)
    plain = write_store(tmp_path / "plain", _header(exs, signal, draw, "plain"), exs, compute, log=lambda _m: None)
    ranked = write_store(tmp_path / "ranked", _header(exs, signal, draw, "ranked"), exs, compute,
                         log=lambda _m: None)
    assert ranked["format_version"] == 3 and ranked["id_code"] == "ranked" and ranked["num_shards"] > 1
    assert plain["id_code"] == "plain" and plain["format_version"] in (1, 2)
    ids_bytes = {}
    for name, m in (("plain", plain), ("ranked", ranked)):
        from safetensors.torch import load_file

        shards = [load_file(str(tmp_path / name / s["file"])) for s in m["shards"]]
        ids_bytes[name] = sum(t.numel() * t.element_size() for s in shards for key, t in s.items() if "ids" in key)
    assert ids_bytes["ranked"] < 0.75 * ids_bytes["plain"]  # ~8.2 bits of 16 for V = 300, even with the tables
    a, b = StoreReader(tmp_path / "plain"), StoreReader(tmp_path / "ranked")
    assert "id_code ranked" in b.summary() and "id_code" not in a.summary()
    for e in exs:
        for x, y in zip(a.sequence(e.uid), b.sequence(e.uid)):
            if isinstance(x, dict):
                assert x.keys() == y.keys() and all(torch.equal(x[i], y[i]) for i in x)
            else:
                assert torch.equal(x, y)
    from stillroom.data.batch import collate

    batch = collate(exs[:4], 0)
    sa, sb = StoreTeacher(a).signal(batch), StoreTeacher(b).signal(batch)
    assert torch.equal(sa.topk_ids_btk, sb.topk_ids_btk) and torch.equal(sa.topk_logprobs_btk, sb.topk_logprobs_btk)


def test_a_resumed_ranked_store_is_byte_identical_and_a_plain_one_is_not_resumed_into_it(tmp_path):
    exs, teacher = examples(20), FakeTeacher(scale=1.0)
    compute = _compute(teacher, "topk_sampled", "allocated")
    first = write_store(tmp_path / "a", _header(exs, "topk_sampled", "allocated", "ranked"), exs, compute,
                        log=lambda _m: None)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    (tmp_path / "a" / manifest["shards"][0]["file"]).unlink()
    second = write_store(tmp_path / "a", _header(exs, "topk_sampled", "allocated", "ranked"), exs, compute,
                         log=lambda _m: None)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]
    with pytest.raises(StoreError, match="id_code \\(store 'ranked', run 'plain'\\)"):
        StoreWriter(tmp_path / "a", _header(exs, "topk_sampled", "allocated", "plain"), exs)
    with pytest.raises(StoreError, match="id_code 'huffman'; valid: plain, ranked"):
        _header(exs, "topk", "multinomial", "huffman")


def test_the_recipe_field_reaches_the_header():
    from stillroom.config.load import load_config

    cfg = load_config(None, ["teacher.source=store", "teacher.store.id_code=ranked"])
    assert cfg.teacher.store.id_code == "ranked"
    from stillroom.config.load import ConfigError

    with pytest.raises((ConfigError, ValueError), match="id_code"):
        load_config(None, ["teacher.source=store", "teacher.store.id_code=gzip"])
