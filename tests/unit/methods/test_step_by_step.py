"""Distilling step-by-step: its record views through the one pipeline, per-task normalisation (by hand), variants, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stillroom.config.schema import DataConfig, DataSource, LossConfig, LossTerm, StepByStepConfig
from stillroom.data import build_splits
from stillroom.data.batch import collate
from stillroom.data.errors import DataError
from stillroom.data.batch import ExampleSampler
from stillroom.losses import LossMix, StudentOutput
from stillroom.methods.base import StepCounts
from stillroom.methods.step_by_step import StepByStepEncoder, TaskWeights, predict_rows

RECIPE = Path(__file__).resolve().parents[3] / "stillroom" / "recipes" / "step_by_step.yaml"


def _records(n: int = 24) -> list[dict]:
    out = []
    for i in range(n):
        a, b, c = i % 7 + 1, i % 5 + 2, i % 3 + 1
        out.append({"input": f"{a} + {b} * {c}", "rationale": f"{b} * {c} = {b * c}. {a} + {b * c} = {a + b * c}.",
                    "label": str(a + b * c)})
    return out


def _write(tmp_path: Path, rows: list[dict], name: str = "sbs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(tok, path: Path, *, heldout_fraction=0.0, heldout_max=8, seq_len=64, on_bad_record="stop", **cfg):
    src = DataSource(path=str(path), format="prompt_completion", prompt_field="input", completion_field="label")
    data = DataConfig(sources=[src], seq_len=seq_len, heldout_fraction=heldout_fraction, heldout_max=heldout_max,
                      on_bad_record=on_bad_record)
    return build_splits(data, tok, 0, StepByStepEncoder(StepByStepConfig(**cfg)))


def _counts(step=0, all_reduce_sum=lambda v: v):
    return lambda micro: StepCounts(step=step, targets=all_reduce_sum(sum(b.num_targets for b in micro)),
                                    all_reduce_sum=all_reduce_sum)


def _text(tok, ex, targets: bool) -> str:
    return tok.decode([i for i, f in zip(ex.input_ids, ex.target) if f == targets], skip_special_tokens=True)


def test_multi_task_builds_predict_explain_pairs(tok, tmp_path):
    data = _data(tok, _write(tmp_path, _records(6)))
    assert len(data.train) == 12
    for k, rec in enumerate(_records(6)):
        pred, expl = data.train[2 * k], data.train[2 * k + 1]
        assert pred.role == "predict" and expl.role == "explain"
        assert _text(tok, pred, False) == "predict: " + rec["input"] + "\n" and _text(tok, pred, True) == rec["label"]
        assert _text(tok, expl, False) == "explain: " + rec["input"] + "\n" and _text(tok, expl, True) == rec["rationale"]
        assert pred.input_ids[-1] == tok.eos_token_id and pred.target[-1]  # EOS is learned (the model stops)
        assert pred.n_bytes == len(rec["label"])


def test_variants_single_task_and_label_only(tok, tmp_path):
    path = _write(tmp_path, _records(5))
    single = _data(tok, path, variant="single_task", single_task_separator=" So the answer is ")
    assert len(single.train) == 5
    rec = _records(5)[2]
    assert _text(tok, single.train[2], False) == "predict: " + rec["input"] + "\n"
    assert _text(tok, single.train[2], True) == rec["rationale"] + " So the answer is " + rec["label"]
    label_only = _data(tok, path, variant="label_only")
    assert [e.role for e in label_only.train] == ["label"] * 5
    # standard fine-tuning has no task prefix (the paper's baseline), and it is what `baseline: true` trains on
    assert _text(tok, label_only.train[2], False) == rec["input"] + "\n"
    assert _text(tok, label_only.train[2], True) == rec["label"]
    multi = _data(tok, path)
    for d in (single, label_only, multi):
        assert [e.input_ids for e in d.baseline_train] == [e.input_ids for e in label_only.train]


def test_bad_record_names_file_and_line(tok, tmp_path):
    rows = _records(4)
    del rows[2]["rationale"]
    path = _write(tmp_path, rows, "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: missing field 'rationale'.*step_by_step\.rationale_field"):
        _data(tok, path)
    rows = _records(4)
    rows[1]["label"] = 7
    with pytest.raises(DataError, match=r"bad2\.jsonl:2: field 'label' must be a string"):
        _data(tok, _write(tmp_path, rows, "bad2.jsonl"))
    # skip: the bad record is counted and the rest used
    data = _data(tok, path, on_bad_record="skip")
    assert data.stats["records_bad"] == 1 and len(data.train) == 6


def test_empty_rationale_dropped_and_counted(tok, tmp_path):
    rows = _records(4)
    rows[0]["rationale"] = " "
    path = _write(tmp_path, rows)
    data = _data(tok, path)
    assert data.stats["dropped_empty_rationale"] == 1 and len(data.train) == 6
    assert len(_data(tok, path, drop_empty=False).train) == 8


def test_heldout_split_and_views(tok, tmp_path):
    path = _write(tmp_path, _records(40))
    src = DataSource(path=str(path), format="prompt_completion", prompt_field="input", completion_field="label")
    plain = build_splits(DataConfig(sources=[src], seq_len=64, heldout_fraction=0.3, heldout_max=100), tok, 0)
    data = _data(tok, path, heldout_fraction=0.3, heldout_max=100)
    held_plain = {e.meta["record"] for e in plain.heldout}
    held_mine = {e.meta["record"] for e in data.heldout}
    assert held_mine == held_plain and held_mine  # the same held-out records as any other method
    assert not {e.meta["record"] for e in data.train} & held_mine
    # the report measures the trained student on the predict task; the baseline on the unprefixed task
    assert all(_text(tok, e, False).startswith("predict: ") for e in data.heldout)
    assert {e.meta["record"] for e in data.baseline_heldout} == held_mine
    assert not any(_text(tok, e, False).startswith("predict: ") for e in data.baseline_heldout)


def test_bundled_arithmetic_fields(tok):
    src = DataSource(bundled="arithmetic", limit=6, format="prompt_completion", prompt_field="question",
                     completion_field="label_completion")
    data = build_splits(DataConfig(sources=[src], seq_len=256, heldout_fraction=0.0, heldout_max=4), tok, 0,
                        StepByStepEncoder(StepByStepConfig()))
    assert len(data.train) == 12 and data.group_size == 2
    assert _text(tok, data.train[0], True).startswith("The answer is")


def test_weights_make_the_step_loss_the_per_task_means(tok, tmp_path):
    """sum(w * ce) / N over the step's micro-batches == alpha * mean CE_label + (1 - alpha) * mean CE_rationale."""
    from helpers import tiny_llama

    data = _data(tok, _write(tmp_path, _records(12)))
    model = tiny_llama(len(tok), layers=2)
    sampler = ExampleSampler(n=len(data.train), batch_size=4, seed=0, group_size=data.group_size)
    micro = [collate([data.train[i] for i in sampler.next_indices()], tok.pad_token_id) for _ in range(3)]
    alpha = 0.3
    weights = TaskWeights(alpha)
    for b, w in zip(micro, weights(micro, _counts()(micro))):
        b.target_weight = w
    mix = LossMix(LossConfig(terms=[LossTerm(name="ce")], fused=False))
    total, n = 0.0, sum(b.num_targets for b in micro)
    sums = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    with torch.no_grad():
        for b in micro:
            logits_btv = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            total += float(mix(StudentOutput(logits_btv=logits_btv), None, b.target_ids, b.loss_mask, b.target_weight).total)
            nll_bt = torch.nn.functional.cross_entropy(logits_btv.transpose(1, 2), b.target_ids, reduction="none",
                                                       ignore_index=-100)
            pred_b = predict_rows(b)
            for is_pred in (True, False):
                rows = pred_b if is_pred else ~pred_b
                sums[is_pred] += float(nll_bt[rows].sum())
                counts[is_pred] += int(b.loss_mask[rows].sum())
    expected = alpha * sums[True] / counts[True] + (1 - alpha) * sums[False] / counts[False]
    assert counts[False] > 2 * counts[True]  # rationales are longer: the normalisation matters
    assert total / n == pytest.approx(expected, rel=1e-5)
    state = weights.metrics()
    assert state["step_by_step/tokens_predict"] == counts[True] and state["step_by_step/tokens_explain"] == counts[False]


