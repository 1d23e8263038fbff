"""The ``eval`` section of a run: what is measured on the teacher, the student and the baseline after training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stillroom.config.base import Strict
from stillroom.config.harness import LmEvalConfig


class EvalConfig(Strict):
    heldout_sequences: int = Field(40, ge=1, description="Held-out sequences used for metrics.")
    batch_size: int = Field(8, ge=1)
    generations: int = Field(3, ge=0, description="Greedy generations shown side by side in the report.")
    max_new_tokens: int = Field(32, ge=1)
    speed_tokens: int = Field(1024, ge=16, description="Tokens timed for the forward-pass speed metric.")
    before: bool = Field(True, description="Evaluate the student before training too.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Precision of held-out metrics (fp32: exact KL/CE; bf16 is faster but adds rounding noise)."
    )
    knowledge: str | None = Field(
        None, description="A knowledge-injection suite (`stillroom knowledge-data` folder, or a JSONL of {kind, form, "
        "prompt, answer}): every evaluated model answers it greedily; accuracy per kind and form in knowledge.md, "
        "and knowledge_<form> in the report's rows (docs/methods/finetunebench.md)."
    )
    lm_eval: LmEvalConfig | None = Field(
        None, description="lm-evaluation-harness tasks scored on every evaluated model (needs the extra: pip install "
        "'stillroom[harness]'); each task's metrics as lm_eval_<task>_<metric> in the report (docs/evaluation.md)."
    )
