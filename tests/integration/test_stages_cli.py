"""``stillroom validate|run`` on a multi-stage recipe: a bad stage fails before stage 1, the placeholders chain
the stages, a pipeline stopped in stage 2 continues with --resume and skips stage 1."""

from __future__ import annotations

import json

import yaml
from cli_helpers import stillroom

TINY_RUN = {
    "data": {"sources": [{"bundled": "pydoc", "limit": 30}], "seq_len": 32, "heldout_fraction": 0.2, "heldout_max": 4},
    "loss": {"terms": [{"name": "forward_kl"}], "chunk_tokens": 64},
    "train": {"steps": 2, "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 1, "lr": 1e-3},
    "eval": {"heldout_sequences": 4, "batch_size": 4, "generations": 0, "speed_tokens": 16, "before": False},
}


def recipe(tmp_path, teacher_dir, task_file) -> dict:
    return {
        "name": "pipe", "output_dir": str(tmp_path / "runs"),
        "defaults": {"teacher": {"model": {"path": str(teacher_dir)}, "dtype": "float32"}, **TINY_RUN},
        "stages": [
            {"name": "distill", "kind": "run",
             "recipe": {"method": "kd", "student": {"from_teacher": {"strategy": "every_n", "every_n": 2}}}},
            {"name": "task", "kind": "run",
             "recipe": {"method": "sft", "student": {"model": {"path": "{previous}"}}, "loss": {"terms": [{"name": "ce"}]},
                        "data": {"sources": [{"path": str(task_file), "format": "prompt_completion"}]}}},
            {"name": "merged", "kind": "merge", "merge": {"a": "{stage:distill}", "b": "{stage:task}", "t": 0.5}},
        ]}


def test_stages_validate_run_stop_and_resume(tmp_path, tiny_teacher_dir):
    task_file = tmp_path / "task.jsonl"
    tree = recipe(tmp_path, tiny_teacher_dir, task_file)
    path = tmp_path / "stages.yaml"
    root = tmp_path / "runs" / "pipe"

    bad = yaml.safe_load(yaml.safe_dump(tree))
    bad["stages"][2]["merge"]["tt"] = 0.5
    path.write_text(yaml.safe_dump(bad))
    proc = stillroom("run", str(path), check=False)
    assert proc.returncode == 2 and "stages[2] (merged): invalid merge settings" in proc.stderr
    assert "`merge.tt`" in proc.stderr and not root.exists()  # refused before stage 1 ran

    path.write_text(yaml.safe_dump(tree))
    out = stillroom("validate", str(path)).stdout
    assert "3 stages" in out and "stages[1] (task): method sft, 2 steps, uses distill" in out
    proc = stillroom("run", str(path), check=False)  # stage 2's data file does not exist yet: it stops there
    assert proc.returncode == 2 and "task.jsonl" in proc.stderr
    record = json.loads((root / "stages.json").read_text())
    assert {k: v["status"] for k, v in record["stages"].items()} == {"distill": "complete", "task": "started"}

    task_file.write_text("".join(json.dumps({"prompt": f"Q{i}: what is {i}+1?", "completion": f" {i + 1}"}) + "\n"
                                 for i in range(24)))
    out = stillroom("run", str(path), "--resume", "stages.task.train.steps=2").stdout
    assert "stage distill (run): complete, skipped" in out
    record = json.loads((root / "stages.json").read_text())
    assert [v["status"] for v in record["stages"].values()] == ["complete"] * 3
    resolved = yaml.safe_load((root / "task" / "config.resolved.yaml").read_text())
    assert resolved["student"]["model"]["path"] == str(root / "distill" / "student")
    assert record["stages"]["task"]["numbers"]["heldout_ce"] > 0
    report = (root / "stages.md").read_text()
    assert "| distill | run | complete | - |" in report and "| merged | merge | complete | distill, task |" in report
    models = report.split("## Models", 1)[1]  # every run stage's models side by side, the teacher first
    ce = json.loads((root / "task" / "report.json").read_text())["models"]["student_after"]["heldout_ce"]
    assert models.index("| teacher |") < models.index("| distill: student |") < models.index("| task: student |")
    assert f"| task: student | {ce:.4g} |" in models

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(root / "merged")  # a plain HF folder
    assert merged.config.num_hidden_layers == 2