def test_weights_use_global_counts():
    """With two processes the counts are summed over both (here: an all-reduce that doubles)."""
    from stillroom.data.batch import Example

    rows = [Example([5, 6, 7, 8], [False, False, True, True], "s:0:predict:x", role="predict"),
            Example([5, 6, 7, 8, 9, 10], [False, False, True, True, True, True], "s:0:explain:y", role="explain")]
    b = collate(rows, 0)
    w = TaskWeights(0.5)
    (out,) = w([b], _counts(all_reduce_sum=lambda v: 2 * v)([b]))
    n_p, n_e = 2 * 2, 2 * 4  # global
    assert out[0, 1].item() == pytest.approx(0.5 * (n_p + n_e) / n_p)
    assert out[1, 1].item() == pytest.approx(0.5 * (n_p + n_e) / n_e)
    assert out[0, 0].item() == 0.0  # not a target


def test_recipe_validates():
    from stillroom.config.load import load_config

    cfg = load_config(RECIPE)
    assert cfg.method == "step_by_step" and cfg.step_by_step.alpha == 0.5
    assert cfg.train.micro_batch_size % 2 == 0


def _cli_args(tmp_path: Path, teacher: Path, data: Path, *extra: str) -> list[str]:
    return [
        "run", str(RECIPE), f"teacher.model={{path: {teacher}}}", f"student.model={{path: {teacher}}}",
        f"data.sources=[{{path: {data}, format: prompt_completion, prompt_field: input, completion_field: label}}]",
        "data.seq_len=64", "data.heldout_fraction=0.2", "data.heldout_max=4", f"output_dir={tmp_path / 'runs'}",
        "name=sbs", "train.steps=3", "train.micro_batch_size=4", "train.grad_accum=2", "train.device=cpu",
        "train.precision=fp32", "train.warmup_steps=0", "teacher.dtype=float32", "eval.before=false",
        "eval.generations=0", "eval.heldout_sequences=4", "eval.speed_tokens=16", "baseline=false", *extra,
    ]


