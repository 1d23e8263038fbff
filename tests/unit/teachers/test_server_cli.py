"""``stillroom serve-teacher``: argument parsing, model loading and the served API (in-process)."""

from __future__ import annotations

import httpx
import pytest

from helpers import save_tiny_teacher
from loopback import serve
from stillroom.cli.main import build_parser, main
from stillroom.cli.sections import section_from_args
from stillroom.config.commands import ServeTeacherConfig
from stillroom.config.schema import RemoteConfig
from stillroom.run.serve import make_service
from stillroom.teachers.remote import RemoteTeacher
from stillroom.teachers.server import create_app


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """An untrained tiny teacher folder (serving needs no trained weights; fast to make)."""
    return save_tiny_teacher(tmp_path_factory.mktemp("serve") / "model", layers=2, pretrain_steps=0)


def _config(argv: list[str]) -> ServeTeacherConfig:
    """The section `stillroom serve-teacher ARGV` runs with."""
    return section_from_args(ServeTeacherConfig, build_parser().parse_args(["serve-teacher", *argv]), ("model",))


def test_defaults_bind_loopback(monkeypatch):
    cfg = _config(["builtin:smollm2-135m-instruct"])
    assert (cfg.host, cfg.port, cfg.dtype, cfg.max_top_k) == ("127.0.0.1", 8000, "auto", 64)
    seen = []
    monkeypatch.setattr("stillroom.run.serve.serve_teacher", lambda cfg: seen.append(cfg))
    assert main(["serve-teacher", "builtin:smollm2-135m-instruct"]) == 0
    assert seen == [ServeTeacherConfig(model="builtin:smollm2-135m-instruct")]  # the schema's defaults


def test_command_loads_the_folder_and_serves_it(teacher_dir, monkeypatch):
    cfg = _config([str(teacher_dir), "--dtype", "float32", "--max-top-k", "5", "--api-key-env", "SERVE_TEST_KEY"])
    monkeypatch.setenv("SERVE_TEST_KEY", "k-123")
    service, key = make_service(cfg)
    assert service.model_name == "model" and service.max_top_k == 5 and key == "k-123"
    assert service.identity.startswith("local:")
    with serve(create_app(service, api_key=key)) as srv:
        monkeypatch.setenv("CLIENT_KEY", "k-123")
        remote = RemoteTeacher(RemoteConfig(url=srv.url, model="model", top_k=5, api_key_env="CLIENT_KEY"),
                               vocab_size=service.vocab_size)
        assert remote.check_server()["identity"] == service.identity
        assert len(remote.generate(["hi"], 1, max_new_tokens=2)[0]) == 1
        assert httpx.get(srv.url.replace("/v1", "/health")).json() == {"status": "ok"}
        remote.close()


def test_cmd_passes_host_port_and_key_to_serve(teacher_dir, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("stillroom.teachers.server.serve",
                        lambda service, host, port, api_key=None: seen.update(host=host, port=port, key=api_key))
    assert main(["serve-teacher", str(teacher_dir), "--port", "8123", "--dtype", "float32"]) == 0
    assert seen == {"host": "127.0.0.1", "port": 8123, "key": None}
    assert "http://127.0.0.1:8123/v1" in capsys.readouterr().out


def test_missing_key_variable_and_bad_model_fail_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    assert main(["serve-teacher", str(tmp_path), "--api-key-env", "NOPE_KEY"]) == 2
    assert "NOPE_KEY" in capsys.readouterr().err
    assert main(["serve-teacher", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
