"""The causal-LM domain with a teacher of another tokenizer (``teacher.tokenizer_mode: cross``).

Before step 0: the student's tokenizer is loaded (it tokenizes the data), the student is
loaded or built for it, the two vocabularies are matched and every training and held-out
sequence is aligned once, so text the teacher's tokenizer would spell differently fails
here, naming the sequence and the first divergent character. At report time the teacher
is measured on its own tokens of the held-out text (bits per byte compare across
tokenizers; KL and top-1 agreement need one vocabulary and are left out).
"""

from __future__ import annotations

from typing import Callable

import torch

from stillroom.config.schema import RunConfig
from stillroom.data.batch import Example
from stillroom.models import load_model, student_from_config
from stillroom.models.precision import torch_dtype
from stillroom.teachers.cross_align import CrossVocab, cross_vocab

Log = Callable[[str], None]

NO_SHARED_VOCAB = ("KL and top-1 agreement to the teacher are not shown: the teacher's tokenizer differs "
                   "(teacher.tokenizer_mode=cross), so the two models predict over different vocabularies; "
                   "compare bits per byte, which does not depend on the tokenizer")


def load_student_tokenizer(cfg: RunConfig, teacher_tok, log: Log):
    """``student.tokenizer`` (a folder), ``student.new_tokenizer`` (trained on the run's text), else the tokenizer
    saved with ``student.model``."""
    from transformers import AutoTokenizer

    if cfg.student.new_tokenizer is not None:
        from stillroom.models.new_tokenizer import new_student_tokenizer

        return new_student_tokenizer(cfg, teacher_tok, log)
    path = cfg.student.tokenizer or (cfg.student.model.path if cfg.student.model is not None else None)
    if path is None:  # a GGUF or builtin student: its loader knows the tokenizer
        return None
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.pad_token_id is None:
        raise ValueError(f"the student's tokenizer ({path}) has no pad token; set one (e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token) and save it again")
    return tok


def cross_student(cfg: RunConfig, teacher_model: torch.nn.Module, tokenizer, log: Log):
    """``(student, its tokenizer)``: ``student.model`` loaded, or built from the teacher's config with the
    student tokenizer's vocabulary (``student.from_config`` + ``student.tokenizer``)."""
    dtype = torch_dtype(cfg.student.dtype)
    if cfg.student.model is not None:
        loaded = load_model(cfg.student.model, dtype=dtype, cache_dir=cfg.cache_dir)
        return loaded.model, tokenizer or loaded.tokenizer
    student = student_from_config(teacher_model, cfg.student.from_config, seed=cfg.seed, tokenizer=tokenizer).to(dtype)
    n_params = sum(x.numel() for x in student.parameters())
    log(f"student: new {student.config.num_hidden_layers}-layer model from the teacher's config with its own "
        f"{len(tokenizer)}-token vocabulary ({n_params / 1e6:.1f}M parameters, random init)")
    return student, tokenizer


def setup_cross(teacher_tok, teacher_model: torch.nn.Module, student_tok, student: torch.nn.Module,
                examples: list[Example], log: Log, *, chat_template: str = "student", vocab_map: str = "exact",
                cache_dir=None) -> tuple[int, CrossVocab]:
    """``(student vocabulary, CrossVocab)`` after aligning every sequence of ``examples`` (raises on the first
    one whose text the teacher's tokenizer does not spell back). ``chat_template: own``: chat records are
    rendered by each side's own template (:mod:`stillroom.teachers.cross_chat`). ``vocab_map``:
    ``teacher.cross.vocab_map``; ``cache_dir``: where a min_edit_distance map is cached."""
    from stillroom.models import logit_width

    s_vocab = min(len(student_tok), logit_width(student))
    t_vocab = min(len(teacher_tok), logit_width(teacher_model))
    vocab = cross_vocab(student_tok, teacher_tok, student_vocab=s_vocab, teacher_vocab=t_vocab, vocab_map=vocab_map,
                        cache_dir=cache_dir)
    if chat_template == "own":
        chats = own_chat_alignments(vocab, examples)
        log(f"cross-tokenizer: {chats} chat sequences rendered by each side's own chat template; their positions "
            "align inside message contents")
    targets = aligned = 0
    for ex in examples:
        row = vocab.align(ex.input_ids, ex.uid)
        learned = {i for i in range(len(ex.input_ids) - 1) if ex.target[i + 1]}
        targets += len(learned)
        aligned += len(learned & set(row.student_pos))
    log(f"cross-tokenizer: student {s_vocab} tokens, teacher {t_vocab}; {vocab.describe()}; {aligned}/{targets} "
        f"target positions ({aligned / max(targets, 1):.1%}) align with a teacher position")
    return s_vocab, vocab


def own_chat_alignments(vocab: CrossVocab, examples: list[Example]) -> int:
    """Register with ``vocab`` the own-template alignment of every chat example (its ``meta["messages"]``);
    returns how many. The teacher's targets are its own assistant turns, from the data format's encoder."""
    from stillroom.config.core import DataSource
    from stillroom.data.formats import TextEncoder, encode_record
    from stillroom.teachers.cross_chat import chat_alignment

    src, enc = DataSource(bundled="instructions"), TextEncoder(vocab.teacher_tok, add_eos=False)
    count = 0
    for ex in examples:
        messages = ex.meta.get("messages")
        if messages is None:
            continue
        own = encode_record({src.messages_field: messages}, "messages", src, enc)
        row = chat_alignment(vocab.student_tok, vocab.teacher_tok, ex.input_ids, messages, own.target, ex.uid)
        if own.input_ids[: len(row.teacher_ids)] != row.teacher_ids:
            raise ValueError(f"sequence {ex.uid}: the teacher's chat rendering tokenizes differently with and "
                             "without offsets; use a fast tokenizer for the teacher")
        vocab.chat_rows[ex.uid] = (tuple(ex.input_ids), row)
        count += 1
    return count


def teacher_examples(vocab: CrossVocab, examples: list[Example]) -> list[Example]:
    """``examples`` in the teacher's tokens: the same text, targets from where the student's first target
    token starts, ``n_bytes`` of the teacher's target tokens (for the teacher's bits per byte)."""
    out = []
    for ex in examples:
        row = vocab.align(ex.input_ids, ex.uid)
        if row.teacher_target is not None:  # its own chat rendering: its own assistant turns
            target = [j > 0 and flag for j, flag in enumerate(row.teacher_target)]
        else:
            first = next((i for i in range(1, len(ex.input_ids)) if ex.target[i]), None)
            start = row.student_end[first - 1] if first is not None else float("inf")
            ends = row.teacher_end
            target = [j > 0 and ends[j - 1] >= start for j in range(len(row.teacher_ids))]
        n_bytes = sum(len(vocab.t.spelled[t] or b"") for t, flag in zip(row.teacher_ids, target) if flag)
        out.append(Example(row.teacher_ids, target, ex.uid, ex.domain, n_bytes, dict(ex.meta), ex.role, ex.image))
    return out
