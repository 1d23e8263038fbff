"""Fault injection: a scripted fake OpenAI server on loopback answers 500s, 429 with Retry-After,
stalls past the timeout, drops connections and sends malformed JSON. The client recovers within its
retry budget or fails with a message naming the URL path and the problem; finished rows survive.
No server at all: the first check fails at once; a server dying mid-run: the error says how to resume."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest
import torch
from loopback import free_port

from stillroom.config.schema import RemoteConfig
from stillroom.data.batch import Example, collate
from stillroom.teachers.http import OpenAIClient, RemoteError
from stillroom.teachers.remote import RemoteTeacher

V, K = 50, 3
KEY = "sk-fault-test-91ab77e2"


def plp_for(ids):
    """A valid prompt_logprobs answer: top ids (t+1, t+2, t+3) % V with log-probs -1, -2, -3."""
    out = [None]
    for t in ids[1:]:
        out.append({str((t + i) % V): {"logprob": -float(i), "rank": i, "decoded_token": "?"} for i in (1, 2, 3)})
    return out


class Fake:
    """Scripted server, started by ``serve`` (the ``loopback`` fixture). ``script``: actions consumed one per
    request (then "ok"); ``per_prompt``: actions keyed by the prompt's first token id, consumed first."""

    def __init__(self, serve):
        self.script: list[str] = []
        self.per_prompt: dict[int, list[str]] = {}
        self.counts: Counter = Counter()
        self.first_tokens: Counter = Counter()
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status, body: bytes, headers=()):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # /v1/models; the connection is closed after it, so a server shut down later
                with fake.lock:  # refuses the next request instead of answering on a kept-alive connection
                    fake.counts[self.path] += 1
                self.close_connection = True
                body = json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
                self.reply(200, body, [("Connection", "close")])

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                first = payload["prompt"][0] if isinstance(payload.get("prompt"), list) else -1
                with fake.lock:
                    fake.counts[self.path] += 1
                    fake.first_tokens[first] += 1
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    queue = fake.per_prompt.get(first)
                    action = queue.pop(0) if queue else (fake.script.pop(0) if fake.script else "ok")
                try:
                    time.sleep(fake.delay)
                    self.act(action, payload)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def act(self, action, payload):
                if action == "ok":
                    body = {"choices": [{"index": 0, "text": "", "prompt_logprobs": plp_for(payload["prompt"])}]}
                    self.reply(200, json.dumps(body).encode())
                elif action == "500":
                    self.reply(500, b'{"error": {"message": "boom"}}')
                elif action == "500-echo-auth":  # a careless server echoing the credentials back
                    self.reply(500, json.dumps({"error": {"message": self.headers.get("Authorization")}}).encode())
                elif action == "429":
                    self.reply(429, b'{"error": {"message": "slow down"}}', [("Retry-After", "0.3")])
                elif action == "400":
                    self.reply(400, b'{"error": {"message": "prompt too long"}}')
                elif action == "stall":
                    time.sleep(1.2)
                    self.reply(200, b"{}")
                elif action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif action == "badjson":
                    self.reply(200, b'{"choices": [ {"index": 0, "te')
                elif action == "nologprobs":
                    self.reply(200, b'{"choices": [{"index": 0, "text": "hi"}]}')

        self.server = serve(Handler)
        self.url = self.server.url

    def close(self):
        self.server.stop()


@pytest.fixture()
def fake(loopback):
    return Fake(loopback)


def make_batch(firsts, n=5):
    exs = [Example(input_ids=[f] + [(f + j) % V for j in range(1, n)], target=[True] * n, uid=f"row{f}")
           for f in firsts]
    return collate(exs, pad_id=0)


FAST = {"timeout_s": 0.5, "max_retries": 6, "backoff_s": 0.01, "max_backoff_s": 0.05}


def client(fake, sleeps=None, cache=None, url=None, **kw):
    cfg = RemoteConfig(url=url or fake.url, model="m", top_k=K, **{**FAST, **kw})
    return RemoteTeacher(cfg, vocab_size=V, cache=cache,
                         sleep=(lambda s: sleeps.append(s)) if sleeps is not None else time.sleep)


