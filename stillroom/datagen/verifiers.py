"""Answer verifiers: decide whether a generated text reaches the expected answer.

Used to filter teacher generations (REDI positives/negatives, self-data
distillation's answer-match fallback, rejection sampling) and to score task
accuracy. A verifier is ``fn(text: str, item: dict) -> bool`` where ``item`` is
the source record (it carries ``answer``).

``load_verifier(spec)`` builds one from a config string:
    ``"numeric"``            -> :func:`numeric_match` against ``item["answer"]``;
    ``"string"``             -> :func:`string_match` against ``str(item["answer"])``;
    ``"package.module:func"``-> ``func`` imported with importlib (never eval).
"""

from __future__ import annotations

import importlib
import math
import re
import unicodedata
from collections.abc import Callable

from stillroom.data.arithmetic import ANSWER_TRIGGER

Verifier = Callable[[str, dict], bool]

# A number: optional sign (not glued to a preceding word or digit, so "3-4" gives 3 and 4),
# thousands groups with commas or plain digits, optional decimals; or a bare ".5".
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-\u2212])?(?P<num>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"|(?<=[\w.])(?P<num2>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?)"
)
_TRIGGER = re.compile(re.escape(ANSWER_TRIGGER), re.IGNORECASE)
_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class VerifierSpecError(ValueError):
    """A verifier spec that cannot be turned into a callable."""


def _numbers(text: str) -> list[int | float]:
    out: list[int | float] = []
    for m in _NUMBER.finditer(text):
        raw = m.group("num") or m.group("num2")
        negative = m.group("sign") is not None
        raw = raw.replace(",", "")
        value: int | float = float(raw) if "." in raw else int(raw)
        out.append(-value if negative else value)
    return out


def extract_number(text: str) -> int | float | None:
    """The final answer number of ``text``, or None if it has no number.

    Rule: the first number after the last "The answer is" (case-insensitive)
    that is followed by a number; if no trigger is followed by a number, the
    last number in the text. Handles thousands commas ("1,234"), signs ("-5",
    Unicode minus), decimals ("2.5", ".5"), currency ("$12") and a trailing
    period ("42."). Returns an int when the number has no decimal point.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_number expects a str, got {type(text).__name__}")
    triggers = [m.end() for m in _TRIGGER.finditer(text)]
    for start in reversed(triggers):
        found = _numbers(text[start:])
        if found:
            return found[0]
    found = _numbers(text)
    return found[-1] if found else None


def _as_number(answer: object) -> float:
    if isinstance(answer, bool):
        raise TypeError("answer must be a number or a numeric string, got a bool")
    if isinstance(answer, (int, float)):
        return float(answer)
    if isinstance(answer, str):
        value = extract_number(answer)
        if value is None:
            raise ValueError(f"expected answer {answer!r} contains no number")
        return float(value)
    raise TypeError(f"answer must be a number or a numeric string, got {type(answer).__name__}")


def numeric_match(text: str, answer: int | float | str, tol: float = 1e-6) -> bool:
    """True iff ``extract_number(text)`` equals ``answer`` within ``tol * max(1, |answer|)``.

    ``answer`` may be a number or a numeric string ("1,200"). NaN never matches.
    """
    got = extract_number(text)
    if got is None:
        return False
    want = _as_number(answer)
    if math.isnan(want):
        return False
    return abs(float(got) - want) <= tol * max(1.0, abs(want))


def _answer_span(text: str) -> str:
    """The text after the last "The answer is", or all of it when there is no trigger."""
    last = None
    for last in _TRIGGER.finditer(text):
        pass
    return text[last.end():] if last is not None else text


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    text = text.strip().strip("*_`\"' ")
    text = text.rstrip(".!?;: ").strip("*_`\"' ")
    return text


def string_match(text: str, expected: str, *, normalize: bool = True) -> bool:
    """Compare the answer span of ``text`` with that of ``expected``.

    The answer span is the text after the last "The answer is" (or the whole
    text without one), so ``string_match("... The answer is Paris.", "Paris")``
    holds. With ``normalize`` (default) both sides are NFKC-normalised,
    case-folded, whitespace-collapsed and stripped of surrounding quotes,
    markdown emphasis and trailing punctuation; without it they must be equal
    after ``str.strip``.
    """
    if not isinstance(text, str) or not isinstance(expected, str):
        raise TypeError("string_match expects two str arguments")
    got, want = _answer_span(text), _answer_span(expected)
    if normalize:
        return _normalize(got) == _normalize(want)
    return got.strip() == want.strip()


def _needs_answer(kind: str, item: dict) -> object:
    if not isinstance(item, dict) or "answer" not in item:
        ident = item.get("id", "?") if isinstance(item, dict) else "?"
        raise KeyError(f"the {kind!r} verifier needs an 'answer' field in each item; item id={ident!r} has none")
    return item["answer"]


def _numeric_verifier(text: str, item: dict) -> bool:
    return numeric_match(text, _needs_answer("numeric", item))


def _string_verifier(text: str, item: dict) -> bool:
    return string_match(text, str(_needs_answer("string", item)))


def import_callable(spec: str, *, what: str, error: type[Exception]) -> Callable:
    """The callable named by ``"package.module:attr.path"``, imported with importlib (never eval'd).

    ``what`` names the config key in messages (``verifier``, ``conditional.scorer``); failures
    raise ``error`` saying which part is missing. The spec's syntax is checked by the caller.
    """
    module_name, attr_path = spec.strip().split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise error(
            f"{what} {spec!r}: cannot import module {module_name!r} ({e}); "
            "check the name and that its folder is on PYTHONPATH"
        ) from e
    obj: object = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{what} {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a callable")
    return obj


def load_verifier(spec: str) -> Verifier:
    """Turn a spec string into a verifier ``fn(text, item) -> bool``.

    ``"numeric"``, ``"string"``, or ``"package.module:function"`` (the module is
    imported with importlib; it must be importable from ``sys.path``). The
    returned callable checks that a custom function returns a bool.
    """
    if not isinstance(spec, str):
        raise VerifierSpecError(f"verifier spec must be a string, got {type(spec).__name__}")
    spec = spec.strip()
    if spec == "numeric":
        return _numeric_verifier
    if spec == "string":
        return _string_verifier
    if not _SPEC.match(spec):
        raise VerifierSpecError(
            f"bad verifier spec {spec!r}: use 'numeric', 'string' or 'package.module:function' "
            "(dotted Python names, one colon)"
        )
    fn = import_callable(spec, what="verifier", error=VerifierSpecError)

    def custom(text: str, item: dict) -> bool:
        result = fn(text, item)
        if not isinstance(result, bool):
            raise TypeError(f"verifier {spec!r} returned {type(result).__name__}, expected bool")
        return result

    custom.__name__ = f"verifier[{spec}]"
    return custom
