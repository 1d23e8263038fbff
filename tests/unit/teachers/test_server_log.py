"""`stillroom serve-teacher` logs one line per request on stderr (method, path, model, prompt tokens, top-k, max
tokens, status, milliseconds), never the API key or the prompt text; `--no-log-requests` turns it off."""

from __future__ import annotations

import re

import httpx
import pytest

from helpers import save_tiny_teacher
from stillroom.cli.main import build_parser
from stillroom.cli.sections import section_from_args
from stillroom.config.commands import ServeTeacherConfig
from stillroom.run.serve import make_service
from stillroom.teachers.server import create_app

KEY = "k-secret-4711"
PROMPT = "zebra quartz marmalade"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (GET|POST) (\S+)((?: \w+=\S+)*) -> (\d{3}) in (\d+\.\d) ms$")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("serve_log") / "model", layers=2, pretrain_steps=0)


def _service(teacher_dir, monkeypatch, *flags: str):
    """The service `stillroom serve-teacher <teacher_dir> --api-key-env KEY_VAR FLAGS` serves."""
    monkeypatch.setenv("SERVE_LOG_KEY", KEY)
    args = build_parser().parse_args(["serve-teacher", str(teacher_dir), "--dtype", "float32", "--max-top-k", "5",
                                      "--api-key-env", "SERVE_LOG_KEY", *flags])
    return make_service(section_from_args(ServeTeacherConfig, args, ("model",)), log=lambda s: None)


def _requests(url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    ok = httpx.post(f"{url}/completions", headers=auth, timeout=60,
                    json={"model": "model", "prompt": PROMPT, "prompt_logprobs": 3, "max_tokens": 0})
    assert ok.status_code == 200
    chat = httpx.post(f"{url}/chat/completions", headers=auth, timeout=60,
                      json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "temperature": 0})
    assert chat.status_code == 200
    assert httpx.post(f"{url}/completions", json={"prompt": PROMPT}).status_code == 401  # no key
    assert httpx.post(f"{url}/completions", headers=auth, json={"prompt": PROMPT, "prompt_logprobs": 50}
                      ).status_code == 400  # over --max-top-k
    assert httpx.get(url.replace("/v1", "/health")).status_code == 200


def test_one_line_per_request_without_key_or_prompt(teacher_dir, monkeypatch, loopback, capfd):
    service, key = _service(teacher_dir, monkeypatch)
    srv = loopback(create_app(service, api_key=key))
    capfd.readouterr()
    _requests(srv.url)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if LINE.match(line)]
    assert len(lines) == 5, err
    assert KEY not in out + err and "zebra" not in out + err and "Bearer" not in err
    fields = [dict(f.split("=") for f in LINE.match(line).group(3).split()) for line in lines]
    head = [(LINE.match(line).group(1), LINE.match(line).group(2), LINE.match(line).group(4)) for line in lines]
    assert head == [("POST", "/v1/completions", "200"), ("POST", "/v1/chat/completions", "200"),
                    ("POST", "/v1/completions", "401"), ("POST", "/v1/completions", "400"), ("GET", "/health", "200")]
    n_prompt = len(service.tokenizer(PROMPT)["input_ids"])
    assert fields[0] == {"model": "model", "prompt_tokens": str(n_prompt), "top_k": "3", "max_tokens": "0"}
    assert fields[1]["model"] == "model" and fields[1]["max_tokens"] == "2" and int(fields[1]["prompt_tokens"]) > 0
    assert fields[2] == {} and fields[3]["top_k"] == "50"  # refused before the handler / by the handler


def test_no_log_requests_turns_it_off(teacher_dir, monkeypatch, loopback, capfd):
    service, key = _service(teacher_dir, monkeypatch, "--no-log-requests")
    srv = loopback(create_app(service, api_key=key))
    capfd.readouterr()
    _requests(srv.url)
    out, err = capfd.readouterr()
    assert not [line for line in (out + err).splitlines() if LINE.match(line)], err


def test_client_strings_cannot_forge_log_lines(teacher_dir, monkeypatch, loopback, capfd):
    service, key = _service(teacher_dir, monkeypatch)
    srv = loopback(create_app(service, api_key=key))
    capfd.readouterr()
    r = httpx.post(f"{srv.url}/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "x\n2000-01-01 00:00:00 GET /fake -> 200 in 1.0 ms", "prompt": PROMPT})
    assert r.status_code == 404
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if " -> " in line]
    assert len(lines) == 1 and "/fake" in lines[0] and lines[0].endswith("-> 404 in " + lines[0].split(" in ")[-1])
