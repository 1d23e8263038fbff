"""The arithmetic generator: determinism, exact answers re-derived from the rationale text, levels, formats."""

from __future__ import annotations

import json
import re

import pytest

from stillroom.data.arithmetic import ANSWER_TRIGGER, generate_problems, write_jsonl

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _check_rationale(p: dict) -> list[tuple[int, str, int, int]]:
    """Parse every 'a op b = c' in the rationale, re-evaluate it, and return the steps."""
    steps = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(p["rationale"])]
    assert steps, p
    for a, op, b, c in steps:
        if op == "+":
            assert a + b == c, p
        elif op == "-":
            assert a - b == c and c >= 0, p
        elif op == "*":
            assert a * b == c, p
        else:
            assert b != 0 and a % b == 0 and a // b == c, p
    return steps


def test_same_seed_identical_different_seed_differs():
    a, b, c = generate_problems(60, seed=3), generate_problems(60, seed=3), generate_problems(60, seed=4)
    assert a == b
    assert [p["question"] for p in a] != [p["question"] for p in c]
    assert len({p["question"] for p in a} & {p["question"] for p in c}) < 10


def test_prefix_property_and_unique_ids():
    long = generate_problems(90, seed=11)
    assert generate_problems(30, seed=11) == long[:30]
    assert len({p["id"] for p in long}) == 90
    assert len({p["question"] for p in long}) == 90


def test_answers_follow_from_rationale_arithmetic():
    for p in generate_problems(600, seed=0):
        steps = _check_rationale(p)
        assert steps[-1][3] == p["answer"]
        assert isinstance(p["answer"], int) and p["answer"] >= 0
        # every operand is either a number from the question or an earlier result
        question_numbers = {int(x) for x in re.findall(r"\d+", p["question"])}
        earlier: set[int] = set()
        for a, _, b, c in steps:
            assert a in question_numbers | earlier and b in question_numbers | earlier, p
            earlier.add(c)


def test_levels_differ_in_step_counts():
    probs = generate_problems(300, seed=5)
    counts = {lv: {len(STEP.findall(p["rationale"])) for p in probs if p["level"] == lv} for lv in (1, 2, 3)}
    assert counts[1] == {1} and counts[2] == {2} and counts[3] == {3, 4}
    for p in probs:
        assert p["steps"] == len(STEP.findall(p["rationale"]))
    lvl3_ops = [set(re.findall(r" ([*/]) ", p["rationale"])) for p in probs if p["level"] == 3]
    assert all(ops for ops in lvl3_ops)  # level 3 always multiplies or divides


def test_levels_selection_and_variety():
    probs = generate_problems(200, seed=1, levels=(2,))
    assert {p["level"] for p in probs} == {2}
    openings = {" ".join(p["question"].split()[2:5]) for p in probs}
    assert len(openings) > 10
    names = {p["question"].split()[0] for p in generate_problems(200, seed=1)}
    assert len(names) > 10


def test_record_fields_are_consistent():
    for p in generate_problems(30, seed=2):
        n = p["answer"]
        assert p["label_completion"] == f"{ANSWER_TRIGGER} {n}."
        assert p["completion"] == f"{p['rationale']} {ANSWER_TRIGGER} {n}."
        assert p["prompt"].startswith(p["question"]) and ANSWER_TRIGGER in p["prompt"]
        assert p["messages"][0] == {"role": "user", "content": p["prompt"].rstrip("\n")}
        assert p["messages"][1] == {"role": "assistant", "content": p["completion"]}
        assert p["id"].startswith(f"arith-{p['level']}-")


@pytest.mark.parametrize("bad", [dict(n=-1, seed=0), dict(n=3, seed=0, levels=()), dict(n=3, seed=0, levels=(4,)),
                                 dict(n=3, seed="x")])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        generate_problems(**bad)


def test_write_jsonl_formats(tmp_path):
    probs = generate_problems(5, seed=0)
    pc = write_jsonl(probs, tmp_path / "sub" / "pc.jsonl")
    rows = [json.loads(line) for line in pc.read_text().splitlines()]
    assert [r["prompt"] + r["completion"] for r in rows] == [p["prompt"] + p["completion"] for p in probs]
    assert set(rows[0]) == {"id", "level", "prompt", "completion", "answer"}
    msg = write_jsonl(probs, tmp_path / "m.jsonl", format="messages")
    rows = [json.loads(line) for line in msg.read_text().splitlines()]
    assert rows[0]["messages"] == probs[0]["messages"] and "prompt" not in rows[0]
    full = write_jsonl(probs, tmp_path / "f.jsonl", format="full")
    assert [json.loads(line) for line in full.read_text().splitlines()] == probs
    assert not list(tmp_path.glob("**/*.tmp"))
    with pytest.raises(ValueError, match="format"):
        write_jsonl(probs, tmp_path / "x.jsonl", format="csv")
