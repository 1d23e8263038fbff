"""Evaluation: held-out metrics against the teacher, speed and size, generations, the run report."""

from stillroom.eval.generations import greedy_generations
from stillroom.eval.metrics import (
    count_params,
    evaluate_lm,
    teacher_logits_from_model,
    trainable_params,
)
from stillroom.eval.speed import forward_tokens_per_s
from stillroom.eval.report import MODEL_KEYS, load_report, write_report

__all__ = [
    "MODEL_KEYS",
    "count_params",
    "evaluate_lm",
    "forward_tokens_per_s",
    "greedy_generations",
    "load_report",
    "teacher_logits_from_model",
    "trainable_params",
    "write_report",
]
