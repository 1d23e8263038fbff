"""``teacher.store``: its settings (:class:`StoreConfig`) and the run-level checks that read other sections (the
loss terms, the tokenizer mode).

Imports the loss registry only (tensor-free), like :mod:`stillroom.config.cross`; ``config.schema`` calls
:func:`check_store_run` when a recipe loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from stillroom.config.base import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

UNBIASED_TERMS = ("forward_kl", "soft_ce")
"""Divergences linear in the teacher's distribution: the only ones a sampled store estimates without bias
(their gradient ``(q - p_hat) / T`` has the dense gradient as its mean; :mod:`stillroom.teachers.store_sampled`)."""


SAMPLED = ("sampled", "topk_sampled")
"""Store signals that estimate part of the teacher's distribution by drawn tokens."""


class StoreConfig(Strict):
    path: str | None = Field(
        None,
        description="Folder of a teacher store written by `stillroom cache-teacher` "
        "(null: <output_dir>/<name>/teacher_store).",
    )
    k: int = Field(64, ge=1, description="Top-k token log-probabilities kept per position (signal: sampled: tokens "
                   "drawn per position).")
    signal: Literal["topk", "sampled", "topk_sampled", "auto"] = Field(
        "topk", description="topk: the teacher's k most likely tokens with their log-probabilities and the tail "
        "mass; sampled: k tokens drawn from the teacher (with replacement), their frequencies its distribution "
        "(2k bytes per position); topk_sampled: the top k exactly plus `tail_draws` tokens drawn outside it. The "
        "sampled signals are unbiased for forward_kl and soft_ce only (docs/STORE.md, 'Sampled stores'). auto: "
        "chosen when the recipe loads from loss.terms: topk_sampled when every term that reads the teacher's "
        "logits is forward_kl or soft_ce and teacher.tokenizer_mode is same, else topk; the chosen value is what "
        "config.resolved.yaml and the store's manifest record.")
    tail_draws: int = Field(16, ge=1, description="signal: topk_sampled: tokens drawn per position from the "
                            "teacher renormalised outside its top k.")
    draw: Literal["multinomial", "systematic", "allocated"] = Field(
        "multinomial", description="How the sampled signals draw: independent draws; systematic (one offset, "
        "evenly spaced points through the CDF: each count floor or ceil of k p, less variance per position; it "
        "measured worse on held-out KL for the one store draw measured, docs/BENCHMARKS.md); or allocated "
        "(signal: topk_sampled only: independent draws, each sequence's tail_draws x positions shared out over "
        "its positions in proportion to the error one draw leaves there, at least one where the tail has mass: "
        "about a third less squared error for 1 byte more per position, docs/STORE.md).")
    draw_seed: int = Field(0, ge=0, description="Seed of the sampled signals' draws, with each sequence's uid: "
                           "another seed is another realisation of the same store (for measuring how far one "
                           "store's draws move a result). The manifest records it; a store resumes only with its own.")
    id_code: Literal["plain", "ranked"] = Field(
        "plain", description="How a store writes its token ids: plain (fixed-width integers, 2 bytes each below "
        "65,536 tokens) or ranked (each shard codes them by their rank in its own frequency table: lossless, "
        "read back bit for bit; on SmolLM2 over prose 10 bits per top-k id and 12.5 per tail draw, a 21% "
        "smaller store at k = 8 int8 + 16 tail draws; the reader decodes a shard when it loads it; store "
        "format version 3, which readers before it refuse; docs/STORE.md, 'Ranked ids'). A run reads either; "
        "a store resumes only with its own.")
    logprob_dtype: Literal["float16", "bfloat16", "int8", "int4", "float32"] = Field(
        "float16",
        description="Storage type of the top-k log-probabilities: float16/bfloat16 (2 bytes), int8 (8-bit codes "
        "on each position's own [min, max] range, error <= range/510 nats, plus 4 bytes of float16 max and step "
        "per position; see docs/STORE.md), int4 (4-bit codes, two per byte, error <= range/30 nats) or float32 "
        "(exact; for parity checks).",
    )
    hidden_layers: list[int] = Field(default_factory=list, description="Teacher layers whose hidden states are stored.")
    shard_tokens: int = Field(262144, ge=1024, description="Target number of token positions per shard.")
    cache_batch_size: int | None = Field(
        None, ge=1, description="Sequences per teacher forward while `stillroom cache-teacher` writes the store "
        "(null: train.micro_batch_size)."
    )


