"""Teacher store reader/writer behaviour: run checks, corruption, resume, StoreTeacher batches."""

import json

import pytest
from helpers import file_hashes
import torch
from test_store_fixtures import V, FakeTeacher, examples, header

from stillroom.data.batch import collate
from stillroom.losses import forward_kl
from stillroom.teachers.signal import Fingerprint
from stillroom.teachers.store_format import MANIFEST, StoreCorrupted, StoreError, StoreMismatch, data_fingerprint
from stillroom.teachers.store_reader import StoreReader, StoreTeacher, run_expectation
from stillroom.teachers.store_writer import StoreWriter, write_store

TEACHER = "local:/t@local#sha256:0123456789abcdef"
QUIET = dict(log=lambda s: None)


def _store(folder, exs, **kw):
    k = kw.pop("k", 16)
    h = header(exs, k=k, **kw)
    write_store(folder, h, exs, FakeTeacher().compute(k, kw.get("temperature", 1.0)), **QUIET)
    return folder


def _expect(exs, **over):
    base = dict(fingerprint=Fingerprint(teacher=TEACHER, tokenizer_hash="a" * 64, vocab_size=V),
                data_fingerprint=data_fingerprint(exs), k=16, loss_temperature=1.0, logprob_dtype="float16")
    base.update(over)
    return run_expectation(**base)



# ------------------------------------------------------------------ run checks


def test_matching_run_is_accepted(tmp_path):
    exs = examples(20)
    StoreReader(_store(tmp_path / "s", exs)).check_run(_expect(exs), hidden_layers=[0, 2])


@pytest.mark.parametrize("change,field,hint", [
    (dict(fingerprint=Fingerprint(teacher=TEACHER, tokenizer_hash="b" * 64, vocab_size=V)), "tokenizer_hash",
     "another tokenizer"),
    (dict(fingerprint=Fingerprint(teacher="local:/other@local#sha256:ffff", tokenizer_hash="a" * 64, vocab_size=V)),
     "teacher", "another teacher"),
    (dict(data_fingerprint="c" * 64), "data_fingerprint", "other training data"),
    (dict(k=32), "k (store 16, run 32)", "teacher.store.k"),
    (dict(loss_temperature=2.0), "loss_temperature (store 1.0, run 2.0)", "re-tempered"),
    (dict(logprob_dtype="int8"), "logprob_dtype", "logprob_dtype differs"),
])
def test_mismatch_names_the_field(tmp_path, change, field, hint):
    exs = examples(20)
    reader = StoreReader(_store(tmp_path / "s", exs))
    with pytest.raises(StoreMismatch) as err:
        reader.check_run(_expect(exs, **change))
    msg = str(err.value)
    assert field in msg and hint in msg and "stillroom cache-teacher" in msg
    assert msg.count("\n  - ") == 1  # only the differing field is reported


def test_other_data_is_refused(tmp_path):
    exs = examples(20)
    reader = StoreReader(_store(tmp_path / "s", exs))
    with pytest.raises(StoreMismatch, match="data_fingerprint"):
        reader.check_run(_expect(examples(20, seed=5)))
    with pytest.raises(StoreMismatch, match="data_fingerprint"):
        reader.check_run(_expect(exs[:-1]))


def test_missing_hidden_layers_are_refused(tmp_path):
    exs = examples(10)
    reader = StoreReader(_store(tmp_path / "s", exs, layers=(2,)))
    with pytest.raises(StoreMismatch, match=r"hidden_layers .*need teacher layers \[4\]"):
        reader.check_run(_expect(exs), hidden_layers=[2, 4])


# ------------------------------------------------------------------ damage


