"""The GPU fast paths' switches: ``loss.kernel`` and ``train.compile`` (declared here, one field each in ``core``).

What the Liger path refuses is checked before step 0 by :mod:`stillroom.losses.liger`; what compiling was tried
with is in :mod:`stillroom.train.compile`; timings and the GPU check are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

LossKernel = Literal["stillroom", "liger"]

LOSS_KERNEL = Field(
    "stillroom",
    description="What evaluates the logit terms. stillroom: this package's plain/chunked/fused paths (every term, "
    "any device). liger: Liger-Kernel's fused linear distillation loss (LigerFusedLinearJSDLoss) from the student's "
    "last hidden state and head and the online teacher's, never materialising [B, T, V] on either side. Needs CUDA "
    "and the optional extra (pip install 'stillroom[gpu]'), loss.fused=true, a dense online teacher with the same "
    "tokenizer, no token weights, and at most one divergence (forward_kl, reverse_kl or jsd) plus optionally ce; "
    "anything else is refused before step 0.",
)

COMPILE = Field(
    False,
    description="torch.compile the student's forward pass (the model up to the logits, or the last hidden state "
    "on the fused path; the loss stays eager). The first steps pay the compilation (seconds to minutes), later "
    "steps may run faster or slower: see docs/BENCHMARKS.md 'torch.compile'. Causal-LM runs (domain: lm); "
    "tried with the fused loss, LoRA, activation checkpointing, packed documents and FSDP (stillroom.train.compile).",
)
