"""Orchestration: every command as a function of its typed config section.

``run`` prepares a run through its domain, calls the loop, trains the baseline,
evaluates and writes the report (:mod:`stillroom.run.training`); ``evaluate_run``
re-evaluates a finished run; ``cache_teacher`` writes a teacher store;
:mod:`stillroom.run.spec_eval`, :mod:`stillroom.run.serve` and
:mod:`stillroom.run.conditional_setup` hold the other commands' functions (the data
commands' live in :mod:`stillroom.datagen`, ``merge`` in :mod:`stillroom.compress.merge`).
"""

from stillroom.run.cache_teacher import cache_teacher
from stillroom.run.evaluation import evaluate_run
from stillroom.run.checks import check_run
from stillroom.run.training import prepare_run, run

__all__ = ["cache_teacher", "check_run", "evaluate_run", "prepare_run", "run"]
