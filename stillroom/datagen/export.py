"""Turn a generation store into a training file and count what was wrong with it.

Used by :mod:`stillroom.datagen.generate` (``stillroom generate``). Pure
functions over plain dicts: the input records (``items``, by prompt id), the
store records (one per sample: ``prompt_id``, ``sample_index``, ``text``,
optional ``error``) and the :class:`~stillroom.config.schema.GenerateConfig`.

Row layouts (one JSON object per line; docs/GENERATE.md is the reference):

* ``prompt_completion``: ``{"prompt", "completion", "id", "prompt_id",
  "sample_index", "source", "verified"}``
* ``messages``: ``{"messages": [user, assistant], "id", "prompt_id",
  "sample_index", "source", "verified"}``
* ``rationale``: ``{"input", "rationale", "label", "answer", "teacher_label",
  "parse_ok", "id", "prompt_id", "sample_index", "source", "verified"}``

``source`` is ``"teacher"`` or ``"original"`` (the fallback); ``verified`` is
True/False, or None without a verifier (and for original targets).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from stillroom.config.schema import GenerateConfig

Verifier = Callable[[str, dict], bool]


def error_kind(message: str) -> str:
    """A short category for a store record's ``error`` (see teacher_generate.generate_with)."""
    if message.startswith("empty output"):
        return "empty"
    if message.startswith("teacher output is"):
        return "non_string"
    if message.startswith("teacher returned"):
        return "wrong_sample_count"
    if message.startswith("teacher call failed"):
        return "call_failed"
    return "rejected"


def cut_text(text: str, cut_at: str | list[str] | None) -> str:
    """``text`` up to the earliest marker of ``cut_at`` (the start of the next few-shot item), as the
    reference code's ``split("Q:")[0]`` does."""
    for marker in [cut_at] if isinstance(cut_at, str) else (cut_at or []):
        if marker:
            text = text.split(marker, 1)[0]
    return text


def parse_rationale(text: str, trigger: str, cut_at: str | list[str] | None) -> tuple[str, str, bool]:
    """Split a teacher text into ``(rationale, label, ok)`` (Distilling Step-by-Step's parsing).

    Cut at ``cut_at``; split at the first ``trigger`` (case-insensitive): the
    rationale is the text before it, stripped; the label is the rest of
    that line, stripped, without a trailing period (what follows on later lines
    is the model running on, not the label). No trigger or an empty label is a
    parse failure: ``label = " "`` and the rationale is the whole cut text (or
    ``" "``), so the caller can keep or drop the row.
    """
    body = cut_text(text, cut_at)
    found = re.search(re.escape(trigger), body, re.IGNORECASE) if trigger else None
    if found:
        rationale = body[:found.start()].strip()
        label = body[found.end():].split("\n", 1)[0].strip()
        label = label.rstrip(".").strip()
        if label:
            return rationale, label, True
    return (body.strip() or " "), " ", False


def with_answer(verifier: Verifier, answer_field: str) -> Verifier:
    """A verifier that reads the reference from ``answer_field`` (the built-in ones read ``answer``)."""
    if answer_field == "answer":
        return verifier
    return lambda text, item: verifier(text, {**item, "answer": item.get(answer_field)})


class Checker:
    """Applies the verifier to samples; verifier exceptions are counted, never raised."""

    def __init__(self, verifier: Verifier | None) -> None:
        self.verifier = verifier
        self.passed = self.failed = self.raised = 0
        self.first_exception: str | None = None

    def __call__(self, text: str, item: dict) -> bool | None:
        if self.verifier is None:
            return None
        try:
            ok = bool(self.verifier(text, item))
        except Exception as e:  # noqa: BLE001 - a bad sample or a buggy custom verifier must not stop the export
            self.raised += 1
            self.first_exception = self.first_exception or f"{type(e).__name__}: {e}"
            ok = False
        self.passed += ok
        self.failed += not ok
        return ok

    def stats(self) -> dict | None:
        if self.verifier is None:
            return None
        return {"passed": self.passed, "failed": self.failed, "raised": self.raised,
                "first_exception": self.first_exception}


