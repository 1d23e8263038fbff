"""`stillroom knowledge-data`: a FineTuneBench-style knowledge-injection suite (fictional facts, new and updated).

The suite's files and how `eval.knowledge` scores a model on them: docs/methods/finetunebench.md.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from stillroom.config.core import Strict


class KnowledgeDataConfig(Strict):
    """Fictional facts in three kinds: *known* (in the background text a base model is pretrained on), *new*
    (people injected by fine-tuning) and *update* (companies whose headquarters moved: the old city is in the
    background, the new one in the fine-tuning data)."""

    out: str = Field(description="Folder to write (background.jsonl, train.jsonl, train_augmented.jsonl, eval.jsonl, "
                     "suite.json).")
    seed: int = Field(0, description="Seed of the names and facts.")
    countries: int = Field(6, ge=2, le=40, description="Fictional countries.")
    cities: int = Field(24, ge=2, le=400, description="Fictional cities, spread over the countries.")
    known_people: int = Field(60, ge=1, description="People in the background text, asked in every phrasing (teaches "
                              "the question forms and the two-step implications).")
    new_people: int = Field(40, ge=1, description="People who appear only in the fine-tuning data (new knowledge).")
    companies: int = Field(30, ge=1, description="Companies whose headquarters move (updated knowledge).")
    background_repeats: int = Field(
        3, ge=1, description="Times each background fact is written (in shuffled order) into background.jsonl."
    )
    overwrite: bool = Field(False, description="Replace an existing suite folder.")

    @model_validator(mode="after")
    def _enough_cities(self) -> "KnowledgeDataConfig":
        if self.cities < self.countries:
            raise ValueError(f"cities ({self.cities}) must be at least countries ({self.countries}): every country "
                             "needs a city")
        return self
