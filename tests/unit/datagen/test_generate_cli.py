"""`stillroom generate`: local and remote teachers, n samples, export (verifier, fallback, rationale
parsing), malformed outputs counted, a SIGKILL + rerun without duplicates or gaps, clear recipe errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml
from cli_helpers import cli_env
from helpers import load_saved, save_tiny_teacher
from loopback import serve, teacher_app

from stillroom.cli.main import main
from stillroom.config.schema import RunConfig
from stillroom.datagen.generate import run_generate
from stillroom.datagen.export import parse_rationale
from stillroom.datagen.store import GenerationStore

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama and the tiny chat tokenizer, saved (fast: no pretraining; texts are random)."""
    return save_tiny_teacher(tmp_path_factory.mktemp("gen-teacher") / "model", layers=2, pretrain_steps=0)


def write_recipe(tmp_path: Path, generate: dict, teacher: dict | None = None) -> Path:
    recipe = {"name": "gen", "output_dir": str(tmp_path / "runs"), "generate": generate}
    if teacher is not None:
        recipe["teacher"] = teacher
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


ITEMS = [{"id": f"q{i}", "question": f"What is {i} plus {i}?", "completion": f"{i} + {i} = {2 * i}. The answer is "
          f"{2 * i}.", "answer": 2 * i, "passes": i % 2 == 0} for i in range(6)]


# ----------------------------------------------------------------------------- local teacher


def test_local_teacher_n_samples_store_summary_export_and_rerun_is_a_noop(tmp_path, tiny_teacher_dir, capsys):
    recipe = write_recipe(
        tmp_path,
        {"input": {"bundled": "arithmetic", "n": 3, "seed": 1}, "template": "{question}", "n_samples": 2,
         "max_new_tokens": 5, "batch_size": 2, "sampling_temperature": 1.0,
         "export": {"path": str(tmp_path / "train.jsonl"), "format": "messages"}},
        teacher={"model": {"path": str(tiny_teacher_dir)}, "dtype": "float32"},
    )
    assert main(["generate", str(recipe)]) == 0
    store_path = tmp_path / "runs" / "gen" / "generations.jsonl"
    recs = read_jsonl(store_path)
    assert sorted(r["key"] for r in recs) == sorted(f"{p}#{s}" for p in {r["prompt_id"] for r in recs} for s in (0, 1))
    assert len({r["prompt_id"] for r in recs}) == 3
    for r in recs:
        assert "#sha256:" in r["teacher"]  # the loaded model's identity
        assert r["settings"]["sampling_temperature"] == 1.0 and r["settings"]["template"] == "{question}"
        assert r["settings"]["chat"] is True  # the tiny tokenizer has a chat template
    summary = json.loads((store_path.parent / "generations.jsonl.summary.json").read_text())
    assert summary["samples_stored"] == 6 and summary["generated_now"] == 6
    rows = read_jsonl(tmp_path / "train.jsonl")
    assert len(rows) + summary["malformed_total"] == 6
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and user["content"].endswith("?")
        assert assistant["role"] == "assistant" and row["source"] == "teacher"
    err = capsys.readouterr().err
    assert "generate: 3 prompts x 2: 6/6 samples stored (6 now, 0 before)" in err

    before = store_path.read_bytes()
    assert main(["generate", str(recipe)]) == 0
    assert store_path.read_bytes() == before
    assert "(0 now, 6 before)" in capsys.readouterr().err


VERIFIER_MODULE = """
def by_flag(text, item):
    return bool(item["passes"])

def broken(text, item):
    raise RuntimeError("boom")
"""


