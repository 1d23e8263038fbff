"""A local lm-evaluation-harness task on a JSONL file, written by a test (imported by name: tests/ is on sys.path)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-evaluation-harness is not installed (the optional extra: pip install 'stillroom[harness]')",
)

QUESTIONS = ["The file is opened with", "A list is sorted by", "The loop ends at", "Python reads the",
             "An error is raised when", "The module defines", "Each value is", "The function returns"]
CHOICES = [" the name", " a number", " the end"]


def write_mc_task(folder: Path, gold: list[int], task: str = "toy_mc") -> Path:
    """``folder/<task>.yaml``: a multiple-choice task (``acc``) over ``folder/<task>.jsonl``, one document per
    answer in ``gold`` (question i of :data:`QUESTIONS`, choices :data:`CHOICES`); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": QUESTIONS[i], "choices": CHOICES, "label": g} for i, g in enumerate(gold)]
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder
