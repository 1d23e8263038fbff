"""Verifiers: number extraction in many formats, numeric/string matching, and loading from a spec."""

from __future__ import annotations

import sys
import textwrap

import pytest

from stillroom.data.arithmetic import generate_problems
from stillroom.datagen.verifiers import (
    VerifierSpecError,
    extract_number,
    load_verifier,
    numeric_match,
    string_match,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 42.", 42),
        ("so 3 * 4 = 12 apples. The answer is 12", 12),
        ("The answer is $1,234.50.", 1234.5),
        ("the answer is -7", -7),
        ("THE ANSWER IS: **1,000**", 1000),
        ("It is \u22123.5 degrees", -3.5),
        ("total .5", 0.5),
        ("x = 5-3 = 2", 2),  # a hyphen between digits is subtraction, not a sign
        ("The answer is 12. Then 99 more words", 12),  # the trigger wins over the last number
        ("The answer is 3. Wait. The answer is 4.", 4),  # the last trigger wins
        ("The answer is unknown; I computed 17.", 17),  # trigger without a number: last number
        ("42.", 42),
        ("The answer is 0", 0),
        ("1,234,567 people", 1234567),
        ("It costs 2.50 dollars", 2.5),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    got = extract_number(text)
    assert got == expected
    if expected is not None:
        assert type(got) is type(expected)


def test_extract_number_type_error():
    with pytest.raises(TypeError):
        extract_number(42)  # type: ignore[arg-type]


def test_numeric_match():
    assert numeric_match("so the answer is 12.", 12)
    assert numeric_match("The answer is 12.0000001", 12)
    assert not numeric_match("The answer is 12.01", 12)
    assert numeric_match("The answer is 1,200", "1,200")
    assert not numeric_match("no number", 3)
    assert numeric_match("The answer is 2000000.5", 2000000.5, tol=1e-9)
    assert not numeric_match("The answer is 5", float("nan"))
    with pytest.raises(TypeError):
        numeric_match("The answer is 1", True)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        numeric_match("The answer is 1", "abc")


def test_every_generated_completion_verifies_and_wrong_answers_do_not():
    for p in generate_problems(90, seed=7):
        assert numeric_match(p["completion"], p["answer"])
        assert numeric_match(p["label_completion"], p["answer"])
        assert not numeric_match(p["completion"].replace(f"is {p['answer']}.", f"is {p['answer'] + 1}."), p["answer"])


def test_string_match():
    assert string_match("Reasoning... The answer is Paris.", "Paris")
    assert string_match("The answer is  **paris** ", "The answer is Paris.")
    assert string_match("yes", "Yes!")
    assert not string_match("The answer is Lyon.", "Paris")
    assert not string_match("The answer is paris", "Paris", normalize=False)
    assert string_match("The answer is Paris", "Paris", normalize=False)
    assert string_match("The answer is \uff21", "a")  # NFKC: full-width A
    with pytest.raises(TypeError):
        string_match("x", 3)  # type: ignore[arg-type]


def test_builtin_specs():
    num, st = load_verifier("numeric"), load_verifier(" string ")
    item = {"id": "q1", "answer": 12}
    assert num("... The answer is 12.", item) and not num("The answer is 13.", item)
    assert st("The answer is 12.", item) and not st("The answer is twelve.", item)
    with pytest.raises(KeyError, match="'answer'.*q2"):
        num("The answer is 1", {"id": "q2"})


def test_module_path_verifier(tmp_path, monkeypatch):
    pkg = tmp_path / "myverifs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "checks.py").write_text(textwrap.dedent("""
        NOT_CALLABLE = 3

        def even(text, item):
            return len(text) % 2 == 0

        def not_bool(text, item):
            return "yes"

        class Holder:
            @staticmethod
            def always(text, item):
                return True
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        even = load_verifier("myverifs.checks:even")
        assert even("ab", {}) is True and even("abc", {}) is False
        assert load_verifier("myverifs.checks:Holder.always")("x", {}) is True
        with pytest.raises(TypeError, match="returned str"):
            load_verifier("myverifs.checks:not_bool")("x", {})
        with pytest.raises(VerifierSpecError, match="not a callable"):
            load_verifier("myverifs.checks:NOT_CALLABLE")
        with pytest.raises(VerifierSpecError, match="no attribute 'missing'"):
            load_verifier("myverifs.checks:missing")
        with pytest.raises(VerifierSpecError, match="cannot import module 'myverifs.nope'"):
            load_verifier("myverifs.nope:even")
    finally:
        for name in [m for m in sys.modules if m.startswith("myverifs")]:
            del sys.modules[name]


@pytest.mark.parametrize("spec", ["", "exact", "os.system('x'):f", "a:b:c", "mod:", ":fn", "1mod:fn", "__import__('os')"])
def test_bad_specs_are_rejected_without_evaluation(spec):
    with pytest.raises(VerifierSpecError):
        load_verifier(spec)


def test_non_string_spec():
    with pytest.raises(VerifierSpecError):
        load_verifier(None)  # type: ignore[arg-type]
