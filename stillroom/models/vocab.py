"""Vocabulary identity and the check that teacher and student logits are comparable.

Logit distillation compares ``student_logits[..., v]`` with the teacher's
``[..., v]`` token by token, so ``v`` must mean the same string on both sides:
the two tokenizers must be identical. The two models may still differ in the
*width* of their heads: checkpoints often pad the embedding/head to a multiple
of 64 or 128 with rows no token id reaches; only the shared width counts.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn
from transformers import PreTrainedTokenizerBase

from stillroom.models.errors import VocabularyMismatch
from stillroom.models.lora import unwrap

ALTERNATIVES = (
    "sequence-level KD (`stillroom generate` writes the teacher's completions as text into a training file, "
    "`generate.export.path`; train on it with `method: sft` and `teacher.model` set to a model with the student's "
    "tokenizer, e.g. the student itself: sft does not use the teacher), distilling step-by-step (`stillroom "
    "generate generate_rationales` writes rationales, then `method: step_by_step` trains on them), self-data "
    "distillation (`stillroom generate self_data_rewrite`: the teacher rewrites the training data), or MiniPLM "
    "(`stillroom select`: the teacher selects the pre-training text); see docs/GENERATE.md"
)


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """sha256 (hex) of the vocabulary (token -> id, sorted) and the special tokens.

    Stable across processes and save/load round trips. Role assignments that do
    not change tokenization are not part of it: setting ``pad = eos`` keeps the hash.
    """
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = sorted(set(tok.all_special_tokens))
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def logit_width(model: nn.Module) -> int:
    """Number of logits the model produces per position (rows of its output head)."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None:
        head = getattr(head, "base_layer", head)  # peft LoRA layer around the head
        weight = getattr(head, "weight", None)
        if weight is not None:
            return int(weight.shape[0])
    vocab = getattr(getattr(base, "config", None), "vocab_size", None)
    if vocab is None:
        raise TypeError(f"cannot tell the logit width of {type(base).__name__} (no output head, no config.vocab_size)")
    return int(vocab)


def _differences(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, limit: int = 3) -> list[str]:
    va, vb = a.get_vocab(), b.get_vocab()
    ia = {i: t for t, i in va.items()}
    ib = {i: t for t, i in vb.items()}
    out = []
    for i in sorted(set(ia) | set(ib)):
        if ia.get(i) != ib.get(i):
            out.append(f"id {i}: {ia.get(i)!r} vs {ib.get(i)!r}")
            if len(out) == limit:
                break
    if not out:
        sa, sb = set(a.all_special_tokens), set(b.all_special_tokens)
        if sa != sb:
            out.append(f"special tokens differ: {sorted(sa ^ sb)[:limit]}")
    return out


def check_vocab(
    teacher_tok: PreTrainedTokenizerBase,
    teacher_model: nn.Module,
    student_tok: PreTrainedTokenizerBase,
    student_model: nn.Module,
) -> int:
    """The number of leading logits shared by teacher and student (the distillation vocabulary).

    Identical tokenizers (same :func:`tokenizer_hash`) whose models differ only in
    head padding are fine: returns ``min(teacher width, student width)``. Raises
    :class:`VocabularyMismatch` when the tokenizers differ, or when that width is
    smaller than ``len(tokenizer)`` (some token ids would have no logit).
    """
    th, sh = tokenizer_hash(teacher_tok), tokenizer_hash(student_tok)
    if th != sh:
        diff = "; ".join(_differences(teacher_tok, student_tok))
        raise VocabularyMismatch(
            f"teacher and student tokenizers differ (teacher {len(teacher_tok)} tokens, hash {th[:12]}; "
            f"student {len(student_tok)} tokens, hash {sh[:12]}; {diff}). Logit distillation needs a shared "
            "tokenizer: give the student the teacher's tokenizer (e.g. derive it with `student.from_teacher`), "
            "distill across tokenizers with `teacher.tokenizer_mode: cross` (docs/methods/cross_tokenizer.md), "
            f"or distill at the data level instead: {ALTERNATIVES}."
        )
    tw, sw = logit_width(teacher_model), logit_width(student_model)
    shared = min(tw, sw)
    if shared < len(teacher_tok):
        raise VocabularyMismatch(
            f"the tokenizer has {len(teacher_tok)} tokens but the {'teacher' if tw < sw else 'student'} head has "
            f"only {shared} rows, so some token ids have no logit; resize the model's embeddings "
            "(`model.resize_token_embeddings(len(tokenizer))`) or use the tokenizer it was trained with"
        )
    return shared
