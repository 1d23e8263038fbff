"""Teacher generation into the store: resume, malformed outputs, error policy, HF helper, and a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer

from stillroom.data.arithmetic import generate_problems
from stillroom.datagen.store import GenerationStore
from stillroom.datagen.complete import generate_with, generate_with_teacher, hf_complete_fn, render_prompts

HERE = Path(__file__).parent
ITEMS = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": 2 * i} for i in range(7)]


class FakeTeacher:
    """complete_fn that echoes the prompt; records every call."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, prompts: list[str], n: int) -> list[list[str]]:
        self.calls.append(list(prompts))
        if self.fail_on is not None and any(self.fail_on in p for p in prompts):
            raise RuntimeError("teacher exploded")
        return [[f"{p} -> sample {s}" for s in range(n)] for p in prompts]


def gen(store, teacher, items=ITEMS, **kw):
    args = dict(template="Q: {question}", n_samples=2, batch_size=3, store=store, teacher_id="fake",
                settings={"seed": 0})
    args.update(kw)
    return generate_with(teacher, items, **args)


def keys_in(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def test_generates_all_and_resume_skips_done(tmp_path):
    path = tmp_path / "g.jsonl"
    with GenerationStore(path) as st:
        stats = gen(st, FakeTeacher(), items=ITEMS[:4])
    assert stats["samples_written"] == 8 and stats["batches"] == 2 and stats["errors"] == 0
    teacher = FakeTeacher()
    with GenerationStore(path) as st:
        stats = gen(st, teacher)
    assert stats["samples_skipped"] == 8 and stats["samples_written"] == 6
    assert teacher.calls == [["Q: What is 4 + 4?", "Q: What is 5 + 5?", "Q: What is 6 + 6?"]]
    expected = {f"q{i}#{s}" for i in range(7) for s in range(2)}
    assert sorted(keys_in(path)) == sorted(expected)
    rows = GenerationStore(path, read_only=True).read()
    assert rows[0]["text"] == "Q: What is 0 + 0? -> sample 0" and rows[0]["teacher"] == "fake"
    assert rows[0]["settings"] == {"seed": 0}


def test_more_samples_later_only_generates_missing_indices(tmp_path):
    with GenerationStore(tmp_path / "g.jsonl") as st:
        gen(st, FakeTeacher(), n_samples=1)
        stats = gen(st, FakeTeacher(), n_samples=3)
        assert stats["samples_skipped"] == 7 and stats["samples_written"] == 14
        assert len(st) == 21


def test_malformed_outputs_are_stored_with_errors_and_counted(tmp_path):
    def bad_teacher(prompts, n):
        out = []
        for p in prompts:
            if "1 + 1" in p:
                out.append(["", "  \n"])  # empty outputs
            elif "2 + 2" in p:
                out.append([None, 7])  # not strings
            elif "3 + 3" in p:
                out.append(["only one"])  # too few samples
            else:
                out.append(["fine", "The answer is 5."])
        return out

    def needs_answer(text, item):
        return None if "The answer is" in text else "no answer trigger"

    with GenerationStore(tmp_path / "g.jsonl") as st:
        stats = gen(st, bad_teacher, items=ITEMS[:5])
        assert stats["samples_written"] == 10 and stats["errors"] == 5 and st.errors == 5
    rows = {r["key"]: r for r in GenerationStore(tmp_path / "g.jsonl", read_only=True).read()}
    assert rows["q1#0"]["error"] == "empty output" and rows["q1#0"]["text"] == ""
    assert "not str" in rows["q2#1"]["error"] and rows["q2#1"]["text"] is None
    assert "returned 1 samples" in rows["q3#1"]["error"] and "error" not in rows["q3#0"]
    with GenerationStore(tmp_path / "h.jsonl") as st:
        stats = gen(st, lambda p, n: [["fine", "The answer is 5."] for _ in p], items=ITEMS[:2], check=needs_answer)
        assert stats["errors"] == 2


def test_wrong_number_of_prompt_results_is_an_error_not_a_crash(tmp_path):
    with GenerationStore(tmp_path / "g.jsonl") as st:
        stats = gen(st, lambda p, n: [["x"] * n], items=ITEMS[:3])
        assert stats["errors"] == 6 and len(st) == 6


def test_teacher_exception_raises_by_default_and_resume_continues(tmp_path):
    path = tmp_path / "g.jsonl"
    with GenerationStore(path) as st:
        with pytest.raises(RuntimeError, match="exploded"):
            gen(st, FakeTeacher(fail_on="4 + 4"))
        assert len(st) == 6  # the first batch (q0..q2) is durable
    with GenerationStore(path) as st:
        stats = gen(st, FakeTeacher())
        assert stats["samples_skipped"] == 6 and len(st) == 14 and st.errors == 0


def test_on_error_record_isolates_the_failing_prompt(tmp_path):
    teacher = FakeTeacher(fail_on="4 + 4")
    with GenerationStore(tmp_path / "g.jsonl") as st:
        stats = gen(st, teacher, on_error="record")
        assert len(st) == 14 and stats["errors"] == 2
    rows = {r["key"]: r for r in GenerationStore(tmp_path / "g.jsonl", read_only=True).read()}
    assert "teacher exploded" in rows["q4#0"]["error"] and "error" not in rows["q5#0"]
    assert teacher.calls[2:5] == [["Q: What is 3 + 3?"], ["Q: What is 4 + 4?"], ["Q: What is 5 + 5?"]]


def test_bad_items_fail_before_any_generation(tmp_path):
    teacher = FakeTeacher()
    with GenerationStore(tmp_path / "g.jsonl") as st:
        with pytest.raises(KeyError, match=r"'context' is missing from item 0 \(id='q0'\)"):
            gen(st, teacher, template="{context} {question}")
        with pytest.raises(ValueError, match="duplicate id 'q1'"):
            gen(st, teacher, items=ITEMS[:2] + [ITEMS[1]])
        with pytest.raises(KeyError, match="no 'id' field"):
            gen(st, teacher, items=[{"question": "x"}])
        with pytest.raises(ValueError, match=">= 1"):
            gen(st, teacher, n_samples=0)
    assert teacher.calls == []
    assert render_prompts([{"id": 3, "q": "a"}], "<{q}>") == [("3", "<a>")]


def test_mixing_teachers_or_settings_in_one_store_is_refused(tmp_path):
    with GenerationStore(tmp_path / "g.jsonl") as st:
        gen(st, FakeTeacher(), items=ITEMS[:2])
        with pytest.raises(ValueError, match="already holds samples from teacher 'fake'"):
            gen(st, FakeTeacher(), settings={"seed": 1})
        with pytest.raises(ValueError, match="already holds"):
            gen(st, FakeTeacher(), teacher_id="other")
        stats = gen(st, FakeTeacher(), teacher_id="other", allow_mixed_settings=True)
        assert stats["samples_written"] == 10


# ------------------------------------------------------------------ local HF teacher

@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_llama(len(tok), layers=2, seed=0), tok


def test_hf_complete_fn_is_seeded_and_leaves_state_untouched(tiny):
    model, tok = tiny
    model.train()
    complete = hf_complete_fn(model, tok, sampling_temperature=1.0, top_p=0.9, max_new_tokens=6, seed=0)
    rng_before = torch.get_rng_state()
    a = complete(["hello there", "a much longer prompt about the python language"], 3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert model.training and tok.padding_side == "right"
    model.eval()
    assert [len(x) for x in a] == [3, 3] and all(isinstance(t, str) for x in a for t in x)
    assert complete(["hello there", "a much longer prompt about the python language"], 3) == a
    other = hf_complete_fn(model, tok, sampling_temperature=1.0, top_p=0.9, max_new_tokens=6, seed=1)
    assert other(["hello there", "a much longer prompt about the python language"], 3) != a


def test_hf_left_padding_batch_matches_single_prompts(tiny):
    model, tok = tiny
    complete = hf_complete_fn(model, tok, sampling_temperature=0.0, top_p=1.0, max_new_tokens=5, seed=0,
                              use_chat_template=False)
    prompts = ["def", "the quick brown fox jumps over the lazy dog and then"]
    assert complete(prompts, 1) == [complete([p], 1)[0] for p in prompts]
    with pytest.raises(ValueError, match="greedy"):
        complete(prompts, 2)


def test_hf_chat_template_applied_and_pad_token_restored(tiny, monkeypatch):
    model, tok = tiny
    seen = []
    real_generate = model.generate

    def spy(**kw):
        seen.append(kw["input_ids"])
        return real_generate(**kw)

    monkeypatch.setattr(model, "generate", spy)
    complete = hf_complete_fn(model, tok, sampling_temperature=0.7, top_p=1.0, max_new_tokens=3, seed=0)
    complete(["hi", "a longer prompt"], 1)
    text = tok.decode(seen[-1][0])
    assert text.startswith("<|endoftext|>")  # left padding
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" in text
    tok2 = tiny_tokenizer()
    tok2.pad_token = None
    tok2.chat_template = None
    plain = hf_complete_fn(model, tok2, sampling_temperature=0.7, top_p=1.0, max_new_tokens=3, seed=0)
    plain(["hi", "a longer prompt"], 1)
    assert "<|im_start|>" not in tok2.decode(seen[-1][1]) and tok2.pad_token is None
    with pytest.raises(ValueError, match="no chat_template"):
        hf_complete_fn(model, tok2, sampling_temperature=1.0, top_p=1.0, max_new_tokens=3, seed=0,
                       use_chat_template=True)
    for bad in (dict(sampling_temperature=-1.0), dict(top_p=0.0), dict(max_new_tokens=0)):
        args = dict(sampling_temperature=1.0, top_p=1.0, max_new_tokens=3, seed=0) | bad
        with pytest.raises(ValueError):
            hf_complete_fn(model, tok, **args)


def test_generate_with_teacher_end_to_end(tiny, tmp_path):
    model, tok = tiny
    items = generate_problems(5, seed=0)
    with GenerationStore(tmp_path / "g.jsonl") as st:
        stats = generate_with_teacher(model, tok, items, template="{question}", n_samples=2,
                                      sampling_temperature=1.0, top_p=0.95, max_new_tokens=4, batch_size=2,
                                      store=st, teacher_id="tiny", seed=0, check=None)
        assert stats["samples_written"] == 10 and stats["batches"] == 3
    row = GenerationStore(tmp_path / "g.jsonl", read_only=True).read()[0]
    assert row["settings"] == {"sampling_temperature": 1.0, "top_p": 0.95, "max_new_tokens": 4, "seed": 0,
                               "template": "{question}"}
    with GenerationStore(tmp_path / "h.jsonl") as st, pytest.raises(ValueError, match="greedy"):
        generate_with_teacher(model, tok, items, template="{question}", n_samples=2, sampling_temperature=0.0,
                              top_p=1.0, max_new_tokens=4, batch_size=2, store=st, teacher_id="tiny", seed=0)


@pytest.mark.multiproc
def test_sigkill_mid_run_then_resume_gives_exact_key_set(tmp_path):
    sys.path.insert(0, str(HERE))
    from gen_worker import BATCH, N_SAMPLES, run

    n_items = 24
    path = tmp_path / "g.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(HERE / "gen_worker.py"), str(path), str(n_items)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    lines_at_kill = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                lines_at_kill = path.read_bytes().count(b"\n")
                if lines_at_kill >= BATCH * N_SAMPLES:  # at least one batch is durable
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"worker ended before it could be killed: {proc.communicate()[1][-2000:]!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept = path.read_bytes().count(b"\n")
    assert 0 < kept < n_items * N_SAMPLES, "the kill must land mid-way"
    with open(path, "ab") as f:  # also simulate a write torn by the crash
        f.write(b'{"key": "arith-')

    stats = run(str(path), n_items)
    assert stats["store"]["torn_lines_repaired"] == 1
    assert stats["samples_skipped"] == kept and stats["samples_written"] == n_items * N_SAMPLES - kept
    keys = keys_in(path)
    expected = {f"{p['id']}#{s}" for p in generate_problems(n_items, seed=0) for s in range(N_SAMPLES)}
    assert len(keys) == len(set(keys)) == len(expected)  # no duplicates
    assert set(keys) == expected  # no gaps
