"""The strict base of every config section: unknown keys are errors, assignments are validated.

It imports pydantic only, so every config module (``core`` and the sections ``core`` itself
imports) can share it without an import circle.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