def test_rewrite_export_keeps_verified_rewrites_and_falls_back_to_the_original(tmp_path, tiny_teacher_dir,
                                                                                 monkeypatch):
    (tmp_path / "my_verifiers.py").write_text(VERIFIER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "data.jsonl", ITEMS)
    recipe = write_recipe(
        tmp_path,
        {"input": str(data), "mode": "rewrite", "template": "Rewrite: {question} {completion}", "n_samples": 1,
         "max_new_tokens": 4, "batch_size": 4, "verifier": "my_verifiers:by_flag",
         "export": {"path": str(tmp_path / "train.jsonl"), "keep": "first_verified", "fallback_to_original": True,
                    "prompt_template": "Q: {question}\nA: "}},
        teacher={"model": {"path": str(tiny_teacher_dir)}, "dtype": "float32"},
    )
    assert main(["generate", str(recipe)]) == 0
    store = {r["prompt_id"]: r for r in read_jsonl(tmp_path / "runs" / "gen" / "generations.jsonl")}
    rows = {r["prompt_id"]: r for r in read_jsonl(tmp_path / "train.jsonl")}
    assert set(rows) == {it["id"] for it in ITEMS}  # one row per record
    for it in ITEMS:
        row = rows[it["id"]]
        assert row["prompt"] == f"Q: {it['question']}\nA: "
        if it["passes"] and "error" not in store[it["id"]]:
            assert row["source"] == "teacher" and row["verified"] is True
            assert row["completion"] == store[it["id"]]["text"]
        else:
            assert row["source"] == "original" and row["completion"] == it["completion"]
    summary = json.loads((tmp_path / "runs" / "gen" / "generations.jsonl.summary.json").read_text())
    assert summary["export"]["rows"] == 6 and summary["export"]["rows_original"] >= 3

    # A verifier that raises is counted, never fatal; keep=verified + fallback keeps only originals.
    assert main(["generate", str(recipe), "--export-only", "generate.verifier=my_verifiers:broken",
                 "generate.export.keep=verified"]) == 0
    summary = json.loads((tmp_path / "runs" / "gen" / "generations.jsonl.summary.json").read_text())
    assert summary["verifier"]["raised"] == summary["verifier"]["failed"] == 6 - summary["malformed_total"]
    assert "RuntimeError: boom" in summary["verifier"]["first_exception"]
    assert all(r["source"] == "original" for r in read_jsonl(tmp_path / "train.jsonl"))


# ----------------------------------------------------------------------------- fake teachers (in process)


def test_parse_rationale_follows_the_reference_rules():
    assert parse_rationale("2 + 2 = 4. The answer is 4.\nQ: next one", "The answer is", "Q:") == ("2 + 2 = 4.", "4", True)
    assert parse_rationale("so the answer is (b) blue.", "the answer is", None) == ("so", "(b) blue", True)
    assert parse_rationale("no trigger here", "The answer is", "Q:") == ("no trigger here", " ", False)
    assert parse_rationale("Steps. The answer is .", "The answer is", None)[2] is False
    assert parse_rationale("Q: junk", "The answer is", "Q:") == (" ", " ", False)
    # The model running on: the label is the rest of the first trigger's line; markers cut the text.
    ran_on = "12 - 2 = 10. The answer is 10.\nA: 1 + 1 = 2. The answer is 2."
    assert parse_rationale(ran_on, "The answer is", None) == ("12 - 2 = 10.", "10", True)
    assert parse_rationale("a. The answer is 3.\n\nA: Q: b", "The answer is", ["Q:", "\n\n"]) == ("a.", "3", True)


def rationale_teacher(prompts: list[str], n: int) -> list[list[str]]:
    out = []
    for p in prompts:
        i = int(p.split()[2])  # "What is {i} plus {i}?"
        if i % 3 == 0:
            out.append([f"{i} plus {i} is {2 * i}. The answer is {2 * i}.\nQ: What is 9 plus 9?"] * n)
        elif i % 3 == 1:
            out.append([f"I think it is {2 * i + 1}"] * n)  # no trigger: parse failure, wrong number
        else:
            out.append([""] + [f"{i}+{i}. The answer is {2 * i + 1}."] * (n - 1))  # one empty (malformed)
    return out


@pytest.mark.parametrize("drop", [False, True])
def test_rationale_mode_parses_counts_failures_and_exports_step_by_step_rows(tmp_path, drop):
    data = write_jsonl(tmp_path / "data.jsonl", ITEMS)
    cfg = RunConfig.model_validate({
        "name": "gen", "output_dir": str(tmp_path / "runs"),
        "generate": {"input": str(data), "mode": "rationale", "template": "{question}", "n_samples": 2,
                     "batch_size": 4, "verifier": "numeric",
                     "export": {"path": str(tmp_path / "r.jsonl"), "drop_parse_failures": drop,
                                "label_type": "llm"}}})
    s = run_generate(cfg, complete_fn=rationale_teacher, teacher_id="fake", log=lambda m: None)
    # i in {0, 3}: 2 parsed + verified each; i in {1, 4}: 2 parse failures each; i in {2, 5}: 1 empty + 1 parsed wrong.
    assert s["malformed"] == {"empty": 2} and s["malformed_total"] == 2
    assert s["rationale_parse"] == {"ok": 6, "failed": 4}
    assert s["verifier"]["passed"] == 4 and s["verifier"]["failed"] == 6
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert len(rows) == (6 if drop else 10) and s["export"]["dropped_parse_failures"] == (4 if drop else 0)
    good = next(r for r in rows if r["prompt_id"] == "q3")
    assert {k: good[k] for k in ("input", "rationale", "label", "answer", "parse_ok", "verified")} == {
        "input": "What is 3 plus 3?", "rationale": "3 plus 3 is 6.", "label": "6", "answer": 6, "parse_ok": True,
        "verified": True}
    if not drop:
        bad = next(r for r in rows if r["prompt_id"] == "q1")
        assert bad["label"] == " " and bad["parse_ok"] is False and bad["rationale"] == "I think it is 3"
    # label_type=gt replaces the teacher's label by the reference answer.
    cfg.generate.export.label_type = "gt"
    run_generate(cfg, export_only=True, log=lambda m: None)
    gt_rows = read_jsonl(tmp_path / "r.jsonl")
    assert all(r["label"] == str(r["answer"]) for r in gt_rows)


def junk_teacher(prompts: list[str], n: int):
    out = []
    for p in prompts:
        i = int(p.split()[2])
        out.append([["fine text"], [None], ["   "], "not a list", [7], ["ok"]][i][:n])
    if len(prompts) == 1 and "5" in prompts[0]:
        raise ConnectionError("the teacher hung up")
    return out


def test_malformed_outputs_and_failed_calls_are_counted_not_fatal(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ITEMS)
    cfg = RunConfig.model_validate({
        "name": "gen", "output_dir": str(tmp_path / "runs"),
        "generate": {"input": str(data), "template": "{question}", "batch_size": 6,
                     "export": {"path": str(tmp_path / "c.jsonl")}}})
    calls = []

    def teacher(prompts, n):
        calls.append(len(prompts))
        if len(prompts) > 1:
            raise TimeoutError("batch too slow")  # forces the prompt-by-prompt retry
        return junk_teacher(prompts, n)

    s = run_generate(cfg, complete_fn=teacher, teacher_id="junk", log=lambda m: None)
    assert calls == [6, 1, 1, 1, 1, 1, 1]
    # q0 fine; q1 None; q2 blank; q3 not a list (0 samples); q4 an int; q5's call raises.
    assert s["malformed"] == {"call_failed": 1, "empty": 1, "non_string": 2, "wrong_sample_count": 1}
    assert s["samples_stored"] == 6 and s["export"]["rows"] == 1
    summary = json.loads((tmp_path / "runs" / "gen" / "generations.jsonl.summary.json").read_text())
    assert summary["malformed_total"] == 5


def test_a_dead_teacher_stops_after_n_failed_calls_and_stores_nothing_half_done(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ITEMS)
    cfg = RunConfig.model_validate({
        "name": "gen", "output_dir": str(tmp_path / "runs"),
        "generate": {"input": str(data), "template": "{question}", "batch_size": 3, "max_failed_calls_in_a_row": 3}})

    def dead(prompts, n):
        raise ConnectionRefusedError("nobody home")

    from stillroom.datagen.complete import TeacherDownError

    with pytest.raises(TeacherDownError, match="3 calls in a row"):
        run_generate(cfg, complete_fn=dead, teacher_id="dead", log=lambda m: None)
    assert (tmp_path / "runs" / "gen" / "generations.jsonl").read_text() == ""


