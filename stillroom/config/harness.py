"""``eval.lm_eval``: lm-evaluation-harness tasks scored on every evaluated model of a run (the optional extra
``pip install 'stillroom[harness]'``). How the numbers are made and shown: docs/evaluation.md."""

from __future__ import annotations

from pydantic import Field, field_validator

from stillroom.config.base import Strict


class LmEvalConfig(Strict):
    """Tasks of lm-evaluation-harness run on the in-memory teacher, students and baseline (nothing re-loaded or
    downloaded); each task's metrics become report columns ``lm_eval_<task>_<metric>``."""

    tasks: list[str] = Field(
        min_length=1, description="Task (or group) names, from include_path's YAML files or the harness's own tasks "
        "(those read their data sets from the hub cache: offline, only ones downloaded before work).",
    )
    include_path: str | None = Field(
        None, description="A folder of task YAML files (searched first; e.g. a task on a local JSONL file: "
        "`dataset_path: json`, `dataset_kwargs: {data_files: {test: FILE}}`). null: the harness's own tasks only.",
    )
    limit: int | None = Field(
        None, ge=1, description="Documents scored per task (the first n); null: all of them.",
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples in each prompt; null: each task's own setting (0 unless its YAML "
        "sets num_fewshot).",
    )
    batch_size: int = Field(8, ge=1, description="Requests per forward pass of the harness.")

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        repeated = sorted({t for t in value if value.count(t) > 1})
        if repeated:
            raise ValueError(f"eval.lm_eval.tasks names {repeated} more than once; list each task once")
        return value