def auto_signal(cfg: "RunConfig") -> str:
    """What ``teacher.store.signal: auto`` means for ``cfg``: ``topk_sampled`` when the loss has terms reading the
    teacher's logits and all of them are linear in its distribution (:data:`UNBIASED_TERMS`) and the tokenizer
    mode is ``same``; else ``topk`` (it serves every term)."""
    from stillroom.losses.registry import get_term

    terms = [x.name for x in cfg.loss.terms if get_term(x.name).kind == "logit" and get_term(x.name).uses_teacher]
    linear = bool(terms) and all(n in UNBIASED_TERMS for n in terms)
    return "topk_sampled" if linear and cfg.teacher.tokenizer_mode == "same" else "topk"


def resolve_auto_signal(cfg: "RunConfig") -> None:
    """Replace ``signal: auto`` (the teacher's and every ensemble member's store section) by :func:`auto_signal`,
    so that the store writer, its manifest, the reader's check and config.resolved.yaml all see the chosen one."""
    for m in [cfg.teacher] + list(cfg.teacher.ensemble):
        if m.store.signal == "auto":
            m.store.signal = auto_signal(cfg)


def check_store_run(cfg: "RunConfig") -> None:
    """Resolve ``signal: auto``; refuse, naming the fix, a memo beside a source other than online or a
    cross-tokenizer teacher, and a run whose sampled store (or sampled memo) cannot give what its loss needs."""
    from stillroom.losses.registry import get_term

    resolve_auto_signal(cfg)
    t = cfg.teacher
    members = t.ensemble if t.source == "ensemble" else [t]
    for where, m in [("teacher", t)] + [(f"teacher.ensemble.{i}", m) for i, m in enumerate(t.ensemble)]:
        if m.store.draw == "allocated" and m.store.signal == "sampled":
            raise ValueError(f"{where}.store.draw: allocated shares the tail draws of signal topk_sampled out over "
                             "a sequence's positions; with signal: sampled use draw: multinomial or systematic")
        if m.memo and m.source != "online":
            raise ValueError(f"{where}.memo remembers the online teacher's signal, but {where}.source={m.source}; "
                             f"set {where}.memo: false (a store is read as it is)")
    if t.memo and t.tokenizer_mode == "cross":
        raise ValueError("teacher.memo keeps top-k rows in the student's vocabulary; a cross-tokenizer teacher's "
                         "targets are aligned per batch: set teacher.memo: false")
    if not any(m.store.signal in SAMPLED for m in members):
        return
    if t.tokenizer_mode == "cross":
        raise ValueError("teacher.store.signal sampled / topk_sampled works with teacher.tokenizer_mode: same; a "
                         "cross-tokenizer store needs the teacher's ranked probabilities (use teacher.store.signal: "
                         "topk)")
    if not any((m.source == "store" or m.memo) and m.store.signal in SAMPLED for m in members):
        return
    teacher_logit_terms = [x.name for x in cfg.loss.terms
                           if get_term(x.name).kind == "logit" and get_term(x.name).uses_teacher]
    biased = [n for n in teacher_logit_terms if n not in UNBIASED_TERMS]
    if biased:
        raise ValueError(f"loss.terms has {', '.join(biased)} with a sampled teacher.store.signal: tokens drawn from "
                         "the teacher estimate its distribution without bias only in terms linear in it "
                         f"({', '.join(UNBIASED_TERMS)}); use those terms, or teacher.store.signal: topk")
