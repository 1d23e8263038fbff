"""Settings a store records (k, logprob_dtype, shard_tokens) are read from its manifest where the recipe leaves
them at their defaults; only an explicit, different value is a mismatch. The store-fed run logs its teacher."""

import pytest
from test_store_fixtures import V, FakeTeacher, examples, header

from stillroom.config.core import StoreConfig
from stillroom.config.load import load_config
from stillroom.teachers.factory import build_teacher_source
from stillroom.teachers.signal import Fingerprint
from stillroom.teachers.store_format import StoreMismatch, recorded_settings
from stillroom.teachers.store_writer import write_store

FP = Fingerprint(teacher="local:/t@local#sha256:0123456789abcdef", tokenizer_hash="a" * 64, vocab_size=V)
MANIFEST = {"k": 16, "logprob_dtype": "int8", "shard_tokens": 1024}


@pytest.mark.parametrize("given,want,taken", [
    ({}, MANIFEST, ["k", "logprob_dtype", "shard_tokens"]),
    ({"k": 32}, {**MANIFEST, "k": 32}, ["logprob_dtype", "shard_tokens"]),
    ({"k": 64, "logprob_dtype": "float16"}, MANIFEST, ["k", "logprob_dtype", "shard_tokens"]),  # = the defaults
    ({"k": 16, "logprob_dtype": "int8", "shard_tokens": 1024}, MANIFEST, []),
])
def test_recorded_settings(given, want, taken):
    assert recorded_settings(StoreConfig(**given), MANIFEST) == (want, taken)


def test_no_manifest_keeps_the_recipe():
    assert recorded_settings(StoreConfig(), None) == ({"k": 64, "logprob_dtype": "float16", "shard_tokens": 262144}, [])


def test_a_dumped_config_still_reads_the_store():
    """A resolved config repeats every default: those values still count as left at the default."""
    dumped = StoreConfig.model_validate(StoreConfig().model_dump())
    assert {"k", "logprob_dtype", "shard_tokens"} <= dumped.model_fields_set
    assert recorded_settings(dumped, MANIFEST) == (MANIFEST, ["k", "logprob_dtype", "shard_tokens"])


def _build(tmp_path, exs, lines, **store):
    cfg = load_config(None, ["teacher.source=store", f"teacher.store.path={tmp_path / 's'}",
                             *(f"teacher.store.{k}={v}" for k, v in store.items())])
    return build_teacher_source(cfg, teacher_model=None, vocab_size=V, fingerprint=FP, hidden_layers=[],
                                output_device="cpu", train_examples=exs, log=lines.append)


def test_a_store_source_takes_k_from_the_store_and_logs_it(tmp_path):
    exs = examples(20)
    h = header(exs, k=16, logprob_dtype="int8")
    write_store(tmp_path / "s", h, exs, FakeTeacher().compute(16), log=lambda s: None)
    lines: list[str] = []
    src = _build(tmp_path, exs, lines)
    assert src.reader.k == 16
    assert lines == [f"teacher: store {tmp_path / 's'} (k=16, int8, {h.tokens} positions); teacher.store.k and "
                     "teacher.store.logprob_dtype read from its manifest (the recipe leaves them at the default)"]
    lines.clear()
    _build(tmp_path, exs, lines, k=16, logprob_dtype="int8")
    assert lines == [f"teacher: store {tmp_path / 's'} (k=16, int8, {h.tokens} positions)"]
    with pytest.raises(StoreMismatch, match=r"k \(store 16, run 8\)") as err:
        _build(tmp_path, exs, lines, k=8)
    assert err.value.fix == "overwrite"
