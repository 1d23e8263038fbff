"""The run report: ``report.json``, ``report.md`` and two plots in the run folder.

``report.json`` schema::

    {
      "title": str, "created": ISO-8601 UTC time,
      "models": {key: metrics},          # key in MODEL_KEYS, only those given
      "teacher": metrics, ...            # the same objects again at the top level
      "deltas": {"student_after"|"baseline": {metric: value - teacher's}},
      "summary": {...},                  # gap closed, size/speed ratios (when computable)
      "prompts": [...], "generations": {key: [text per prompt]},
      "notes": [...], "plots": [file names], "metrics_files": {run: path},
      "data": {"bad_records": {"count": int, "first": ["file:line: why", ...]}}   # when given
    }

Non-finite floats (an overflowing perplexity) are written as ``null`` so the
file is strict JSON.

Each domain's metrics show in report.md as its :class:`ReportLayout` says (:data:`LAYOUTS`: the
columns in order with their formats, the "versus the teacher" deltas, the throughput metric, the
CE unit and the plots the domain draws into the run folder itself); a caller names the layout, or
it is the one whose ``marker`` metric the models carry (``lm`` otherwise).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stillroom.eval.layouts import _DELTA_KEYS, LAYOUTS, ReportLayout, resolve_layout  # noqa: F401 (re-exported)
from stillroom.eval.plots import plot_loss_curves, plot_metric_bars

MODEL_KEYS = ("teacher", "student_before", "student_after", "baseline")
MODEL_LABELS = {
    "teacher": "teacher",
    "student_before": "student (before)",
    "student_after": "student (after)",
    "baseline": "baseline (CE only)",
}


def base_model(key: str) -> str | None:
    """The model of :data:`MODEL_KEYS` that ``key`` names, or of which it is a variant (``teacher_4step``: the
    teacher sampled another way, a row of its own after the teacher's); ``None`` for an unknown key."""
    if key in MODEL_KEYS:
        return key
    return next((k for k in MODEL_KEYS if key.startswith(f"{k}_") and len(key) > len(k) + 1), None)


def row_keys(models: dict) -> list[str]:
    """``models``' keys in table order: each model of :data:`MODEL_KEYS`, then its variants (sorted)."""
    return [k for base in MODEL_KEYS for k in ([base] if base in models else [])
            + sorted(v for v in models if v != base and base_model(v) == base)]


VARIANT_LABELS = {"baseline_wall": "baseline (CE, equal wall time, {steps} steps)"}
"""Rows that are variants of a model with a label of their own (``{steps}``: the row's ``steps``)."""


def row_label(key: str, metrics: dict | None = None) -> str:
    """``key``'s label in report.md; a variant's is its model's with the variant's name, or its own
    (:data:`VARIANT_LABELS`)."""
    base = base_model(key)
    if key in VARIANT_LABELS:
        return VARIANT_LABELS[key].format(steps=_fmt((metrics or {}).get("steps"), "int"))
    return MODEL_LABELS[key] if key == base else f"{MODEL_LABELS[base]} ({key[len(base) + 1:]})"


HARNESS_FRACTION = re.compile(r"^lm_eval_.+_(acc|acc_norm|exact_match|mc1|mc2)(_[^_]+)?$")
"""lm-evaluation-harness columns (``lm_eval_<task>_<metric>[_<filter>]``) whose metric is a fraction: shown in %."""


COMPARED = ("heldout_ce", "kl_teacher_student", "top1_agreement")
"""The metrics of the student-versus-baseline lines when the report has both CE baselines (equal steps and equal
wall time): lower CE and KL, higher agreement are better."""

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _plain(value: Any, *, finite_only: bool) -> Any:
    """Tensors/numpy scalars -> Python numbers, Paths -> str, recursively."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and finite_only and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v, finite_only=finite_only) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, finite_only=finite_only) for v in value]
    return value


def _fmt(value: Any, kind: str | None = None) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int) and kind in (None, "int", "count"):
        return _human_count(value) if kind == "count" else f"{value:,}"
    if not isinstance(value, (int, float)):
        return str(value)
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    if kind == "f4":
        return f"{v:.4f}"
    if kind == "f1":
        return f"{v:.1f}"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "ppl":
        return f"{v:.2f}" if v < 1e4 else f"{v:.3g}"
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "count":
        return _human_count(int(v))
    return f"{v:.4g}"


def _human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _cell(text: Any) -> str:
    """One markdown table cell: pipes escaped, newlines as <br>."""
    s = str(text).strip()
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>") or " "


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return "\n".join(f"[{m.get('role', '?')}] {m.get('content', '')}" for m in prompt)
    return str(prompt)


def _num(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _deltas(models: dict[str, dict], keys: tuple[str, ...] = _DELTA_KEYS) -> dict[str, dict[str, float]]:
    if "teacher" not in models:
        return {}
    out = {}
    for key in row_keys(models):  # the students and baselines with their variants (the equal-wall-time baseline)
        if base_model(key) not in ("student_before", "student_after", "baseline"):
            continue
        d = {}
        for metric in keys:
            a, t = _num(models[key], metric), _num(models["teacher"], metric)
            if a is not None and t is not None:
                d[metric] = a - t
        out[key] = d
    return out


def _summary(models: dict[str, dict], speed: str = "tokens_per_s", gap: str = "heldout_ce") -> dict[str, float]:
    """Gap closed on ``gap`` (CE; bits per byte across tokenizers), KD-vs-baseline CE (and accuracy) difference,
    teacher/student size and speed ratios (``speed``: the throughput metric)."""
    out: dict[str, float] = {}
    closing = {k: _num(m, gap) for k, m in models.items()}
    t, b, a = closing.get("teacher"), closing.get("student_before"), closing.get("student_after")
    if None not in (t, b, a) and abs(b - t) > 1e-12:
        out["ce_gap_closed" if gap == "heldout_ce" else f"{gap}_gap_closed"] = (b - a) / (b - t)
    ce = {k: _num(m, "heldout_ce") for k, m in models.items()}
    a = ce.get("student_after")
    if a is not None and ce.get("baseline") is not None:
        out["ce_after_minus_baseline"] = a - ce["baseline"]
    acc = {k: _num(m, "accuracy") for k, m in models.items()}
    if acc.get("student_after") is not None and acc.get("baseline") is not None:
        out["accuracy_after_minus_baseline"] = acc["student_after"] - acc["baseline"]
    if "baseline_wall" in models and "student_after" in models:  # both comparisons: equal steps, equal wall time
        for base in ("baseline", "baseline_wall"):
            for metric in COMPARED:
                a, b = _num(models["student_after"], metric), _num(models.get(base, {}), metric)
                if a is not None and b is not None:
                    out[f"{metric}_after_minus_{base}"] = a - b
    if "teacher" in models and "student_after" in models:
        tp, sp = _num(models["teacher"], "params"), _num(models["student_after"], "params")
        if tp and sp:
            out["param_ratio_teacher_over_student"] = tp / sp
        ts, ss = _num(models["teacher"], speed), _num(models["student_after"], speed)
        if ts and ss:
            out["speedup_student_over_teacher"] = ss / ts
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _validate(models: dict, generations: dict | None, prompts: list | None) -> None:
    if not models:
        raise ValueError(f"write_report: `models` is empty; give metrics for some of {MODEL_KEYS}")
    for key, metrics in models.items():
        if base_model(key) is None:
            raise ValueError(f"write_report: unknown model key {key!r}; expected some of {MODEL_KEYS} (or a variant "
                             "of one, as teacher_4step)")
        if not isinstance(metrics, dict):
            raise TypeError(f"write_report: models[{key!r}] must be a dict of metrics, got {type(metrics).__name__}")
    for key, texts in (generations or {}).items():
        if base_model(key) is None:
            raise ValueError(f"write_report: unknown generations key {key!r}; expected some of {MODEL_KEYS} (or a "
                             "variant of one)")
        if prompts is not None and len(texts) != len(prompts):
            raise ValueError(
                f"write_report: generations[{key!r}] has {len(texts)} texts for {len(prompts)} prompts"
            )


def _markdown(report: dict, models: dict[str, dict], layout: ReportLayout = LAYOUTS["lm"]) -> str:
    lines = [f"# {report['title']}", "", f"_created {report['created']}_", "", "## Metrics", ""]
    known = [c for c in layout.columns if any(c[0] in m for m in models.values())]
    known_keys = {c[0] for c in layout.columns}
    extra = sorted(
        {
            k
            for m in models.values()
            for k, v in m.items()
            if k not in known_keys and (v is None or isinstance(v, (int, float, str, bool)))
        }
    )
    cols = known + [(k, k, "pct" if HARNESS_FRACTION.search(k) else None) for k in extra]
    lines.append("| model | " + " | ".join(_cell(h) for _, h, _ in cols) + " |")
    lines.append("|---|" + "|".join("---:" for _ in cols) + "|")
    for key in row_keys(models):
        m = models[key]
        lines.append(f"| {row_label(key, m)} | " + " | ".join(_cell(_fmt(m.get(k), f)) for k, _, f in cols) + " |")
    if report["deltas"] and layout.deltas:
        lines += ["", "## Versus the teacher", "", "Difference model − teacher (lower CE is better).", ""]
        lines.append("| model | " + " | ".join(f"Δ {k}" for k in layout.deltas) + " |")
        lines.append("|---|" + "|".join("---:" for _ in layout.deltas) + "|")
        for key, d in report["deltas"].items():
            vals = [f"{d[k]:+.4f}" if k in d else "—" for k in layout.deltas]
            lines.append(f"| {row_label(key, models.get(key))} | " + " | ".join(vals) + " |")
    s = report["summary"]
    if s:
        lines.append("")
        if "ce_gap_closed" in s:
            lines.append(
                f"- CE gap to the teacher closed by training: {100 * s['ce_gap_closed']:.1f}% "
                "((before − after) / (before − teacher))"
            )
        if "bits_per_byte_gap_closed" in s:
            lines.append(f"- bits-per-byte gap to the teacher closed by training: "
                         f"{100 * s['bits_per_byte_gap_closed']:.1f}% ((before − after) / (before − teacher))")
        if "ce_after_minus_baseline" in s:
            lines.append(f"- student (after) CE − baseline CE: {s['ce_after_minus_baseline']:+.4f} {layout.ce_unit}")
        for base, what in (("baseline", "equal steps"), ("baseline_wall", "equal wall time")):
            diffs = [(m, s[f"{m}_after_minus_{base}"]) for m in COMPARED if f"{m}_after_minus_{base}" in s]
            if diffs and "baseline_wall" in models:
                steps = _fmt(models[base].get("steps"), "int")
                lines.append(f"- student (after) − CE baseline at {what} ({steps} steps): " + ", ".join(
                    f"{m} {100 * d:+.1f} points" if m == "top1_agreement" else f"{m} {d:+.4f}" for m, d in diffs))
        if "accuracy_after_minus_baseline" in s:
            lines.append(f"- student (after) accuracy − baseline accuracy: "
                         f"{100 * s['accuracy_after_minus_baseline']:+.1f} points")
        if "param_ratio_teacher_over_student" in s:
            lines.append(f"- teacher / student parameters: {s['param_ratio_teacher_over_student']:.2f}×")
        if "speedup_student_over_teacher" in s:
            lines.append(f"- student forward speed / teacher's: {s['speedup_student_over_teacher']:.2f}×")
    if report["plots"]:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    gens = report["generations"]
    if gens:
        keys = row_keys(gens)
        n = max(len(gens[k]) for k in keys)
        prompts = report["prompts"] or [f"prompt {i}" for i in range(n)]
        lines += ["", "## Greedy generations", ""]
        lines.append("| prompt | " + " | ".join(row_label(k, models.get(k)) for k in keys) + " |")
        lines.append("|---|" + "|".join("---" for _ in keys) + "|")
        for i in range(n):
            row = [_cell(_prompt_text(prompts[i]))] + [
                _cell(gens[k][i] if i < len(gens[k]) else "") for k in keys
            ]
            lines.append("| " + " | ".join(row) + " |")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    bad = (report.get("data") or {}).get("bad_records") or {}
    if bad.get("count"):
        lines += ["", "## Bad records", "", f"{bad['count']} record(s) skipped (`data.on_bad_record: skip`); the "
                  f"first {len(bad['first'])}:", ""] + [f"- {_cell(e)}" for e in bad["first"]]
    return "\n".join(lines) + "\n"


def write_report(
    run_dir: Path,
    models: dict[str, dict],
    *,
    generations: dict[str, list[str]] | None = None,
    prompts: list[str] | None = None,
    metrics_files: dict[str, Path] | None = None,
    title: str = "stillroom run",
    notes: list[str] | None = None,
    layout: str | ReportLayout | None = None,
    data: dict | None = None,
) -> dict:
    """Write ``report.json``, ``report.md``, ``loss_curves.png``, ``metrics_bars.png``.

    ``models``: metric dicts keyed by some of :data:`MODEL_KEYS` (as returned by
    :func:`stillroom.eval.metrics.evaluate_lm`, plus ``params``, ``tokens_per_s``
    and extras such as ``train_seconds``/``steps``, or by a domain's ``evaluate``;
    missing values show as "—").
    ``generations``: ``{model key: [text per prompt]}``. ``metrics_files``:
    ``{run label: metrics.jsonl}`` for the loss curves. ``layout``: a
    :data:`LAYOUTS` name or a :class:`ReportLayout` (``None``: chosen from the
    metrics, see :func:`resolve_layout`). ``data``: the data's report (``bad_records``: count, first
    messages), shown in its own section. Every file is written atomically
    (temp file + rename). Returns the report dict (as in report.json).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    models = {k: _plain(v, finite_only=False) for k, v in models.items()} if models else {}
    prompts = _plain(list(prompts), finite_only=False) if prompts is not None else None
    generations = {k: list(v) for k, v in generations.items()} if generations else {}
    _validate(models, generations, prompts)
    metrics_files = {str(k): Path(v) for k, v in (metrics_files or {}).items()}
    chosen = resolve_layout(layout, models)

    plots = []
    plot_loss_curves(run_dir / "loss_curves.png", metrics_files)
    plots.append("loss_curves.png")
    plot_metric_bars(run_dir / "metrics_bars.png", {k: models[k] for k in MODEL_KEYS if k in models}, MODEL_LABELS)
    plots.append("metrics_bars.png")
    plots += [name for name in chosen.plots if (run_dir / name).is_file()]

    report: dict[str, Any] = {
        "title": title,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": models,
        "deltas": _deltas(models, chosen.deltas),
        "summary": _summary(models, chosen.speed, chosen.gap_metric),
        "prompts": prompts,
        "generations": generations,
        "notes": list(notes or []),
        "plots": plots,
        "metrics_files": {k: str(v) for k, v in metrics_files.items()},
        **({"data": data} if data is not None else {}),
    }
    _atomic_write_text(run_dir / REPORT_MD, _markdown(report, models, chosen))
    for key in row_keys(models):
        report[key] = models[key]
    strict = _plain(report, finite_only=True)
    _atomic_write_text(run_dir / REPORT_JSON, json.dumps(strict, indent=2, allow_nan=False) + "\n")
    return strict


def load_report(run_dir: Path) -> dict:
    """Read ``<run_dir>/report.json`` (written by :func:`write_report`)."""
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no report at {path}; run the evaluation (write_report) for this run folder first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
