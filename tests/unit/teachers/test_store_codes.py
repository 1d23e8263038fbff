"""Quantised store log-probs: float16 row scales, the int4 mode, and stores written with float32 scales."""

import dataclasses
import json

import pytest
import torch
from test_store_fixtures import V, FakeTeacher, examples, header

from stillroom.config.core import StoreConfig
from stillroom.losses import forward_kl
from stillroom.teachers.signal import TeacherSignal
from stillroom.teachers.store_codes import dequantize, pack_nibbles, quantize, unpack_nibbles
from stillroom.teachers.store_format import MANIFEST, SequenceSignal, StoreError, decode_logprobs, encode_rows
from stillroom.teachers.store_reader import StoreReader
from stillroom.teachers.store_sampled import topk_signal
from stillroom.teachers.store_writer import StoreWriter, make_header, write_store


def _lp(n=400, k=64, sharp=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, V, generator=g) * sharp, -1).topk(k, -1).values


def _half_ulp(x: torch.Tensor) -> torch.Tensor:
    x16 = x.to(torch.float16)
    return (torch.nextafter(x16, torch.full_like(x16, float("-inf"))).float() - x16.float()).abs() / 2


@pytest.mark.parametrize("levels", [255, 15])
@pytest.mark.parametrize("sharp", [0.5, 4.0, 20.0])
def test_float16_scales_keep_the_error_within_half_a_step(levels, sharp):
    lp = _lp(sharp=sharp)
    codes, hi, step = quantize(lp, levels, "float16")
    assert hi.dtype == step.dtype == torch.float16 and codes.dtype == torch.uint8 and int(codes.max()) <= levels
    back = dequantize(codes, hi, step)
    err = (back - lp).abs()
    # The stored step spans the stored max to the row minimum, rounded up by at most one float16 ulp (2^-10).
    want = (hi.float() - lp.min(-1).values) / levels
    assert (step.float() >= want).all() and (step.float() <= want * (1 + 2**-10)).all()
    below = lp <= hi.float().unsqueeze(-1)  # every value but a row maximum that float16 rounded down
    assert (err[below] <= (step.float().unsqueeze(-1) / 2 + 1e-5).expand_as(err)[below]).all()
    bound = torch.maximum(step.float() / 2, _half_ulp(lp.max(-1).values)) + 1e-5
    assert (err <= bound.unsqueeze(-1)).all()


def test_float32_scales_are_the_original_int8_coder():
    lp = _lp()
    codes, hi, step = quantize(lp, 255, "float32")
    assert hi.dtype == torch.float32 and torch.equal(hi, lp[:, 0])  # the maximum is exact
    assert torch.equal(step, (lp[:, 0] - lp[:, -1]) / 255)
    assert torch.equal(codes, ((hi.unsqueeze(-1) - lp) / step.unsqueeze(-1)).round().to(torch.uint8))


@pytest.mark.parametrize("k", [1, 2, 7, 16, 33])
def test_nibbles_round_trip(k):
    codes = torch.randint(0, 16, (50, k), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (50, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed, k), codes)
    assert torch.equal(packed[:, 0] & 0x0F, codes[:, 0])  # column 0 in the low nibble


def _write(tmp_path, k, dtype, name="s", **hdr):
    exs = examples(30)
    h = header(exs, k=k, logprob_dtype=dtype, layers=(), shard_tokens=200)
    for key, value in hdr.items():
        setattr(h, key, value)
    teacher = FakeTeacher()
    m = write_store(tmp_path / name, h, exs, teacher.compute(k, 1.0, layers=()), log=lambda s: None)
    return exs, teacher, m, StoreReader(tmp_path / name)