def test_recovers_from_every_transient_fault(fake):
    fake.script = ["500", "429", "drop", "badjson", "stall"]
    sig = client(fake).signal(make_batch([10]))
    assert fake.counts["/v1/completions"] == 6
    assert sig.topk_ids_btk[0, 0].tolist() == [12, 13, 14]  # entry for token 1 (=11) -> ids 11+1..11+3
    assert torch.allclose(sig.topk_logprobs_btk[0, :4], torch.tensor([-1.0, -2.0, -3.0]).expand(4, 3))


def test_retry_after_is_honoured_and_backoff_grows_with_jitter(fake):
    sleeps: list[float] = []
    fake.script = ["429", "500", "500", "500"]
    client(fake, sleeps).signal(make_batch([3]))
    assert sleeps[0] >= 0.3  # Retry-After: 0.3 beats the 0.01 s backoff
    assert 0.01 <= sleeps[1] <= 0.02 and 0.02 <= sleeps[2] <= 0.04 and 0.025 <= sleeps[3] <= 0.05


def test_gives_up_after_the_retry_budget_with_a_clear_message(fake):
    fake.script = ["500"] * 10
    with pytest.raises(RemoteError) as err:
        client(fake, max_retries=3).signal(make_batch([4]))
    msg = str(err.value)
    assert fake.counts["/v1/completions"] == 4
    assert "/v1/completions" in msg and "4 attempt(s)" in msg and "HTTP 500: boom" in msg


@pytest.mark.parametrize("action, words, requests", [
    ("badjson", "not valid JSON", 3),
    ("stall", "timeout_s=0.5", 3),
    ("drop", "connection failed", 3),
    ("400", "HTTP 400: prompt too long", 1),  # client errors are not retried
    ("nologprobs", "does not offer prompt log-probabilities", 1),
])
def test_persistent_faults_fail_naming_path_and_problem(fake, action, words, requests):
    fake.script = [action] * 5
    with pytest.raises(RemoteError) as err:
        client(fake, max_retries=2).signal(make_batch([5]))
    assert words in str(err.value) and "/v1/completions" in str(err.value)
    assert fake.counts["/v1/completions"] == requests


def test_finished_rows_survive_a_failure_and_a_rerun_asks_only_the_rest(fake, tmp_path):
    firsts = [1, 2, 3, 4, 5, 6]
    fake.per_prompt = {4: ["500"] * 3}  # row 4 fails for good on the first run
    first = client(fake, max_retries=2, concurrency=2, cache=tmp_path / "c.jsonl")
    with pytest.raises(RemoteError):
        first.signal(make_batch(firsts))
    first.close()  # as a crashed process would release it
    asked_first = sum(fake.first_tokens.values())
    second = client(fake, max_retries=2, concurrency=2, cache=tmp_path / "c.jsonl")
    stored = len(second.cache)
    assert 1 <= stored <= 5  # everything that arrived is kept (running rows finish; unstarted ones are cancelled)
    second.signal(make_batch(firsts))
    assert sum(fake.first_tokens.values()) - asked_first == 6 - stored  # only the missing rows are asked
    second.close()
    third = client(fake, cache=tmp_path / "c.jsonl")
    third.signal(make_batch(firsts))
    assert third.requests_sent == 0
    third.close()


def test_concurrency_is_bounded_and_used(fake):
    fake.delay = 0.3
    client(fake, concurrency=3).signal(make_batch(list(range(10, 19))))
    assert fake.max_in_flight == 3


