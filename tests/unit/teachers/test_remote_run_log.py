"""A run with teacher.source=remote says when it starts that the report's teacher row is the local teacher.model
(and, where teacher.model is left at its default, that the report compares against that default)."""

from __future__ import annotations

from stillroom.config.load import load_config
from stillroom.domains.lm.prepare import LmDomain
from stillroom.methods import METHODS
from stillroom.models import load_model
from stillroom.train.distributed import Topology

URL = "http://127.0.0.1:9/v1"  # never asked: preparing a run loads the models and data, the server is checked later
SMALL = ["data.sources=[{bundled: pydoc, limit: 20}]", "data.seq_len=32",
         "student.from_teacher={strategy: every_n, every_n: 2}", "teacher.dtype=float32"]


def _start_lines(overrides: list[str]) -> list[str]:
    cfg = load_config(None, [*SMALL, *overrides])
    lines: list[str] = []
    LmDomain().prepare(cfg, Topology(), METHODS["kd"], lines.append)
    return [line for line in lines if line.startswith("teacher")]


def test_remote_run_says_the_report_uses_the_local_model(tiny_teacher_dir):
    lines = _start_lines([f"teacher.model={{path: {tiny_teacher_dir}}}", "teacher.source=remote",
                          f"teacher.remote.url={URL}", "teacher.remote.model=tiny"])
    identity = load_model(load_config(None, [f"teacher.model={{path: {tiny_teacher_dir}}}"]).teacher.model).identity
    assert lines == [f"teacher: remote {URL} (model tiny) for training; the report's teacher row (reference CE, KL, "
                     f"top-1, speed) uses the local model {identity} loaded from teacher.model"]


def test_remote_run_with_the_default_teacher_model_says_what_the_report_compares(tiny_teacher_dir, monkeypatch):
    real = load_model
    # the default builtin teacher stands in as the tiny one (same code path, no 135M model to convert)
    monkeypatch.setattr("stillroom.domains.lm.prepare.load_model",
                        lambda src, **kw: real(load_config(None, [f"teacher.model={{path: {tiny_teacher_dir}}}"])
                                               .teacher.model, **kw))
    lines = _start_lines(["teacher.source=remote", f"teacher.remote.url={URL}", "teacher.remote.model=tiny"])
    assert len(lines) == 2 and "remote http://127.0.0.1:9/v1 (model tiny) for training" in lines[0]
    assert lines[1].startswith("teacher.model is left at its default (builtin:smollm2-135m-instruct)")
    assert "the report compares the students against that model" in lines[1]


def test_online_run_names_the_teacher_once(tiny_teacher_dir):
    lines = _start_lines([f"teacher.model={{path: {tiny_teacher_dir}}}"])
    assert len(lines) == 1 and lines[0].startswith("teacher: ") and "remote" not in lines[0]