# ----------------------------------------------------------------------------- recipe errors


@pytest.mark.parametrize("override, needle", [
    ("generate.n_sample=2", "generate.n_samples"),
    ("generate.template={questoin}", "'questoin'"),
    ("generate.mode=paraphrase", "generate.mode"),
    ("generate.export.keep=verified", "needs generate.verifier"),
    ("generate.verifier=nosuchmodule:fn", "nosuchmodule"),
    ("generate.mode=rationale", "needs field 'answer'"),  # export.label_type=gt (default)
])
def test_bad_recipe_keys_give_clear_errors_before_any_teacher(tmp_path, capsys, override, needle):
    data = write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "question": "hi"}])
    recipe = write_recipe(tmp_path, {"input": str(data), "template": "{question}",
                                     "export": {"path": str(tmp_path / "x.jsonl")}},
                          teacher={"model": {"path": str(tmp_path / "no-such-model")}})
    assert main(["generate", str(recipe), override]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "runs").exists()


def test_missing_input_and_template_are_named(tmp_path, capsys):
    recipe = write_recipe(tmp_path, {"template": "{question}"})
    assert main(["generate", str(recipe)]) == 2
    assert "generate.input is not set" in capsys.readouterr().err
    recipe = write_recipe(tmp_path, {"input": {"n": 2}})
    assert main(["generate", str(recipe)]) == 2
    assert "generate.template is not set" in capsys.readouterr().err


# ----------------------------------------------------------------------------- remote teachers