def test_corrupted_shard_is_named(tmp_path):
    exs = examples(30)
    folder = _store(tmp_path / "s", exs)
    manifest = json.loads((folder / MANIFEST).read_text())
    victim = folder / manifest["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # same size, other bytes
    victim.write_bytes(bytes(data))
    reader = StoreReader(folder)  # sizes are fine: opens
    reader.sequence(manifest["shards"][0]["uids"][0])  # an intact shard still serves
    with pytest.raises(StoreCorrupted, match=r"shard-00001\.safetensors fails its sha256"):
        reader.sequence(manifest["shards"][1]["uids"][0])
    with pytest.raises(StoreCorrupted, match=r"shard-00001\.safetensors"):
        reader.verify()
    from stillroom.cli.main import main

    assert main(["verify-store", str(folder)]) == 1


def test_truncated_shard_is_named_at_open(tmp_path):
    folder = _store(tmp_path / "s", examples(30))
    victim = folder / "shards" / "shard-00002.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(StoreCorrupted, match=r"shard-00002\.safetensors is truncated"):
        StoreReader(folder)


def test_missing_store_and_incomplete_store(tmp_path):
    with pytest.raises(StoreError, match="not a teacher store"):
        StoreReader(tmp_path / "nothing")
    exs = examples(30)
    h = header(exs)
    w = StoreWriter(tmp_path / "s", h, exs, **QUIET)
    w.write_shard(0, FakeTeacher().compute(16)(w.shard_examples(0)))
    w.close()
    with pytest.raises(StoreError, match=rf"incomplete \(1/{h.num_shards} shards\).*run it again"):
        StoreReader(tmp_path / "s")


# ------------------------------------------------------------------ resume


def test_resume_skips_done_shards_and_gives_identical_bytes(tmp_path):
    exs = examples(40)
    h = header(exs, k=8, logprob_dtype="int8")
    fake = FakeTeacher()
    write_store(tmp_path / "full", h, exs, fake.compute(8), **QUIET)

    w = StoreWriter(tmp_path / "part", h, exs, **QUIET)
    for i in w.pending[:3]:
        w.write_shard(i, fake.compute(8)(w.shard_examples(i)))
    w.close()  # as if interrupted: no finish()
    (tmp_path / "part" / "shards" / "shard-00003.safetensors.tmp").write_bytes(b"half a shard")
    calls = []

    def counting(exs_):
        calls.append([e.uid for e in exs_])
        return fake.compute(8)(exs_)

    write_store(tmp_path / "part", h, exs, counting, **QUIET)
    assert len(calls) == h.num_shards - 3
    assert file_hashes(tmp_path / "part") == file_hashes(tmp_path / "full")


def test_resume_recomputes_a_damaged_finished_shard(tmp_path):
    exs = examples(30)
    h = header(exs)
    fake = FakeTeacher()
    write_store(tmp_path / "s", h, exs, fake.compute(16), **QUIET)
    before = file_hashes(tmp_path / "s")
    (tmp_path / "s" / "shards" / "shard-00001.safetensors").write_bytes(b"garbage")
    calls = []
    write_store(tmp_path / "s", h, exs, lambda e: calls.append(1) or fake.compute(16)(e), **QUIET)
    assert len(calls) == 1 and file_hashes(tmp_path / "s") == before


def test_writer_refuses_a_store_of_another_run_unless_overwrite(tmp_path):
    exs = examples(20)
    _store(tmp_path / "s", exs)
    h2 = header(exs, k=8)
    with pytest.raises(StoreError, match=r"another run: k \(store 16, run 8\).*--overwrite"):
        StoreWriter(tmp_path / "s", h2, exs, **QUIET)
    write_store(tmp_path / "s", h2, exs, FakeTeacher().compute(8), overwrite=True, **QUIET)
    assert StoreReader(tmp_path / "s").k == 8
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a teacher store"):
        StoreWriter(tmp_path / "other", h2, exs, overwrite=True, **QUIET)


def test_write_shard_checks_rows(tmp_path):
    exs = examples(20)
    w = StoreWriter(tmp_path / "s", header(exs), exs, **QUIET)
    rows = FakeTeacher().compute(16)(w.shard_examples(0))
    with pytest.raises(StoreError, match="in order"):
        w.write_shard(0, rows[::-1])
    with pytest.raises(StoreError, match="do not match k=16"):
        w.write_shard(0, FakeTeacher().compute(8)(w.shard_examples(0)))
    w.close()


# ------------------------------------------------------------------ StoreTeacher


def test_store_teacher_batches_match_dense_at_k_equal_v(tmp_path):
    exs = examples(24)
    folder = _store(tmp_path / "s", exs, k=V, logprob_dtype="float32", temperature=1.5)
    fake = FakeTeacher()
    src = StoreTeacher(StoreReader(folder), hidden_layers=[0, 2])
    picked = [exs[i] for i in (5, 0, 17, 3)]  # different lengths: padded batch
    batch = collate(picked, pad_id=0)
    sig = src.signal(batch)
    assert sig.is_topk and sig.temperature == 1.5
    assert sig.topk_ids_btk.shape == (*batch.input_ids.shape, V)
    assert sig.hidden_states[2].shape == (*batch.input_ids.shape, 8)
    dense = torch.zeros(*batch.input_ids.shape, V)
    for b, e in enumerate(picked):
        dense[b, : len(e.input_ids)] = fake.logits(e.input_ids)
    student = torch.randn(*batch.input_ids.shape, V)
    got, n1 = forward_kl(student, sig, batch.loss_mask, loss_temperature=1.5)
    want, n2 = forward_kl(student, dense, batch.loss_mask, loss_temperature=1.5)
    assert n1 == n2 == batch.num_targets
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_store_teacher_refuses_unknown_uid_or_length(tmp_path):
    exs = examples(10)
    src = StoreTeacher(StoreReader(_store(tmp_path / "s", exs)))
    stranger = examples(1, seed=9)[0]
    with pytest.raises(StoreMismatch, match="is not in the teacher store"):
        src.signal(collate([exs[0], stranger], pad_id=0))
    cut = examples(10)[2]
    cut.input_ids, cut.target = cut.input_ids[:-1], cut.target[:-1]
    with pytest.raises(StoreMismatch, match="positions in the teacher store"):
        src.signal(collate([cut], pad_id=0))


def test_lru_cache_is_bounded(tmp_path):
    exs = examples(40)
    reader = StoreReader(_store(tmp_path / "s", exs), cache_bytes=1)
    for e in exs:
        reader.sequence(e.uid)
    assert len(reader._cache) == 1
