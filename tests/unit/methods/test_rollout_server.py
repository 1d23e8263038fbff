"""Student rollouts through our server on loopback: greedy parity with the in-process sampler, weight sync by
folder reload (and its schedule), the --allow-reload guard, stale-weight detection, the load checks."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch
from helpers import tiny_llama
from loopback import teacher_service
from pydantic import ValidationError

from stillroom.config.rollout import RolloutServerConfig
from stillroom.config.schema import RunConfig
from stillroom.generate.sampling import sample_continuations
from stillroom.methods.rollout_server import RolloutServerError, ServerRollout, StaleWeightsError
from stillroom.teachers.server import create_app

PROMPTS = [[10, 11, 12, 13, 14], [30, 31, 32], [50, 51, 52, 53, 54, 55, 56]]
BUDGETS = [6, 4, 5]
EOS = [1]


@pytest.fixture
def student(tok):
    return tiny_llama(len(tok), layers=2, seed=1)


def _serve(loopback, tok, *, allow_reload: bool = True, seed: int = 2):
    """Our server on loopback, started with another random model than the student (the sync replaces it)."""
    service = teacher_service(tiny_llama(len(tok), layers=2, seed=seed), tok, allow_reload=allow_reload)
    return loopback(create_app(service)), service


def _rollout(server, student, tok, tmp_path, **cfg) -> ServerRollout:
    rc = RolloutServerConfig(url=server.url, model="tiny", max_retries=0, **cfg)
    return ServerRollout(rc, student=student, tokenizer=tok, lora=False, weights_dir=tmp_path / "w", seed=7, log=print)


def _local_greedy(model, tok) -> list[list[int]]:
    conts = sample_continuations(model, tok, PROMPTS, max_new_tokens=max(BUDGETS), greedy=True, eos_token_id=EOS,
                                 pad_token_id=1)
    return [c[:n] for c, n in zip(conts, BUDGETS)]


def _sample(rollout: ServerRollout, step: int, stop_ids=EOS) -> list[list[int]]:
    return rollout.sample(PROMPTS, BUDGETS, step=step, micro_index=0, sampling_temperature=0.0, top_p=1.0,
                          stop_ids=stop_ids)


def test_greedy_server_rollouts_equal_the_local_sampler_then_follow_a_reload(loopback, student, tok, tmp_path):
    server, service = _serve(loopback, tok)
    rollout = _rollout(server, student, tok, tmp_path, reload_every=2)
    rollout.check()
    before = _local_greedy(student, tok)
    assert _sample(rollout, step=0) == before  # step 0 synced the student first: same ids as in process
    assert service.weights == rollout.weights and (tmp_path / "w" / "config.json").is_file()

    with torch.no_grad():  # "training": the student moves
        for p in student.parameters():
            p.add_(0.5 * torch.randn_like(p))
    after = _local_greedy(student, tok)
    assert after != before
    assert _sample(rollout, step=1) == before  # reload_every=2: step 1 still samples the step-0 weights
    assert _sample(rollout, step=2) == after  # step 2 synced the moved student
    assert rollout.synced_step == 2 and service.weights == rollout.weights


def test_stop_token_ids_end_a_row_and_stay_in_it(loopback, student, tok, tmp_path):
    server, _ = _serve(loopback, tok)
    rollout = _rollout(server, student, tok, tmp_path)
    free = _sample(rollout, step=0, stop_ids=None)  # ignore_eos: every row runs to its budget
    assert [len(c) for c in free] == BUDGETS
    stop = free[0][0]
    stopped = _sample(rollout, step=0, stop_ids=[stop])
    assert stopped == [row[:row.index(stop) + 1] if stop in row else row for row in free]
    assert stopped[0] == [stop]


def test_a_server_without_allow_reload_is_refused_by_name(loopback, student, tok, tmp_path):
    server, service = _serve(loopback, tok, allow_reload=False)
    rollout = _rollout(server, student, tok, tmp_path)
    with pytest.raises(RolloutServerError, match="--allow-reload"):
        rollout.check()  # before step 0: /v1/models says the server does not reload
    with pytest.raises(RolloutServerError, match=r"HTTP 403.*--allow-reload"):
        rollout.sync(0)  # and the load request itself is refused
    assert service.weights is None


def test_weights_changed_behind_the_runs_back_are_detected(loopback, student, tok, tmp_path):
    server, service = _serve(loopback, tok)
    rollout = _rollout(server, student, tok, tmp_path, reload_every=5)
    _sample(rollout, step=0)
    service.weights = "someone-else"  # another client reloaded the server
    with pytest.raises(StaleWeightsError, match="someone-else"[:12]):
        _sample(rollout, step=1)


def test_the_load_endpoint_checks_the_folder(loopback, student, tok, tmp_path):
    server, service = _serve(loopback, tok)
    other = copy.deepcopy(student)
    other.resize_token_embeddings(len(tok) + 8)
    other.save_pretrained(tmp_path / "wide")
    answers = {
        "relative": httpx.post(f"{server.url}/load_weights", json={"path": "w"}),
        "missing": httpx.post(f"{server.url}/load_weights", json={"path": str(tmp_path / "none")}),
        "vocab": httpx.post(f"{server.url}/load_weights", json={"path": str(tmp_path / "wide")}),
    }
    assert {k: r.status_code for k, r in answers.items()} == {"relative": 400, "missing": 400, "vocab": 400}
    assert "relative" in answers["relative"].json()["error"]["message"]
    assert str(tmp_path / "none") in answers["missing"].json()["error"]["message"]
    assert "vocab_size" in answers["vocab"].json()["error"]["message"]
    assert service.weights is None


def test_server_rollout_config_is_checked_when_the_recipe_loads():
    with pytest.raises(ValidationError, match="onpolicy.server.url"):
        RunConfig(method="onpolicy", onpolicy={"rollout": "server"})
    with pytest.raises(ValidationError, match="student_weight is 0"):
        RunConfig(method="onpolicy", onpolicy={"rollout": "server", "server": {"url": "http://127.0.0.1:1/v1"},
                                                "student_weight": 0.0, "teacher_weight": 1.0})
    ok = RunConfig(method="onpolicy", onpolicy={"rollout": "server", "server": {"url": "http://127.0.0.1:1/v1"}})
    assert ok.onpolicy.server.reload == "checkpoint" and ok.onpolicy.server.reload_every == 1


def test_serve_teacher_allow_reload_flag_reaches_the_service(tiny_teacher_dir):
    from stillroom.config.commands import ServeTeacherConfig
    from stillroom.run.serve import make_service

    quiet = lambda _: None  # noqa: E731
    assert make_service(ServeTeacherConfig(model=str(tiny_teacher_dir), allow_reload=True), log=quiet)[0].allow_reload
    assert not make_service(ServeTeacherConfig(model=str(tiny_teacher_dir)), log=quiet)[0].allow_reload