def test_key_is_scrubbed_even_when_the_server_echoes_it(fake, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FAULT_KEY", KEY)
    fake.script = ["500-echo-auth"] * 3
    with pytest.raises(RemoteError) as err:
        client(fake, max_retries=2, api_key_env="FAULT_KEY").signal(make_batch([7]))
    assert "Bearer ***" in str(err.value)
    assert KEY not in str(err.value) and KEY not in caplog.text and "retry 1/2" in caplog.text


def test_backoff_knobs_come_from_the_config(fake):
    sleeps: list[float] = []
    fake.script = ["500"] * 3
    client(fake, sleeps, backoff_s=0.2, max_backoff_s=0.3, max_retries=3).signal(make_batch([8]))
    assert 0.1 <= sleeps[0] <= 0.2 and 0.15 <= sleeps[1] <= 0.3 and 0.15 <= sleeps[2] <= 0.3
    sleeps.clear()
    fake.script = ["429"]  # Retry-After: 0.3, capped by max_retry_after_s
    client(fake, sleeps, backoff_s=0.0, max_retry_after_s=0.1).signal(make_batch([9]))
    assert sleeps == [pytest.approx(0.1)]


def test_no_server_at_the_first_check_fails_at_once_saying_to_start_one():
    sleeps: list[float] = []
    url = f"http://127.0.0.1:{free_port()}/v1"
    teacher = client(None, sleeps, url=url)
    t0 = time.perf_counter()
    with pytest.raises(RemoteError) as err:
        teacher.check_server()
    msg = str(err.value)
    assert time.perf_counter() - t0 < 5 and sleeps == [] and teacher.requests_sent == 1  # not retried
    assert url in msg and "connection refused" in msg and "stillroom serve-teacher" in msg
    assert "teacher.remote.url" in msg and not teacher.checked
    teacher.close()
    # `stillroom generate` checks through the same client
    from stillroom.datagen.remote_complete import remote_complete

    with pytest.raises(RemoteError, match="stillroom serve-teacher"):
        remote_complete(RemoteConfig(url=url, model="m", **FAST))


def test_refused_connections_after_the_check_are_retried(fake):
    sleeps: list[float] = []
    teacher = client(fake, sleeps, max_retries=2)
    teacher.check_server()
    fake.close()  # the server goes away mid-run (it may be restarting)
    with pytest.raises(RemoteError) as err:
        teacher.signal(make_batch([6]))
    assert len(sleeps) == 2 and "3 attempt(s)" in str(err.value) and "connection failed" in str(err.value)
    teacher.close()


def test_a_run_killed_by_a_dead_server_says_how_to_resume(fake, tmp_path):
    from stillroom.config.schema import RunConfig
    from stillroom.teachers.remote import remote_from_run

    cfg = RunConfig.model_validate({"name": "r", "output_dir": str(tmp_path), "teacher": {
        "source": "remote", "remote": {"url": fake.url, "model": "m", "top_k": K, **FAST, "max_retries": 1,
                                       "backoff_s": 0.0}}})
    teacher = remote_from_run(cfg, vocab_size=V, fingerprint=None)
    fake.per_prompt = {3: ["drop"] * 2}  # the server dies while row 3 is asked; rows 1 and 2 arrived
    with pytest.raises(RemoteError) as err:
        teacher.signal(make_batch([1, 2, 3]))
    msg = str(err.value)
    cache = tmp_path / "r" / "remote_cache.jsonl"
    assert "connection failed" in msg and "--resume" in msg and str(cache) in msg
    # the CLI turns the error into the exact command to continue, quoted for the shell
    import argparse
    import shlex

    from stillroom.cli.main import _store_fix

    args = argparse.Namespace(recipe="my recipe.yaml", overrides=["data.sources=[{path: a b.jsonl}]"])
    line = _store_fix(args, err.value)
    assert line is not None and line.startswith("to continue once the teacher answers: ")
    assert shlex.split(line.split(": ", 1)[1]) == ["stillroom", "run", "my recipe.yaml",
                                                   "data.sources=[{path: a b.jsonl}]", "--resume"]
    teacher.close()
    again = remote_from_run(cfg, vocab_size=V, fingerprint=None)
    assert len(again.cache) == 2  # the finished rows are kept: resuming asks only row 3
    again.signal(make_batch([1, 2, 3]))
    assert fake.first_tokens[1] == fake.first_tokens[2] == 1 and fake.first_tokens[3] == 3
    again.close()
