"""A new byte-level BPE tokenizer for a student, trained on the run's own training text.

``student.new_tokenizer: {vocab_size: 8192}`` (with ``teacher.tokenizer_mode: cross``) gives
the student a vocabulary of its own: a byte-level BPE (it spells any text exactly, which the
cross-tokenizer alignment needs) trained with the ``tokenizers`` library on the *training*
records of ``data.sources`` (held-out records are left out, so the held-out bits per byte
stay honest). It carries the teacher's special tokens and chat template, so chat records
render the same markup on both sides and special tokens carry over by content.

The tokenizer is written atomically to ``<run_dir>/student_tokenizer`` with a hash of its
settings and data; a later run (``--resume``, or the baseline) with the same hash reuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

from stillroom.config.schema import RunConfig

STAMP = "stillroom_tokenizer.json"


def _texts(cfg: RunConfig) -> Iterator[str]:
    """The text of every training record (held-out ones skipped): text, prompt + completion, message contents."""
    from stillroom.data.errors import BadRecordPolicy
    from stillroom.data.records import good_records, is_heldout, record_key, source_tags

    for src, tag in zip(cfg.data.sources, source_tags(cfg.data.sources)):
        for item in good_records(src, cfg.seed, BadRecordPolicy(cfg.data.on_bad_record)):
            if is_heldout(record_key(tag, item.index, item.fields), cfg.data.heldout_fraction):
                continue
            f = item.fields
            parts = [f.get(src.text_field), f.get(src.prompt_field), f.get(src.completion_field)]
            parts += [m.get("content") for m in f.get(src.messages_field) or [] if isinstance(m, dict)]
            yield "".join(p for p in parts if isinstance(p, str))


def _stamp(cfg: RunConfig, teacher_tok) -> str:
    data = json.dumps([s.model_dump() for s in cfg.data.sources], sort_keys=True, default=str)
    settings = cfg.student.new_tokenizer.model_dump_json()
    specials = json.dumps(sorted(t.content for t in teacher_tok.added_tokens_decoder.values()))
    key = f"{settings}|{data}|{cfg.data.heldout_fraction}|{cfg.seed}|{specials}"
    return hashlib.sha256(key.encode()).hexdigest()


def new_student_tokenizer(cfg: RunConfig, teacher_tok, log: Callable[[str], None] = print):
    """The run's new student tokenizer: reused from ``<run_dir>/student_tokenizer`` when its stamp matches,
    else trained here and saved there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = cfg.run_dir / "student_tokenizer"
    stamp = _stamp(cfg, teacher_tok)
    if (folder / STAMP).exists() and json.loads((folder / STAMP).read_text()).get("stamp") == stamp:
        log(f"student tokenizer: {folder} (trained earlier for these settings and data)")
        return AutoTokenizer.from_pretrained(folder)
    spec = cfg.student.new_tokenizer
    added = [t.content for t in teacher_tok.added_tokens_decoder.values() if t.special]  # e.g. chat markers
    specials = list(dict.fromkeys(t for t in [teacher_tok.pad_token, teacher_tok.eos_token, teacher_tok.bos_token,
                                              *teacher_tok.all_special_tokens, *added] if t))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    n = [0]

    def counted():
        for text in _texts(cfg):
            n[0] += 1
            yield text

    bpe.train_from_iterator(counted(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=teacher_tok.pad_token or teacher_tok.eos_token,
                                  eos_token=teacher_tok.eos_token, bos_token=teacher_tok.bos_token,
                                  additional_special_tokens=[t for t in specials if t not in
                                                             (teacher_tok.pad_token, teacher_tok.eos_token,
                                                              teacher_tok.bos_token)] or None)
    tok.chat_template = getattr(teacher_tok, "chat_template", None)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    (tmp / STAMP).write_text(json.dumps({"stamp": stamp, "vocab_size": len(tok), "records": n[0]}))
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
    log(f"student tokenizer: trained a {len(tok)}-token byte-level BPE on {n[0]} training records -> {folder}")
    return AutoTokenizer.from_pretrained(folder)