def test_cli_run_multi_task(tiny_teacher_dir, tmp_path):
    from stillroom.cli.main import main

    data = _write(tmp_path, _records(30))
    rc = main(_cli_args(tmp_path, tiny_teacher_dir, data, "step_by_step.task_ce_every=1", "baseline=true"))
    assert rc in (0, None)
    run = tmp_path / "runs" / "sbs"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert r["step_by_step/tokens_predict"] > 0 and r["step_by_step/tokens_explain"] > r["step_by_step/tokens_predict"]
        assert r["targets"] == r["step_by_step/tokens_predict"] + r["step_by_step/tokens_explain"]
        # the loop's loss is the objective: alpha * ce_predict + (1 - alpha) * ce_explain at the step's parameters
        expected = 0.5 * r["step_by_step/ce_predict"] + 0.5 * r["step_by_step/ce_explain"]
        assert r["loss"] == pytest.approx(expected, rel=1e-4)
    report = json.loads((run / "report.json").read_text())
    assert {"student_after", "baseline"} <= set(report)  # baseline: label-only on the same records


def test_cli_odd_micro_batch_is_refused(tiny_teacher_dir, tmp_path, capsys):
    from stillroom.cli.main import main

    data = _write(tmp_path, _records(30))
    assert main(_cli_args(tmp_path, tiny_teacher_dir, data, "train.micro_batch_size=3")) == 2  # refused when loaded
    assert "train.micro_batch_size=3 counts sequences and must be even" in capsys.readouterr().err


def test_terms_that_take_no_token_weights_are_refused_when_the_recipe_loads(tmp_path):
    from pydantic import ValidationError

    from stillroom.config.schema import RunConfig

    data = _write(tmp_path, _records(6))
    recipe = {
        "method": "step_by_step", "student": {"model": {"path": "unused"}},
        "data": {"sources": [{"path": str(data), "format": "prompt_completion", "prompt_field": "input",
                              "completion_field": "label"}], "seq_len": 64, "heldout_fraction": 0.0},
        "loss": {"terms": [{"name": "ce"}, {"name": "hidden_mse"}]}, "train": {"micro_batch_size": 4}}
    with pytest.raises(ValidationError, match=r"loss terms \['hidden_mse'\] cannot take"):
        RunConfig.model_validate(recipe)
    recipe["step_by_step"] = {"variant": "label_only"}  # one sequence per record: no token weights, no refusal
    assert RunConfig.model_validate(recipe).step_by_step.variant == "label_only"
