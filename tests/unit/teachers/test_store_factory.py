"""build_teacher_source: store checks happen when the source is built (before step 0)."""

import pytest
from test_store_fixtures import V, FakeTeacher, examples, header

from stillroom.config.schema import RunConfig
from stillroom.teachers.factory import build_teacher_source, store_path
from stillroom.teachers.signal import Fingerprint
from stillroom.teachers.store_format import StoreMismatch
from stillroom.teachers.store_reader import StoreTeacher
from stillroom.teachers.store_writer import write_store

FP = Fingerprint(teacher="local:/t@local#sha256:0123456789abcdef", tokenizer_hash="a" * 64, vocab_size=V)


def _cfg(tmp_path, **store):
    return RunConfig.model_validate({
        "name": "r", "output_dir": str(tmp_path / "runs"),
        "teacher": {"source": "store", "store": {"path": str(tmp_path / "s"), "k": 16, **store}},
    })


def _build(cfg, exs, layers=()):
    return build_teacher_source(cfg, teacher_model=None, vocab_size=V, fingerprint=FP, hidden_layers=list(layers),
                                output_device="cpu", train_examples=exs)


@pytest.fixture
def exs(tmp_path):
    exs = examples(20)
    write_store(tmp_path / "s", header(exs), exs, FakeTeacher().compute(16), log=lambda s: None)
    return exs


def test_store_source_is_built_and_checked(tmp_path, exs):
    src = _build(_cfg(tmp_path), exs, layers=[2])
    assert isinstance(src, StoreTeacher) and src.fingerprint == FP
    with pytest.raises(StoreMismatch, match=r"k \(store 16, run 32\)"):
        _build(_cfg(tmp_path, k=32), exs)
    with pytest.raises(StoreMismatch, match="data_fingerprint"):
        _build(_cfg(tmp_path), exs[1:])
    cfg = _cfg(tmp_path)
    cfg.loss.loss_temperature = 2.0
    with pytest.raises(StoreMismatch, match=r"loss_temperature \(store 1.0, run 2.0\)"):
        _build(cfg, exs)
    with pytest.raises(StoreMismatch, match=r"need teacher layers \[3\]"):
        _build(_cfg(tmp_path), exs, layers=[3])


def test_default_store_path_and_other_sources(tmp_path):
    cfg = RunConfig.model_validate({"name": "r", "output_dir": str(tmp_path)})
    assert store_path(cfg) == tmp_path / "r" / "teacher_store"
    # Misconfigured remote / ensemble sources fail before step 0 with a message naming the fix.
    with pytest.raises(Exception, match="url"):
        _build(RunConfig.model_validate({"teacher": {"source": "remote"}}), [])
    with pytest.raises(ValueError, match="teacher.ensemble"):
        _build(RunConfig.model_validate({"teacher": {"source": "ensemble"}}), [])
    with pytest.raises(ValueError, match="hidden-state"):
        _build(RunConfig.model_validate({"teacher": {"source": "remote"}}), [], layers=[1])
