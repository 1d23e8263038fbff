"""The draw seed of sampled stores: another seed is another realisation of the same unbiased signal; seed 0 is
what every store written before the field holds, and such stores still load and resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_store_fixtures import V, FakeTeacher, examples

from stillroom.teachers.store_format import MANIFEST, SequenceSignal, StoreError, legacy_fields
from stillroom.teachers.store_reader import StoreReader
from stillroom.teachers.store_sampled import draw_tail, loss_rows, row_signal, sequence_generator, topk_signal
from stillroom.teachers.store_writer import StoreWriter, make_header, write_store

ROOT = Path(__file__).resolve().parents[3]


def _rows(logits, uid, seed, signal="topk_sampled"):
    return row_signal(logits, uid, signal=signal, k=3, tail_draws=5, loss_temperature=1.0, draw_seed=seed)


@pytest.mark.parametrize("signal", ["sampled", "topk_sampled"])
def test_seed_0_is_the_old_draws_and_another_seed_other_draws_of_the_same_head(signal):
    logits = FakeTeacher().logits(examples(1)[0].input_ids)
    ids0, lp0, tail0, extra0 = _rows(logits, "u", 0, signal)
    old = (topk_signal(logits, 3, 1.0)[0] if signal == "topk_sampled" else None)
    if signal == "topk_sampled":  # seed 0 draws exactly what the stores written before draw_seed hold
        assert torch.equal(extra0["tail_ids"], draw_tail(logits, old, 5, 1.0, sequence_generator(0, "u")))
    ids1, lp1, tail1, extra1 = _rows(logits, "u", 1, signal)
    assert torch.equal(ids0, _rows(logits, "u", 0, signal)[0])  # deterministic
    drawn0, drawn1 = (extra0["tail_ids"], extra1["tail_ids"]) if signal == "topk_sampled" else (ids0, ids1)
    assert not torch.equal(drawn0, drawn1)
    if signal == "topk_sampled":  # the exact head does not depend on the seed
        assert torch.equal(ids0, ids1) and torch.equal(lp0, lp1) and torch.equal(tail0, tail1)


def test_the_mean_over_draw_seeds_is_the_teacher():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    p = torch.softmax(logits[0], -1)
    total = torch.zeros(8)
    seeds = 3000
    for seed in range(seeds):
        ids, lp, tail, extra = _rows(logits, "u", seed)
        ids, lp, _ = loss_rows("topk_sampled", ids, lp, tail, extra["tail_ids"])
        total.scatter_add_(0, ids[0], lp[0].exp())
    # the 5 tail draws' frequencies times the tail mass; sd of a token's mean over 3000 seeds < 0.003
    torch.testing.assert_close(total / seeds, p, atol=0.01, rtol=0)


def _store(tmp_path, seed: int):
    exs, teacher = examples(6), FakeTeacher()

    def compute(batch):
        out = []
        for e in batch:
            ids, lp, tail, extra = _rows(teacher.logits(e.input_ids), e.uid, seed)
            out.append(SequenceSignal(e.uid, ids, lp, tail, extra=extra))
        return out

    header = make_header(exs, teacher_identity="fake", tokenizer_hash="h", vocab_size=V, k=3, loss_temperature=1.0,
                         logprob_dtype="int8", shard_tokens=1024, signal="topk_sampled", tail_draws=5,
                         draw_seed=seed)
    return exs, header, write_store(tmp_path / "store", header, exs, compute, log=lambda _m: None)


def test_the_manifest_records_the_seed_and_a_legacy_manifest_reads_and_resumes_as_seed_0(tmp_path):
    exs, header, manifest = _store(tmp_path, 0)
    assert manifest["draw_seed"] == 0
    del manifest["draw_seed"]  # as a store written before the field
    (tmp_path / "store" / MANIFEST).write_text(json.dumps(manifest))
    assert legacy_fields(manifest)["draw_seed"] == 0
    logs = []
    StoreWriter(tmp_path / "store", header, exs, log=logs.append).close()  # resumed, not refused
    assert "already complete" in logs[0]
    assert StoreReader(tmp_path / "store").sequence(exs[0].uid)[0].shape[-1] == 8
    other = make_header(exs, teacher_identity="fake", tokenizer_hash="h", vocab_size=V, k=3, loss_temperature=1.0,
                        logprob_dtype="int8", shard_tokens=1024, signal="topk_sampled", tail_draws=5, draw_seed=1)
    with pytest.raises(StoreError, match="draw_seed \\(store 0, run 1\\)"):
        StoreWriter(tmp_path / "store", other, exs)


def test_a_seed_is_only_for_drawn_signals_and_never_negative(tmp_path):
    exs = examples(2)
    kw = dict(teacher_identity="fake", tokenizer_hash="h", vocab_size=V, k=3, loss_temperature=1.0,
              logprob_dtype="int8", shard_tokens=1024)
    assert make_header(exs, draw_seed=4, **kw).draw_seed == 0  # topk: nothing is drawn
    with pytest.raises(StoreError, match="draw_seed -1"):
        make_header(exs, signal="sampled", draw_seed=-1, **kw)


def test_the_bench_variant_names_carry_the_draw_seed_and_kind():
    sys.path.insert(0, str(ROOT / "bench"))
    from store_size import draw_kind, draw_seed, parse_variant, tail_draws

    assert (parse_variant("k8/int4+t18-sys-d2"), tail_draws("k8/int4+t18-sys-d2")) == ((8, "int4", None), 18)
    assert (draw_seed("k8/int4+t18-sys-d2"), draw_kind("k8/int4+t18-sys-d2")) == (2, "systematic")
    assert (draw_seed("k8/int8+t16"), draw_kind("k8/int8+t16-d1")) == (0, "multinomial")
    assert parse_variant("k16/int8-f32scale") == (16, "int8", "float32") and draw_seed("k32/sampled-d3") == 3
