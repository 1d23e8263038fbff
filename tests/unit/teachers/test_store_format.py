"""Teacher store format: round trip, dtypes, int8 error bound, tail consistency, top-k KL bounds."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_store_fixtures import H, V, FakeTeacher, examples, header

from stillroom.losses import forward_kl, reverse_kl
from stillroom.teachers.signal import TeacherSignal, tail_logmass
from stillroom.teachers.store_format import (
    MANIFEST,
    StoreError,
    data_fingerprint,
    decode_logprobs,
    dequantize_int8,
    id_dtype_for,
    parse_identity,
    quantize_int8,
)
from stillroom.teachers.store_reader import StoreReader
from stillroom.teachers.store_sampled import topk_signal
from stillroom.teachers.store_writer import plan_shards, write_store


def _write(tmp_path, k=16, dtype="float16", temperature=1.0, n=30, shard_tokens=200, name="store"):
    exs = examples(n)
    h = header(exs, k=k, logprob_dtype=dtype, temperature=temperature, shard_tokens=shard_tokens)
    teacher = FakeTeacher()
    manifest = write_store(tmp_path / name, h, exs, teacher.compute(k, temperature), log=lambda s: None)
    return exs, teacher, manifest, StoreReader(tmp_path / name)


def test_id_dtype_is_the_smallest_that_holds_the_vocabulary():
    assert id_dtype_for(256) == "uint8"
    assert id_dtype_for(257) == "int16"
    assert id_dtype_for(32768) == "int16"
    assert id_dtype_for(49152) == "uint16"  # SmolLM2
    assert id_dtype_for(65536) == "uint16"
    assert id_dtype_for(65537) == "int32"


def test_topk_signal_tail_matches_log_one_minus_sum():
    logits = torch.randn(7, V) * 3
    ids, lp, tail = topk_signal(logits, 20, 1.0)
    dense = torch.log_softmax(logits, -1)
    assert torch.equal(lp, dense.gather(-1, ids))
    assert torch.allclose(tail, tail_logmass(lp), atol=1e-5)
    _, _, full_tail = topk_signal(logits, V, 1.0)
    assert torch.isneginf(full_tail).all()


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-6), ("float16", 2e-2), ("bfloat16", 0.1)])
def test_round_trip_by_uid(tmp_path, dtype, atol):
    exs, teacher, manifest, reader = _write(tmp_path, dtype=dtype, temperature=2.0)
    assert manifest["complete"] and manifest["num_shards"] == len(manifest["shards"]) > 1
    assert manifest["tokens"] == sum(len(e.input_ids) for e in exs)
    assert manifest["data_fingerprint"] == data_fingerprint(exs)
    assert manifest["id_dtype"] == "int16" and manifest["teacher"]["weight_hash"] == "0123456789abcdef"
    for e in reversed(exs):  # arbitrary order: random access by uid
        ids, lp, tail, hidden = reader.sequence(e.uid)
        want_ids, want_lp, want_tail = topk_signal(teacher.logits(e.input_ids), 16, 2.0)
        assert torch.equal(ids, want_ids)
        assert torch.allclose(lp, want_lp, atol=atol, rtol=0.01)
        assert torch.allclose(tail, want_tail, atol=atol, rtol=0.01)
        # Renormalised: the K + 1 bins sum to one.
        total = torch.logsumexp(torch.cat([lp, tail.unsqueeze(-1)], -1), -1)
        assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)
        assert set(hidden) == {0, 2} and hidden[0].shape == (len(e.input_ids), H)
        assert torch.allclose(hidden[2], teacher.hidden[2][torch.tensor(e.input_ids)], atol=0.05, rtol=0.01)


def test_shards_are_plain_safetensors_with_self_describing_metadata(tmp_path):
    from safetensors import safe_open

    exs, _, manifest, _ = _write(tmp_path, k=8)
    entry = manifest["shards"][1]
    with safe_open(str(tmp_path / "store" / entry["file"]), framework="pt") as f:
        meta = json.loads(f.metadata()["stillroom"])
        assert meta["uids"] == entry["uids"] and meta["k"] == 8
        assert f.get_tensor("topk_ids").dtype == torch.int16
        assert f.get_tensor("topk_logprobs").shape == (entry["tokens"], 8)
        assert f.get_tensor("offsets")[-1] == entry["tokens"]
    assert json.loads((tmp_path / "store" / MANIFEST).read_text())["store_bytes"] == sum(
        s["bytes"] for s in manifest["shards"])


def test_plan_shards_keeps_sequences_whole_and_in_order():
    plan = plan_shards([5, 5, 5, 10, 1, 1], shard_tokens=10)
    assert plan == [[0, 1], [2, 3], [4, 5]]
    assert plan_shards([30], 10) == [[0]]


def test_header_refuses_k_larger_than_vocabulary():
    with pytest.raises(StoreError, match=r"k=301 must lie in \[1, vocab_size=300\]"):
        header(examples(3), k=V + 1)


def test_parse_identity():
    got = parse_identity("local:/a@b/model@main#sha256:00ff")
    assert got == {"identity": "local:/a@b/model@main#sha256:00ff", "name": "local:/a@b/model",
                   "revision": "main", "weight_hash": "00ff"}


# ------------------------------------------------------------------ int8


def test_int8_error_is_bounded_by_half_a_step():
    lp = torch.log_softmax(torch.randn(500, V) * 4, -1).topk(64, -1).values
    codes, hi, step = quantize_int8(lp)
    assert codes.dtype == torch.uint8
    back = dequantize_int8(codes, hi, step)
    err = (back - lp).abs()
    assert (err <= step.unsqueeze(-1) / 2 + 1e-5).all()
    assert torch.equal(back[:, 0], lp[:, 0])  # the maximum is exact
    # Documented bound: range / 510 nats.
    assert float(err.max()) <= float(((lp.max(-1).values - lp.min(-1).values) / 510).max()) + 1e-5


def test_int8_store_stays_close_and_consistent(tmp_path):
    exs, teacher, _, reader = _write(tmp_path, k=32, dtype="int8")
    worst_kl = 0.0
    for e in exs:
        _, lp, tail, _ = reader.sequence(e.uid)
        _, want_lp, want_tail = topk_signal(teacher.logits(e.input_ids), 32, 1.0)
        exact = torch.cat([want_lp, want_tail.unsqueeze(-1)], -1)
        got = torch.cat([lp, tail.unsqueeze(-1)], -1)
        assert torch.allclose(torch.logsumexp(got, -1), torch.zeros(len(e.input_ids)), atol=1e-5)
        kl = (exact.exp() * (exact - got)).sum(-1)  # KL(exact bins || stored bins)
        worst_kl = max(worst_kl, float(kl.max()))
    assert worst_kl < 5e-3


# ------------------------------------------------------------------ top-k KL never negative, never above dense


def _topk_signal_from(teacher_logits, k, dtype):
    ids, lp, tail = topk_signal(teacher_logits, k, 1.0)
    if dtype == "int8":
        lp = dequantize_int8(*quantize_int8(lp))
    else:
        lp = lp.to(getattr(torch, dtype)).float()
    tail = tail.to(torch.float16).float()
    tensors = {"topk_logprobs": lp, "tail_logmass": tail}
    lp, tail = decode_logprobs(tensors, 0, lp.shape[0])
    return TeacherSignal(topk_ids_btk=ids.unsqueeze(0), topk_logprobs_btk=lp.unsqueeze(0),
                         tail_logmass_bt=tail.unsqueeze(0))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 4, 16, 64]),
       dtype=st.sampled_from(["float16", "bfloat16", "int8"]), sharp=st.floats(0.1, 8.0))
def test_topk_kl_from_a_store_is_never_negative_and_at_most_dense(seed, k, dtype, sharp):
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(12, V, generator=g) * sharp
    s_logits = (t_logits + torch.randn(12, V, generator=g) * 0.3).unsqueeze(0)
    sig = _topk_signal_from(t_logits, k, dtype)
    mask = torch.ones(1, 12, dtype=torch.bool)
    for fn in (forward_kl, reverse_kl):
        sparse_sum, _ = fn(s_logits, sig, mask)
        assert float(sparse_sum) >= 0.0
        dense_sum, _ = fn(s_logits, t_logits.unsqueeze(0), mask)
        # Data-processing inequality; slack for storage rounding of the teacher.
        assert float(sparse_sum) <= float(dense_sum) * 1.02 + 0.02
    # The student equal to the teacher: ~0 even after quantisation.
    same, _ = forward_kl(t_logits.unsqueeze(0), sig, mask)
    assert 0.0 <= float(same) < (0.05 if dtype != "float16" else 5e-3) * 12


def test_k_equal_v_float32_matches_dense_kl_exactly():
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(2, 9, V, generator=g) * 3
    s_logits = torch.randn(2, 9, V, generator=g)
    ids, lp, tail = topk_signal(t_logits, V, 1.0)
    lp, tail = decode_logprobs({"topk_logprobs": lp.reshape(-1, V), "tail_logmass": tail.reshape(-1)}, 0, 18)
    sig = TeacherSignal(topk_ids_btk=ids, topk_logprobs_btk=lp.reshape(2, 9, V), tail_logmass_bt=tail.reshape(2, 9))
    mask = torch.rand(2, 9, generator=g) > 0.3
    sparse, n1 = forward_kl(s_logits, sig, mask)
    dense, n2 = forward_kl(s_logits, t_logits, mask)
    assert n1 == n2 and math.isclose(float(sparse), float(dense), rel_tol=1e-5, abs_tol=1e-5)
