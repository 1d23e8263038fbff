"""The models and batch the step benchmarks share: SmolLM2-135M-Instruct and its 10-layer student on bundled prose.

``bench/step_cost.py``, ``bench/compile_effect.py`` and ``bench/peers.py`` (run as scripts, so this file is
importable beside them) time steps of the same student on the same tokens; this is the one place that builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stillroom.config.schema import DataConfig, DataSource, LayerSelection, ModelSource
from stillroom.data import build_splits, collate
from stillroom.data.batch import Batch, Example
from stillroom.models import derive_student, load_model


@dataclass
class Setup:
    teacher: torch.nn.Module
    """The 30-layer teacher, fp32, on the CPU (callers move and cast it)."""
    tokenizer: object
    examples: list[Example]
    """The first ``batch_size`` training blocks of ``seq`` tokens."""
    batch: Batch
    """``examples`` collated, on ``device``."""
    student: torch.nn.Module
    """Layers 0, 3, ..., 27 of the teacher (``every_n`` 3), fp32, on ``device``."""
    kept: list[int]


def smollm2_setup(batch_size: int, seq: int, device: torch.device | str = "cpu") -> Setup:
    loaded = load_model(ModelSource(builtin="smollm2-135m-instruct"), dtype=torch.float32)
    tok = loaded.tokenizer
    examples = build_splits(DataConfig(sources=[DataSource(bundled="pydoc")], seq_len=seq), tok, 0).train[:batch_size]
    batch = collate(examples, tok.pad_token_id).to(device)
    student, kept = derive_student(loaded.model, LayerSelection(strategy="every_n", every_n=3))
    return Setup(loaded.model, tok, examples, batch, student.float().to(device), kept)