def export_rows(
    items: list[dict], records: list[dict], gcfg: GenerateConfig, verifier: Verifier | None
) -> tuple[list[dict], dict]:
    """Training rows from the store records of ``items`` (input order, samples by index) and the counts.

    Counts: ``samples`` (store records of these items), ``malformed`` (``{kind: n}``, never exported),
    ``verifier`` (passed/failed/raised, or None), ``rationale_parse`` (ok/failed, rationale mode),
    ``dropped_parse_failures``, ``rows``, ``rows_teacher``, ``rows_original``, ``prompts_without_rows``,
    ``missing_samples`` (expected samples not in the store yet).
    """
    ex = gcfg.export
    fmt = ex.format or ("rationale" if gcfg.mode == "rationale" else "prompt_completion")
    by_pid: dict[str, list[dict]] = {}
    for rec in records:
        by_pid.setdefault(rec["prompt_id"], []).append(rec)
    check = Checker(verifier)
    malformed: Counter[str] = Counter()
    parse = Counter()
    counts = Counter()
    rows: list[dict] = []
    for item in items:
        pid = str(item[gcfg.id_field])
        recs = sorted(by_pid.get(pid, []), key=lambda r: r["sample_index"])
        counts["samples"] += len(recs)
        counts["missing_samples"] += max(0, gcfg.n_samples - len(recs))
        prompt = ex.prompt_template.format(**item)
        candidates: list[dict] = []
        for rec in recs:
            if "error" in rec or not isinstance(rec.get("text"), str):
                malformed[error_kind(rec.get("error", "non-string output"))] += 1
                continue
            text = rec["text"]
            row: dict = {"id": rec["key"], "prompt_id": pid, "sample_index": rec["sample_index"], "source": "teacher"}
            if gcfg.mode == "rationale":
                text = cut_text(text, ex.cut_at)
                rationale, label, ok = parse_rationale(text, ex.answer_trigger, None)
                if ok:  # verify what is exported, not what the model said after the label
                    text = f"{rationale} {ex.answer_trigger} {label}".lstrip()
                parse["ok" if ok else "failed"] += 1
                if not ok and ex.drop_parse_failures:
                    counts["dropped_parse_failures"] += 1
                    check(text, item)  # still counted in the verifier totals
                    continue
                gt = item.get(gcfg.answer_field)
                row.update(input=prompt, rationale=rationale,
                           label=str(gt) if ex.label_type == "gt" else label,
                           answer=gt, teacher_label=label, parse_ok=ok)
            row["verified"] = check(text, item)
            row["_text"] = text
            candidates.append(row)
        if ex.keep == "all":
            kept = candidates
        else:
            kept = [r for r in candidates if r["verified"]]
            if ex.keep == "first_verified":
                kept = kept[:1]
        if not kept and ex.fallback_to_original:
            original = item[ex.original_field]
            kept = [{"id": f"{pid}#original", "prompt_id": pid, "sample_index": None, "source": "original",
                     "verified": None, "_text": str(original)}]
            if gcfg.mode == "rationale":
                rationale, label, ok = parse_rationale(str(original), ex.answer_trigger, None)
                gt = item.get(gcfg.answer_field)
                kept[0].update(input=prompt, rationale=rationale,
                               label=str(gt) if ex.label_type == "gt" else label,
                               answer=gt, teacher_label=None, parse_ok=ok)
        if not kept:
            counts["prompts_without_rows"] += 1
        for row in kept:
            text = row.pop("_text")
            if fmt == "prompt_completion":
                row = {"prompt": prompt, "completion": text, **row}
            elif fmt == "messages":
                row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}], **row}
            elif gcfg.mode != "rationale":  # rationale layout from a completion/rewrite store
                rationale, label, ok = parse_rationale(text, ex.answer_trigger, ex.cut_at)
                gt = item.get(gcfg.answer_field)
                row.update(input=prompt, rationale=rationale, label=str(gt) if ex.label_type == "gt" else label,
                           answer=gt, teacher_label=label, parse_ok=ok)
            counts["rows_" + row["source"]] += 1
            rows.append(row)
    stats = {
        "format": fmt,
        "samples": counts["samples"],
        "missing_samples": counts["missing_samples"],
        "malformed": dict(sorted(malformed.items())),
        "verifier": check.stats(),
        "rationale_parse": dict(parse) if gcfg.mode == "rationale" else None,
        "dropped_parse_failures": counts["dropped_parse_failures"],
        "rows": len(rows),
        "rows_teacher": counts["rows_teacher"],
        "rows_original": counts["rows_original"],
        "prompts_without_rows": counts["prompts_without_rows"],
    }
    return rows, stats


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
