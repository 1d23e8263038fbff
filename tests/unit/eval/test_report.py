import json
import math

import matplotlib.image
import pytest
import torch

from stillroom.eval import MODEL_KEYS, load_report, write_report
from stillroom.eval.report import MODEL_LABELS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(ce, kl, top1, params, speed, **extra):
    return {
        "heldout_ce": ce,
        "perplexity": math.exp(ce),
        "bits_per_byte": ce / math.log(2) / 4,
        "kl_teacher_student": kl,
        "top1_agreement": top1,
        "tokens": 1234,
        "params": params,
        "tokens_per_s": speed,
        **extra,
    }


@pytest.fixture
def models():
    return {
        "teacher": _metrics(2.0, 0.0, 1.0, 135_000_000, 900.0),
        "student_before": _metrics(4.0, 2.1, 0.21, 30_000_000, 4000.0),
        "student_after": _metrics(2.5, 0.4, 0.71, 30_000_000, 4000.0, train_seconds=61.25, steps=200),
        "baseline": _metrics(2.8, 0.7, 0.62, 30_000_000, 4000.0, train_seconds=55.0, steps=200),
    }


@pytest.fixture
def metrics_files(tmp_path):
    kd = tmp_path / "kd.jsonl"
    lines = [json.dumps({"step": s, "loss": 5.0 / (1 + s), "lr": 1e-3}) for s in range(1, 41)]
    lines.insert(10, json.dumps({"step": 10, "heldout_ce": 3.1}))  # eval record: skipped
    lines.insert(3, "")  # blank line: skipped
    kd.write_text("\n".join(lines) + "\n")
    base = tmp_path / "baseline.jsonl"
    base.write_text("".join(json.dumps({"step": s, "loss": 6.0 / (1 + s)}) + "\n" for s in range(1, 6)))
    return {"kd": kd, "baseline": base}


def _valid_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_write_report_full(tmp_path, models, metrics_files):
    run = tmp_path / "run"
    prompts = ["Once upon a time", "def f(x):\n    return | x"]
    gens = {k: [f"{k} says hi", f"{k}\nline two | pipe"] for k in ("teacher", "student_after", "baseline")}
    rep = write_report(
        run, models, generations=gens, prompts=prompts, metrics_files=metrics_files,
        title="Tiny run", notes=["a note", "another"],
    )
    for name in ("report.json", "report.md", "loss_curves.png", "metrics_bars.png"):
        assert (run / name).is_file(), name
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files
    _valid_png(run / "loss_curves.png")
    _valid_png(run / "metrics_bars.png")

    loaded = load_report(run)
    assert loaded == rep
    for key in ("title", "models", "generations", "notes", "created"):
        assert key in loaded
    assert loaded["title"] == "Tiny run"
    assert loaded["student_after"]["heldout_ce"] == 2.5
    assert set(loaded["models"]) == set(MODEL_KEYS)
    for key in MODEL_KEYS:
        assert loaded[key] == loaded["models"][key]
    assert loaded["generations"]["baseline"][0] == "baseline says hi"
    assert loaded["prompts"] == prompts
    assert loaded["notes"] == ["a note", "another"]
    assert loaded["deltas"]["student_after"]["heldout_ce"] == pytest.approx(0.5)
    assert loaded["deltas"]["baseline"]["heldout_ce"] == pytest.approx(0.8)
    assert loaded["summary"]["ce_gap_closed"] == pytest.approx((4.0 - 2.5) / (4.0 - 2.0))
    assert loaded["summary"]["ce_after_minus_baseline"] == pytest.approx(-0.3)
    assert loaded["summary"]["param_ratio_teacher_over_student"] == pytest.approx(4.5)

    md = (run / "report.md").read_text()
    assert md.startswith("# Tiny run")
    for key in MODEL_KEYS:
        assert f"| {MODEL_LABELS[key]} |" in md
    assert "2.5000" in md and "71.0%" in md and "135.00M" in md and "4,000" in md
    assert "+0.5000" in md and "+0.8000" in md  # deltas vs teacher
    assert "75.0%" in md  # gap closed
    assert "train_seconds" not in md or "61.2" in md
    assert "line two \\| pipe" in md and "<br>" in md  # table-safe generations
    assert "- a note" in md
    assert "![loss_curves.png](loss_curves.png)" in md
    # every table row has the same number of cells as its header
    table = [ln for ln in md.splitlines() if ln.startswith("| model |")][0]
    n_cols = table.count(" | ")
    rows = [ln for ln in md.splitlines() if any(ln.startswith(f"| {MODEL_LABELS[k]} |") for k in MODEL_KEYS)][:4]
    assert all(r.replace("\\|", "").count(" | ") == n_cols for r in rows)


