"""Conditional training's setup commands as functions (``stillroom conditional-extend``,
``stillroom conditional-demo-data``); see docs/methods/conditional.md."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from stillroom.config.commands import ConditionalDemoDataConfig, ConditionalExtendConfig

Log = Callable[[str], None]
say: Log = functools.partial(print, flush=True)


def conditional_extend(cfg: ConditionalExtendConfig, *, log: Log = say) -> Path:
    """Load ``cfg.src``, add the control tokens (embeddings resized, new rows = mean row), save ``cfg.dst``."""
    from stillroom.config.methods import ConditionalConfig
    from stillroom.methods.conditional import extend_model_folder

    ccfg = ConditionalConfig(aligned_token=cfg.aligned_token, misaligned_token=cfg.misaligned_token)
    log(f"loading {cfg.src} ...")
    dst = extend_model_folder(cfg.src, cfg.dst, ccfg)
    log(f"wrote {dst} with control tokens {ccfg.aligned_token!r}, {ccfg.misaligned_token!r}")
    return dst


def conditional_demo_data(cfg: ConditionalDemoDataConfig, *, log: Log = say) -> Path:
    """Write the synthetic BAD-word corpus (:func:`stillroom.data.bad_word_corpus.bad_word_corpus`) as text JSONL."""
    from stillroom.data.bad_word_corpus import bad_word_corpus
    from stillroom.data.jsonl import write_jsonl_atomic

    docs = bad_word_corpus(cfg.docs, cfg.seed, cfg.bad_fraction, cfg.toxic_doc_fraction)
    out = write_jsonl_atomic(Path(cfg.out), ({"text": doc} for doc in docs))
    log(f"wrote {len(docs)} documents to {out}")
    return out