@pytest.mark.parametrize("k", [8, 15])
def test_int4_store_round_trip(tmp_path, k):
    exs, teacher, m, reader = _write(tmp_path, k, "int4")
    assert m["logprob_dtype"] == "int4" and m["scale_dtype"] == "float16"
    shard = reader.shard(0)
    assert "topk_logprob_codes" not in shard and "topk_logprobs" not in shard
    assert shard["topk_logprob_nibbles"].shape == (int(shard["offsets"][-1]), (k + 1) // 2)
    assert shard["logprob_max"].dtype == shard["logprob_step"].dtype == torch.float16
    for e in exs:
        ids, lp, tail, _ = reader.sequence(e.uid)
        want_ids, want_lp, want_tail = topk_signal(teacher.logits(e.input_ids), k, 1.0)
        assert torch.equal(ids, want_ids)
        got = torch.cat([lp, tail.unsqueeze(-1)], -1)
        exact = torch.cat([want_lp, want_tail.unsqueeze(-1)], -1)
        assert torch.allclose(torch.logsumexp(got, -1), torch.zeros(len(e.input_ids)), atol=1e-5)
        # Before renormalisation every value is within half a step (range / 30) of the exact one.
        raw = dequantize(unpack_nibbles(pack_nibbles(quantize(want_lp, 15, "float16")[0]), k),
                         *quantize(want_lp, 15, "float16")[1:])
        half = (want_lp[:, 0] - want_lp[:, -1]) / 30 * (1 + 2**-10) + _half_ulp(want_lp[:, 0]) + 1e-5
        assert ((raw - want_lp).abs() <= half.unsqueeze(-1)).all()
        kl = (exact.exp() * (exact - got)).sum(-1)
        assert float(kl.max()) < 0.1 and float(kl.min()) >= -1e-6


def test_float16_scales_save_four_bytes_per_position(tmp_path):
    *_, new, _ = _write(tmp_path, 16, "int8", name="new")
    *_, old, _ = _write(tmp_path, 16, "int8", name="old", scale_dtype="float32")
    assert new["scale_dtype"] == "float16" and old["scale_dtype"] == "float32"
    saved = (old["store_bytes"] - new["store_bytes"]) / new["tokens"]
    assert abs(saved - 4.0) < 0.05  # shard headers differ by a few bytes only


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantised_topk_kl_is_never_negative(dtype):
    g = torch.Generator().manual_seed(3)
    t_logits = torch.randn(12, V, generator=g) * 3
    s_logits = (t_logits + torch.randn(12, V, generator=g) * 0.3).unsqueeze(0)
    ids, lp, tail = topk_signal(t_logits, 16, 1.0)
    hdr = make_header(examples(1), teacher_identity="t", tokenizer_hash="a", vocab_size=V, k=16,
                      loss_temperature=1.0, logprob_dtype=dtype)
    tensors = encode_rows([SequenceSignal("x", ids, lp, tail)], hdr)
    dlp, dtail = decode_logprobs(tensors, 0, 12)
    sig = TeacherSignal(topk_ids_btk=ids.unsqueeze(0), topk_logprobs_btk=dlp.unsqueeze(0),
                        tail_logmass_bt=dtail.unsqueeze(0))
    mask = torch.ones(1, 12, dtype=torch.bool)
    est, _ = forward_kl(s_logits, sig, mask)
    dense, _ = forward_kl(s_logits, t_logits.unsqueeze(0), mask)
    assert 0.0 <= float(est) <= float(dense) * 1.05 + 0.05


def _strip_scale_dtype(folder):
    """Make a manifest look like one written before ``scale_dtype`` existed."""
    path = folder / MANIFEST
    m = json.loads(path.read_text())
    del m["scale_dtype"]
    path.write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")


def test_store_with_float32_scales_and_no_scale_dtype_field_still_loads(tmp_path):
    exs, teacher, _, _ = _write(tmp_path, 16, "int8", name="old", scale_dtype="float32")
    _strip_scale_dtype(tmp_path / "old")
    reader = StoreReader(tmp_path / "old")
    assert reader.shard(0)["logprob_max"].dtype == torch.float32
    for e in exs[:5]:
        _, lp, tail, _ = reader.sequence(e.uid)
        _, want_lp, want_tail = topk_signal(teacher.logits(e.input_ids), 16, 1.0)
        exact = torch.cat([want_lp, want_tail.unsqueeze(-1)], -1)
        got = torch.cat([lp, tail.unsqueeze(-1)], -1)
        assert float((exact.exp() * (exact - got)).sum(-1).max()) < 5e-3


def test_resuming_a_float32_scale_store_keeps_float32_scales(tmp_path):
    exs = examples(30)
    teacher = FakeTeacher()
    compute = teacher.compute(16, 1.0, layers=())

    def hdr(scale=None):
        h = header(exs, k=16, logprob_dtype="int8", layers=(), shard_tokens=200)
        if scale:
            h.scale_dtype = scale
        return h

    full = write_store(tmp_path / "full", hdr("float32"), exs, compute, log=lambda s: None)
    w = StoreWriter(tmp_path / "part", hdr("float32"), exs, log=lambda s: None)
    w.write_shard(0, compute(w.shard_examples(0)))
    w.close()
    _strip_scale_dtype(tmp_path / "part")  # an interrupted store of the code before float16 scales
    resumed = write_store(tmp_path / "part", hdr(), exs, compute, log=lambda s: None)  # default header: float16
    assert resumed["scale_dtype"] == "float32"
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in full["shards"]]


def test_overwriting_a_float32_scale_store_of_another_run_uses_float16(tmp_path):
    exs = examples(30)
    old = header(exs, k=16, logprob_dtype="int8", layers=(), shard_tokens=200)
    old.scale_dtype = "float32"
    write_store(tmp_path / "s", old, exs, FakeTeacher().compute(16, 1.0, layers=()), log=lambda s: None)
    _strip_scale_dtype(tmp_path / "s")
    new = header(exs, k=8, logprob_dtype="int8", layers=(), shard_tokens=200)
    m = write_store(tmp_path / "s", new, exs, FakeTeacher().compute(8, 1.0, layers=()), overwrite=True,
                    log=lambda s: None)
    assert m["k"] == 8 and m["scale_dtype"] == "float16"
    assert StoreReader(tmp_path / "s").shard(0)["logprob_max"].dtype == torch.float16


def test_scale_dtype_errors_name_the_field():
    def hdr(dtype):
        return make_header(examples(2), teacher_identity="t", tokenizer_hash="a", vocab_size=V, k=4,
                           loss_temperature=1.0, logprob_dtype=dtype)

    with pytest.raises(StoreError, match="scale_dtype 'int8'"):
        dataclasses.replace(hdr("int8"), scale_dtype="int8")
    with pytest.raises(StoreError, match="only for logprob_dtype int8 or int4"):
        dataclasses.replace(hdr("float16"), scale_dtype="float16")
    assert hdr("int4").scale_dtype == "float16" and hdr("float16").scale_dtype == ""


def test_config_accepts_int4_and_names_the_key_of_a_bad_value():
    assert StoreConfig(logprob_dtype="int4").logprob_dtype == "int4"
    with pytest.raises(Exception, match="logprob_dtype"):
        StoreConfig(logprob_dtype="int2")
