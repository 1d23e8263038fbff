"""Orchestration: every command as a function of its typed config section.

``run`` prepares a run through its domain, calls the loop, trains the baseline,
evaluates and writes the report (:mod:`stillroom.run.training`); ``evaluate_run``
re-evaluates a finished run; ``cache_teacher`` writes a teacher store. The other
commands' functions live beside them (``spec_eval``, ``serve``, ...).
"""

from stillroom.run.cache_teacher import cache_teacher
from stillroom.run.evaluation import evaluate_run
from stillroom.run.training import check_run, prepare_run, run

__all__ = ["cache_teacher", "check_run", "evaluate_run", "prepare_run", "run"]
