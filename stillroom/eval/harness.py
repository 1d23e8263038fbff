"""lm-evaluation-harness on the models of a run (``eval.lm_eval``): the optional extra ``stillroom[harness]``.

Each model is handed to the harness as it is in memory (``HFLM(pretrained=model, tokenizer=...)``), so nothing is
loaded from disk or downloaded; tasks come from ``include_path``'s YAML files (a local JSONL task reads its file
with the ``datasets`` json builder, which works offline) or from the harness's own task list. A task's metrics
become report columns ``lm_eval_<task>_<metric>`` (``_<filter>`` appended for a filter other than ``none``).

The harness is told to leave the global random generators alone (its default re-seeds python, numpy and torch,
which would change a run's training after the evaluation before step 0); few-shot sampling keeps its own seed.
"""

from __future__ import annotations

import difflib
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from stillroom.config.harness import LmEvalConfig

EXTRA = "pip install 'stillroom[harness]'"
"""How to install the harness (pyproject.toml's extra ``harness`` pins the tested lm-eval version)."""


def lm_eval_module() -> Any:
    """The ``lm_eval`` package; an ImportError naming the extra when it is not installed."""
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(f"eval.lm_eval needs lm-evaluation-harness, which is not installed ({err}); install the "
                          f"extra: {EXTRA}") from None
    return lm_eval


@lru_cache(maxsize=4)
def task_manager(include_path: str | None, tasks: tuple[str, ...]) -> Any:
    """A harness ``TaskManager`` that knows ``tasks``: ``include_path``'s tasks alone when they hold every one
    (indexing the harness's own ~10k task files takes ~10 s), else those plus the harness's own. Cached: the run
    checks the names before step 0 and evaluates several times."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def check_lm_eval(cfg: LmEvalConfig) -> list[str]:
    """What stops ``eval.lm_eval`` from running, one line per problem (empty: it can run): the harness not
    installed, ``include_path`` not a folder (then the names are not checked: they may be in the folder meant),
    task names the harness does not know (with the nearest known)."""
    try:
        lm_eval_module()
    except ImportError as err:
        return [str(err)]
    include = _include_path(cfg)
    if include is not None and not Path(include).is_dir():
        return [f"eval.lm_eval.include_path: {include} is not a folder; point it at the folder of your task YAML "
                "files, or remove it to use the harness's own tasks"]
    known = task_manager(include, tuple(cfg.tasks)).all_tasks
    problems = []
    for task in cfg.tasks:
        if task not in known:
            near = difflib.get_close_matches(task, known, n=3)
            where = f"the task YAML files in {include} or " if include else ""
            problems.append(f"eval.lm_eval.tasks: unknown task {task!r} (not in {where}the harness's own tasks)"
                            + (f"; did you mean {', '.join(near)}?" if near else ""))
    return problems


def _include_path(cfg: LmEvalConfig) -> str | None:
    return None if cfg.include_path is None else str(Path(cfg.include_path).expanduser())


def harness_results(model: torch.nn.Module, tokenizer: Any, cfg: LmEvalConfig) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``model`` (read with ``tokenizer``) on ``cfg.tasks``, as the harness's
    ``results`` section gives them (standard errors dropped); the model's train/eval mode is restored."""
    lm_eval = lm_eval_module()
    from lm_eval.models.huggingface import HFLM

    include = _include_path(cfg)
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)  # puts the model in eval mode
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(cfg.tasks), task_manager=task_manager(include, tuple(cfg.tasks)),
            num_fewshot=cfg.num_fewshot, limit=cfg.limit, log_samples=False, bootstrap_iters=0,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None,
        )
    finally:
        model.train(was_training)
    results: dict[str, dict[str, float]] = {}
    for task, entries in out["results"].items():
        for key, value in entries.items():
            metric, sep, filt = key.partition(",")
            if sep and not metric.endswith("_stderr") and _finite(value):
                results.setdefault(task, {})[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
    return results


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def row_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The report row's scalars: ``lm_eval_<task>_<metric>``."""
    return {f"lm_eval_{task}_{metric}": v for task, metrics in results.items() for metric, v in metrics.items()}


def lm_eval_rows(cfg: LmEvalConfig, models: dict[str, tuple[torch.nn.Module, Any]], *,
                 log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Each named ``(model, tokenizer)``'s report scalars on ``cfg.tasks``; logs one line per model."""
    rows = {}
    for name, (model, tokenizer) in models.items():
        rows[name] = row_metrics(harness_results(model, tokenizer, cfg))
        log(f"lm_eval {name}: " + ", ".join(f"{k.removeprefix('lm_eval_')} {v:.4g}" for k, v in rows[name].items()))
    return rows