def test_subset_of_models_and_no_extras(tmp_path):
    rep = write_report(
        tmp_path, {"student_after": {"heldout_ce": torch.tensor(3.0), "perplexity": math.inf, "params": 10}},
        generations=None, prompts=None, metrics_files={}, title="t", notes=[],
    )
    assert rep["student_after"]["heldout_ce"] == 3.0  # tensors become numbers
    assert rep["student_after"]["perplexity"] is None  # strict JSON: no Infinity
    assert "teacher" not in rep and rep["deltas"] == {} and rep["generations"] == {}
    json.loads((tmp_path / "report.json").read_text())  # parses as strict JSON
    md = (tmp_path / "report.md").read_text()
    assert "student (after)" in md and "teacher" not in md.split("## Metrics")[1]
    _valid_png(tmp_path / "loss_curves.png")  # "no data" placeholder
    _valid_png(tmp_path / "metrics_bars.png")


def test_report_errors(tmp_path, models, metrics_files):
    with pytest.raises(ValueError, match="unknown model key 'student'"):
        write_report(tmp_path, {"student": {}}, generations=None, prompts=None, metrics_files={}, title="t", notes=[])
    with pytest.raises(ValueError, match="empty"):
        write_report(tmp_path, {}, generations=None, prompts=None, metrics_files={}, title="t", notes=[])
    with pytest.raises(ValueError, match="2 texts for 1 prompts"):
        write_report(
            tmp_path, models, generations={"teacher": ["a", "b"]}, prompts=["p"], metrics_files={}, title="t", notes=[]
        )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        write_report(tmp_path, models, generations=None, prompts=None, metrics_files={"kd": bad}, title="t", notes=[])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        write_report(
            tmp_path, models, generations=None, prompts=None,
            metrics_files={"kd": tmp_path / "missing.jsonl"}, title="t", notes=[],
        )
    with pytest.raises(FileNotFoundError, match="no report"):
        load_report(tmp_path / "nowhere")


def test_smoothing_is_centered_without_lag():
    from stillroom.eval.plots import _smooth

    assert _smooth([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    line = [float(i) for i in range(50)]
    assert _smooth(line, 5)[2:-2] == line[2:-2]  # a straight line is left unchanged: no lag


def test_the_equal_wall_time_baseline_has_its_row_versus_the_teacher(tmp_path, models):
    models = {**models, "baseline_wall": _metrics(2.6, 0.5, 0.66, 30_000_000, 4000.0, train_seconds=61.0, steps=280)}
    rep = write_report(tmp_path / "run", models, title="wall")
    assert rep["deltas"]["baseline_wall"]["heldout_ce"] == pytest.approx(0.6)
    md = (tmp_path / "run" / "report.md").read_text()
    versus = md[md.index("## Versus the teacher"):]
    assert "| baseline (CE, equal wall time, 280 steps) | +0.6000" in versus


def test_harness_fractions_show_as_percentages_and_other_harness_numbers_as_they_are(tmp_path, models):
    extra = {"lm_eval_toy_mc_acc": 0.5, "lm_eval_toy_mc_acc_norm": 0.25, "lm_eval_gsm_exact_match_strict-match": 0.1,
             "lm_eval_wiki_word_perplexity": 31.7}
    models = {k: {**m, **extra} for k, m in models.items()}
    write_report(tmp_path / "run", models, title="harness")
    md = (tmp_path / "run" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| student (after) |"))
    for cell in ("50.0%", "25.0%", "10.0%", "31.7"):
        assert f"| {cell} |" in row + " |", (cell, row)
    assert "3170.0%" not in row
