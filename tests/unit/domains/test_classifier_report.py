"""The report's classifier layout: its columns, deltas and plots; the language-model layout is unchanged."""

import json

from stillroom.eval.report import LAYOUTS, resolve_layout, write_report


def _m(acc, agree, ece, kl, ce, params, speed, **extra):
    return {"accuracy": acc, "top1_agreement": agree, "ece": ece, "kl_teacher_student": kl, "heldout_ce": ce,
            "params": params, "trainable_params": params, "images_per_s": speed, "examples": 369,
            "confusion_matrix": [[1, 0], [0, 1]], **extra}


def test_classifier_layout(tmp_path):
    models = {"teacher": _m(0.978, 1.0, 0.02, 0.0, 0.07, 85002, 2e5),
              "student_after": _m(0.96, 0.97, 0.04, 0.1, 0.15, 2410, 1e6, train_seconds=8.0, steps=400),
              "baseline": _m(0.955, 0.965, 0.05, 0.12, 0.16, 2410, 1e6)}
    (tmp_path / "confusion_matrix.png").write_bytes(b"\x89PNG")  # drawn by the domain before the report
    rep = write_report(tmp_path, models, title="t")
    md = (tmp_path / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert header.startswith("| model | accuracy | top-1 agree | ECE | KL(teacher‖model) | CE (nats/image) | params")
    assert "| teacher | 97.8% | 100.0% | 0.0200 |" in md and "85.00K" in md and "1,000,000" in md
    assert "Δ accuracy | Δ ece | Δ heldout_ce" in md and "nats/image" in md and "+0.5 points" in md
    assert "![confusion_matrix.png](confusion_matrix.png)" in md and "confusion_matrix.png" in rep["plots"]
    assert "perplexity" not in md and "tokens" not in header
    assert rep["summary"]["speedup_student_over_teacher"] == 5.0
    assert rep["summary"]["accuracy_after_minus_baseline"] == rep["student_after"]["accuracy"] - 0.955
    assert json.loads((tmp_path / "report.json").read_text())["student_after"]["confusion_matrix"] == [[1, 0], [0, 1]]


def test_layout_choice():
    assert resolve_layout(None, {"teacher": {"heldout_ce": 1.0, "tokens_per_s": 5.0}}) is LAYOUTS["lm"]
    assert resolve_layout(None, {"teacher": {"heldout_ce": 1.0, "images_per_s": 5.0}}) is LAYOUTS["classifier"]
    assert resolve_layout("lm", {"teacher": {"images_per_s": 5.0}}) is LAYOUTS["lm"]
    assert LAYOUTS["lm"].deltas == ("heldout_ce", "perplexity", "bits_per_byte") and not LAYOUTS["lm"].plots
    assert [c[0] for c in LAYOUTS["lm"].columns][:3] == ["heldout_ce", "perplexity", "bits_per_byte"]
