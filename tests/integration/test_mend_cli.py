"""method=mend through the real CLI on the synthetic key -> value tasks: the pretrain stage's distiller starts the
finetune stage, the report measures the three arms with their input lengths, the frozen LLM's files are never
touched, and a run stopped after 2 steps and resumed logs the uninterrupted run's losses exactly."""

import json

import pytest
import yaml
from cli_helpers import assert_same_losses, stillroom

from stillroom.config.mend import MendTasksConfig
from stillroom.datagen.mend_tasks import write_mend_tasks

TINY_DATA = dict(train_tasks=12, test_tasks=4, queries_per_task=2, pretrain_texts=24, icl_texts=0, llm_hidden=32)


def _recipe(tmp_path, data, name, stage, **mend):
    source = {"path": str(data / ("pretrain.jsonl" if stage == "pretrain" else "train.jsonl")),
              "format": "text" if stage == "pretrain" else "prompt_completion"}
    recipe = {
        "name": name, "output_dir": str(tmp_path / "runs"), "method": "mend",
        "teacher": {"model": {"path": str(data / "llm_init")}, "dtype": "float32"},
        "student": {"from_teacher": {"strategy": "explicit", "layers": [0]}},
        "data": {"sources": [source], "seq_len": 64, "heldout_fraction": 0.1, "heldout_max": 4},
        "loss": {"terms": [{"name": "ce"}]},
        "train": {"steps": 4, "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 0, "lr": 3e-3,
                  "schedule": "constant", "save_every": 2, "keep_checkpoints": 3},
        "eval": {"before": False, "generations": 0, "heldout_sequences": 4, "speed_tokens": 16},
        "mend": {"stage": stage, "summary_len": 4, **mend},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_mend_pretrains_finetunes_reports_three_arms_and_resumes_exactly(tmp_path):
    data = write_mend_tasks(MendTasksConfig(out=str(tmp_path / "data"), **TINY_DATA), log=lambda _m: None)
    llm_files = {p.name: p.read_bytes() for p in (data / "llm_init").iterdir() if p.is_file()}
    out = stillroom("run", str(_recipe(tmp_path, data, "pre", "pretrain")))
    assert "mend: stage pretrain" in out.stdout and "4 distilled vectors" in out.stdout
    pre = tmp_path / "runs" / "pre"
    assert (pre / "distiller" / "mend_distiller.safetensors").is_file()

    fine = _recipe(tmp_path, data, "fine", "finetune", init=str(pre / "distiller"),
                   eval_path=str(data / "test.jsonl"), eval_max=8)
    out = stillroom("run", str(fine))
    assert f"from {pre / 'distiller'}" in out.stdout
    run_dir = tmp_path / "runs" / "fine"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"loss/ce", "loss/kd"} <= set(r) for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[0]["loss/ce"] + rows[0]["loss/kd"], rel=1e-6)  # lambda = 1
    report = json.loads((run_dir / "mend_report.json").read_text())
    arms = report["arms"]
    assert set(arms) == {"no_demonstrations", "full_icl", "distilled"} and report["evaluated_on"].endswith("test.jsonl")
    assert all(a["records"] == 8 and 0.0 <= a["accuracy"] <= 1.0 for a in arms.values())
    # x = "?", the query key, its value, EOS: 4 tokens; D = 16 demonstrations of 2 tokens (pair, ";"); 4 vectors
    assert arms["no_demonstrations"]["input_positions"] == 4
    assert arms["full_icl"]["input_positions"] == 16 * 2 + 4 and arms["distilled"]["input_positions"] == 4 + 4
    assert "| distilled |" in (run_dir / "mend_report.md").read_text()
    assert {p.name: p.read_bytes() for p in (data / "llm_init").iterdir() if p.is_file()} == llm_files

    part = _recipe(tmp_path, data, "part", "finetune", init=str(pre / "distiller"))
    stillroom("run", str(part), "train.steps=2")
    resumed = stillroom("run", str(part), "--resume")
    assert "resumed from" in resumed.stdout
    assert_same_losses(tmp_path / "runs" / "part", run_dir, abs=1e-6, steps=4)


def test_mend_data_command_writes_the_task_files(tmp_path):
    out = tmp_path / "mend"
    stillroom("mend-data", "--out", str(out), "--train-tasks", "3", "--test-tasks", "2", "--pretrain-texts", "2",
              "--icl-texts", "2", "--demos", "4")
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 and all(len(r["demonstrations"]) == 4 for r in rows)  # 4 queries per task
    assert (out / "test.jsonl").exists() and (out / "icl.jsonl").exists() and (out / "llm_init" / "config.json").exists()
