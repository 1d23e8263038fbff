"""The one rule that decides whether a part of a reproduced claim held: beyond the seed spread.

Every reproduction (``bench/repro/*.py``, ``bench/draft_tiny.py``) states its claim as parts; each
part is a per-seed *paired* difference (both sides from the same seed: same data, same
initialisation), oriented so that a positive value supports the claim. A part holds only when

    mean(d) - margin > std(d)        (sample std over seeds, n - 1 in the denominator)

``margin`` is what the claim itself demands beyond "better" (``+10`` for "at least 10% higher"),
or minus a tolerance the claim allows ("no more than 0.05 worse": ``margin = -0.05``). A two-sided
"similar" claim (:func:`within_tolerance`) holds when ``tolerance - |mean(d)| > std(d)``. With fewer
than two seeds there is no spread to exceed, so nothing holds. With 3 seeds the bar is a paired t
statistic above sqrt(3) = 1.73 (one-sided p of about 0.11): "beyond the seed spread", not statistical
significance, and the pages say so. A verdict that takes the best of several variants must say so
(:func:`best_of`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

RULE = (
    "A part of a claim holds only when the mean over seeds of its paired difference (both sides from the same "
    "seed; oriented so that a positive value supports the claim; less any margin the claim states) exceeds the "
    "standard deviation of that difference across seeds (sample std, n - 1). A claim of similarity holds when "
    "the tolerance minus |mean difference| exceeds that standard deviation. With fewer than 2 seeds nothing "
    "holds. With 3 seeds this is a paired t statistic above 1.73 (one-sided p about 0.11): the difference is "
    "beyond the seed spread, which is not the same as statistically significant. A verdict that picks the best "
    "of several variants says so, and how many it picked from."
)


@dataclass(frozen=True)
class Part:
    """One part of a claim and the evidence for it."""

    name: str
    diffs: tuple[float, ...]  # per-seed paired differences, positive = supports the claim
    margin: float  # the claim needs mean(diffs) - margin > sd (negative: a tolerance); for "similar": the tolerance
    mean: float
    sd: float
    held: bool
    kind: str = "beyond"  # "beyond" (one-sided) or "within" (two-sided similarity)
    unit: str = ""

    def bar(self) -> str:
        """The inequality the part had to meet, in words."""
        if self.kind == "within":
            return f"abs(mean) < {self.margin:g}{self.unit} - std"
        if self.margin == 0:
            return "mean > std"
        return f"mean {'-' if self.margin > 0 else '+'} {abs(self.margin):g}{self.unit} > std"

    def evidence(self, digits: int = 3) -> str:
        """``mean ± std`` of the paired difference, e.g. ``+0.014 ± 0.046 (n=3)``."""
        return f"{self.mean:+.{digits}f} ± {self.sd:.{digits}f}{self.unit} (n={len(self.diffs)})"

    def to_dict(self) -> dict:
        return asdict(self) | {"diffs": list(self.diffs), "bar": self.bar()}


def _clean(diffs: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(d) for d in diffs)
    if any(math.isnan(d) for d in out):
        raise ValueError(f"a paired difference is NaN: {out}")
    return out


def _spread(d: tuple[float, ...]) -> tuple[float, float]:
    if not d:
        return float("nan"), float("nan")
    if not all(math.isfinite(x) for x in d):  # e.g. a ratio with a zero denominator: no finite spread
        return float("nan"), float("inf")
    return statistics.fmean(d), (statistics.stdev(d) if len(d) > 1 else float("nan"))


def beyond_spread(name: str, diffs: Sequence[float], *, margin: float = 0.0, unit: str = "") -> Part:
    """The part holds iff ``mean(diffs) - margin > std(diffs)`` over at least 2 seeds."""
    d = _clean(diffs)
    mean, sd = _spread(d)
    held = len(d) >= 2 and math.isfinite(sd) and mean - margin > sd
    return Part(name, d, float(margin), mean, sd, bool(held), "beyond", unit)


def within_tolerance(name: str, diffs: Sequence[float], *, tolerance: float, unit: str = "") -> Part:
    """A "similar" part: holds iff ``tolerance - |mean(diffs)| > std(diffs)`` over at least 2 seeds."""
    if tolerance <= 0:
        raise ValueError(f"tolerance must be > 0 (got {tolerance})")
    d = _clean(diffs)
    mean, sd = _spread(d)
    held = len(d) >= 2 and math.isfinite(sd) and tolerance - abs(mean) > sd
    return Part(name, d, float(tolerance), mean, sd, bool(held), "within", unit)


def paired(better: Sequence[float], worse: Sequence[float]) -> list[float]:
    """Per-seed ``better[i] - worse[i]`` (the two lists in the same seed order)."""
    if len(better) != len(worse):
        raise ValueError(f"paired values need one per seed on both sides ({len(better)} vs {len(worse)})")
    return [float(a) - float(b) for a, b in zip(better, worse)]


def best_of(parts: Sequence[Part]) -> tuple[bool, str]:
    """Held when any of ``parts`` held, with the sentence that says it was a best-of pick."""
    if not parts:
        raise ValueError("best_of needs at least one part")
    winners = [p.name for p in parts if p.held]
    text = (f"a best-of-{len(parts)} rule: the claim counts as held if any one of {len(parts)} variants holds by "
            f"itself; {len(winners)} of {len(parts)} did" + (f" ({'; '.join(winners)})" if winners else ""))
    return bool(winners), text


def parts_table(parts: Sequence[Part], digits: int = 3) -> str:
    """A markdown table of the parts: the paired differences per seed, mean ± std, the bar, held."""
    lines = ["| part | paired difference per seed | mean ± std | bar | held |", "|---|---|---|---|---|"]
    for p in parts:
        seeds = ", ".join(f"{d:+.{digits}f}" for d in p.diffs)
        lines.append(f"| {p.name} | {seeds} | {p.evidence(digits)} | {p.bar()} | {'yes' if p.held else 'no'} |")
    return "\n".join(lines)


def verdict_fields(parts: Sequence[Part], required: Sequence[str] | None = None, *,
                   best_of_note: str | None = None) -> dict:
    """The ``held`` / ``verdict_text`` / ``parts`` fields a reproduction stores.

    ``held``: every ``required`` part holds (all parts when ``required`` is None); with
    ``best_of_note`` (from :func:`best_of`) any required part suffices, and the text says so.
    """
    names = [p.name for p in parts]
    required = list(names if required is None else required)
    missing = [r for r in required if r not in names]
    if missing or not required:
        raise ValueError(f"required parts {missing or required} are not among the parts {names}")
    req = [p for p in parts if p.name in required]
    if best_of_note is not None:
        held = any(p.held for p in req)
        text = best_of_note
    else:
        held = all(p.held for p in req)
        failed = [p.name for p in req if not p.held]
        text = ("every required part is beyond the seed spread" if held else
                "not beyond the seed spread: " + "; ".join(failed))
    return {"held": bool(held), "verdict_text": text, "required_parts": required, "rule": RULE,
            "parts": [p.to_dict() | {"required": p.name in required} for p in parts]}
