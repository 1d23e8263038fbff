"""Errors raised by :mod:`stillroom.models`; every message says how to fix the problem."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded (missing path, offline hub id, bad cache...)."""


class VocabularyMismatch(ValueError):
    """Teacher and student do not share a vocabulary, so their logits cannot be compared."""


class LayerSelectionError(ValueError):
    """An invalid choice of decoder layers when deriving a student from a teacher."""
