"""Bundled sets: pydoc order, deterministic instructions with derivable answers, arithmetic."""

from __future__ import annotations

import pytest

import stillroom.data.arithmetic  # noqa: F401  (in-repo: a broken import must fail here, not skip)
from stillroom.data.bundled import bundled_records, generate_instructions
from stillroom.data.errors import DataError


def test_pydoc_records_in_sorted_order():
    from pydoc_data.topics import topics

    recs = [fields for fields, _where in bundled_records("pydoc", seed=0)]
    # Sections in sorted topic order, parts counted from 0 within each topic.
    seen = []
    for r in recs:
        if not seen or seen[-1] != r["topic"]:
            seen.append(r["topic"])
            assert r["part"] == 0
    assert seen == sorted(topics)
    # The sections of a topic give back its text (up to the blank lines at the cuts), none is oversized.
    first = [r["text"] for r in recs if r["topic"] == seen[0]]
    assert "".join(first).replace("\n", "") == topics[seen[0]].replace("\n", "")
    big = max(len(t) for t in topics.values())
    assert len(recs) > len(topics) and max(len(r["text"]) for r in recs) < big
    assert len(list(bundled_records("pydoc", seed=0, limit=5))) == 5


def test_instructions_deterministic_per_seed():
    a, b, c = generate_instructions(50, 0), generate_instructions(50, 0), generate_instructions(50, 1)
    assert a == b and a != c
    for rec in a:
        roles = [m["role"] for m in rec["messages"]]
        assert roles[-1] == "assistant" and "user" in roles
        assert all(m["content"].strip() for m in rec["messages"])


def test_instruction_answers_are_derivable():
    recs = generate_instructions(300, seed=4)
    seen = set()
    for rec in recs:
        msgs = [m for m in rec["messages"] if m["role"] != "system"]
        for (user, assistant), name in zip(zip(msgs[::2], msgs[1::2]), rec["template"].split("+")):
            seen.add(name)
            body = user["content"].split("\n\n", 1)[1]
            if name == "upper":
                assert assistant["content"] == body.upper()
            elif name == "reverse":
                assert assistant["content"].split() == body.split()[::-1]
            elif name == "count":
                assert assistant["content"] == f"The sentence has {len(body.split())} words."
            elif name == "first_sentence":
                assert body.startswith(assistant["content"])
            elif name == "topic":
                assert f"- {assistant['content']}\n" in user["content"] + "\n"
    assert seen == {"upper", "count", "reverse", "first_sentence", "long_words", "topic"}


def test_arithmetic_is_lazy_and_seeded():
    a = [fields for fields, _ in bundled_records("arithmetic", seed=0, limit=5)]
    assert a == [fields for fields, _ in bundled_records("arithmetic", seed=0, limit=5)]
    assert len(a) == 5 and {"prompt", "completion"} <= set(a[0])


def test_unknown_bundled_name():
    with pytest.raises(DataError, match="unknown bundled data set"):
        bundled_records("nope", seed=0)