class FakeOpenAI(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat server: deterministic texts, optional delay, junk for some prompts."""

    delay_s = 0.0
    seen: list[str] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self._send(200, {"data": [{"id": "fake"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        type(self).seen.append(prompt)
        time.sleep(self.delay_s)
        if "junk-none" in prompt:
            return self._send(200, {"choices": [{"index": 0, "message": {"content": None}}]})
        if "junk-empty" in prompt:
            text = ""
        else:
            text = f"echo: {prompt} (seed {body.get('seed')})"
        self._send(200, {"choices": [{"index": i, "message": {"role": "assistant", "content": text}}
                                     for i in range(body.get("n", 1))]})


@pytest.fixture
def fake_server(loopback):
    handler = type("Handler", (FakeOpenAI,), {"seen": [], "delay_s": 0.0})
    return handler, loopback(handler).url


def test_remote_junk_is_counted_and_the_rest_is_kept(tmp_path, fake_server, capsys):
    handler, url = fake_server
    rows = [{"id": "a", "question": "fine one"}, {"id": "b", "question": "junk-none"},
            {"id": "c", "question": "junk-empty"}, {"id": "d", "question": "fine two"}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    recipe = write_recipe(tmp_path, {"input": str(data), "template": "{question}", "batch_size": 4, "n_samples": 2},
                          teacher={"source": "remote", "remote": {"url": url, "model": "fake", "max_retries": 0}})
    assert main(["generate", str(recipe)]) == 0, capsys.readouterr().err
    recs = {r["key"]: r for r in read_jsonl(tmp_path / "runs" / "gen" / "generations.jsonl")}
    assert len(recs) == 8
    assert "a choice has no text" in recs["b#0"]["error"] and recs["c#1"]["error"] == "empty output"
    assert recs["a#0"]["text"].startswith("echo: fine one") and recs["a#0"]["teacher"] == f"remote:{url}#fake"
    summary = json.loads((tmp_path / "runs" / "gen" / "generations.jsonl.summary.json").read_text())
    assert summary["malformed"] == {"call_failed": 2, "empty": 2}


def test_remote_serve_teacher_on_loopback_with_an_api_key_from_the_env(tmp_path, tiny_teacher_dir, monkeypatch,
                                                                        capsys):
    model, tok = load_saved(tiny_teacher_dir)
    secret = "sk-test-5ecret-value"
    monkeypatch.setenv("GEN_TEST_KEY", secret)
    with serve(teacher_app(model, tok, max_top_k=8, api_key=secret)) as server:
        recipe = write_recipe(
            tmp_path,
            {"input": {"n": 3}, "template": "{question}", "n_samples": 2, "max_new_tokens": 4, "batch_size": 3,
             "export": {"path": str(tmp_path / "t.jsonl")}},
            teacher={"source": "remote", "remote": {"url": server.url, "model": "tiny", "api_key_env": "GEN_TEST_KEY"}})
        assert main(["generate", str(recipe)]) == 0
    out = capsys.readouterr()
    recs = read_jsonl(tmp_path / "runs" / "gen" / "generations.jsonl")
    assert len(recs) == 6 and all(isinstance(r["text"], str) and "error" not in r for r in recs)
    everything = out.out + out.err + "".join(p.read_text() for p in tmp_path.rglob("*.json*"))
    assert secret not in everything
    # Without the key the server refuses (401), stated without the key.
    monkeypatch.setenv("GEN_TEST_KEY", "wrong")
    with serve(teacher_app(model, tok, max_top_k=8, api_key=secret)) as server:
        assert main(["generate", str(recipe), "generate.output=" + str(tmp_path / "other.jsonl"),
                     f"teacher.remote.url={server.url}", "teacher.remote.max_retries=0"]) == 1
    err = capsys.readouterr().err
    assert "401" in err and secret not in err


# ----------------------------------------------------------------------------- SIGKILL and resume


def test_sigkill_mid_run_then_rerun_gives_every_sample_exactly_once(tmp_path, fake_server, capsys):
    handler, url = fake_server
    handler.delay_s = 0.4
    n_items, n_samples = 10, 2
    recipe = write_recipe(
        tmp_path,
        {"input": {"n": n_items, "seed": 3}, "template": "{question}", "n_samples": n_samples, "batch_size": 2},
        teacher={"source": "remote", "remote": {"url": url, "model": "fake", "concurrency": 2}})
    store = tmp_path / "runs" / "gen" / "generations.jsonl"
    env = cli_env(PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "stillroom.cli.main", "generate", str(recipe)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if store.exists() and store.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with GenerationStore(store, read_only=True) as s:
        partial = s.read()  # a torn last line (killed mid-write) is left out
    assert 0 < len(partial) < n_items * n_samples
    asked_before = len(handler.seen)
    handler.delay_s = 0.0
    assert main(["generate", str(recipe)]) == 0  # the rerun, in process (one subprocess start is slow enough)
    rerun_err = capsys.readouterr().err
    recs = read_jsonl(store)
    keys = [r["key"] for r in recs]
    from stillroom.data.arithmetic import generate_problems

    expected = {f"{p['id']}#{s}" for p in generate_problems(n_items, seed=3) for s in range(n_samples)}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    # The rerun asked only for prompts not finished before the kill.
    finished = {r["prompt_id"] for r in partial}
    asked_again = handler.seen[asked_before:]
    questions = {p["id"]: p["question"] for p in generate_problems(n_items, seed=3)}
    assert not any(questions[pid] == q for pid in finished for q in asked_again)
    with GenerationStore(store, read_only=True) as s:
        assert s.errors == 0
    assert f"({len(expected) - len(partial)} now, {len(partial)} before)" in rerun_err


def test_paths_fill_in_output_dir_and_name_and_refuse_other_braces(tmp_path):
    from stillroom.config.load import ConfigError
    from stillroom.datagen.generate import export_path, store_path

    cfg = RunConfig.model_validate({"name": "n1", "output_dir": str(tmp_path),
                                    "generate": {"export": {"path": "{output_dir}/{name}/train.jsonl"}}})
    assert store_path(cfg) == tmp_path / "n1" / "generations.jsonl"
    assert export_path(cfg) == tmp_path / "n1" / "train.jsonl"
    cfg.generate.output = "{output_dir}/{nmae}.jsonl"
    with pytest.raises(ConfigError, match="generate.output"):
        store_path(cfg)
