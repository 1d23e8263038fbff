"""Conditional training (Korbak et al., "Pretraining Language Models with Human Preferences", ICML 2023).

Every training document is cut into segments (sentences by default: ``conditional.splitter``),
each segment is scored by a misalignment scorer ``s`` (``conditional.scorer``, a
``package.module:function`` called as ``fn(segment) -> float``, higher = worse) and gets a
control token in front of it::

    <|aligned|>     if s(segment) <= conditional.threshold
    <|misaligned|>  otherwise
    (nothing)       with probability conditional.drop_token_fraction (deterministic per seed and segment)

The document starts with EOS. The objective is plain MLE over the whole stream, control tokens
included: ``L = - sum_i log pi(c_i, x^i | c_<i, x^<i)`` (the run's loss must be ``ce`` alone). At
inference :func:`generate_aligned` prefixes ``EOS <|aligned|>``, bans both control tokens
(``bad_words_ids``) and samples at temperature 0.7, top-p 0.9.

How it fits a run (two steps, both offline):

1. :func:`extend_model_folder` (``stillroom conditional-extend SRC DST``) adds
   the two control tokens to the tokenizer as special tokens and resizes the embeddings (new
   rows = the mean of the existing rows, deterministic), writing a plain HF folder. This has to
   happen before a run because the run checks the tokenizer against the models' heads before
   anything trains.
2. ``method: conditional`` with teacher and student pointing at that folder. The one data
   pipeline reads the records with :class:`TaggingEncoder`: the training view is the tagged
   stream, packed into ``data.seq_len`` blocks (or one truncated sequence per document with
   ``data.pack: false``); the held-out loss is measured on the *untagged* text, and
   ``baseline: true`` trains the plain-MLE baseline on the same documents untagged.

Only ``text`` records are tagged (prompt/completion and chat records are refused). The
teacher is loaded (``prepare`` needs a tokenizer) but never used for training.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from stillroom.config.core import DataSource
from stillroom.config.methods import ConditionalConfig
from stillroom.data.encoders import RecordViews
from stillroom.data.formats import Encoded, Format, TextEncoder, encode_record
from stillroom.data.seeds import derive_seed
from stillroom.datagen.verifiers import import_callable
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.models.control_tokens import add_special_tokens
from stillroom.generate.sampling import left_pad

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class ScorerSpecError(ValueError):
    """A ``conditional.scorer`` that cannot be imported or is not a callable."""


class ConditionalSetupError(ValueError):
    """A run that conditional training cannot do as configured (the message names the fix)."""


# ---------------------------------------------------------------------------- scorers and segments
def bad_word_score(segment: str) -> float:
    """The demo scorer: 1.0 when the word ``BAD`` occurs in ``segment``, else 0.0."""
    return 1.0 if re.search(r"\bBAD\b", segment) else 0.0


def load_scorer(spec: str) -> Callable[[str], float]:
    """``"package.module:function"`` -> ``fn(segment) -> float`` (imported with importlib, never eval'd).

    The returned callable checks that each score is a finite real number.
    """
    if not isinstance(spec, str) or not _SPEC.match(spec.strip()):
        raise ScorerSpecError(
            f"bad conditional.scorer {spec!r}: use 'package.module:function' (dotted Python names, one colon), "
            "e.g. 'stillroom.methods.conditional:bad_word_score'"
        )
    fn = import_callable(spec, what="conditional.scorer", error=ScorerSpecError)

    def score(segment: str) -> float:
        value = fn(segment)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"conditional.scorer {spec!r} returned {value!r}; expected a finite float")
        return float(value)

    return score


def split_segments(text: str, splitter: str) -> list[str]:
    """Cut ``text`` after every match of ``splitter``; ``"".join(result) == text``, no empty segments."""
    try:
        pattern = re.compile(splitter)
    except re.error as e:
        raise ConditionalSetupError(f"conditional.splitter {splitter!r} is not a valid regex: {e}") from e
    segments, start = [], 0
    for m in pattern.finditer(text):
        if m.end() > start:
            segments.append(text[start : m.end()])
            start = m.end()
    if start < len(text):
        segments.append(text[start:])
    return segments


def drops_control(seed: int, doc_key: str, index: int, fraction: float) -> bool:
    """Whether segment ``index`` of document ``doc_key`` gets no control token (a fixed draw per seed and segment)."""
    if fraction <= 0.0:
        return False
    u = derive_seed("conditional-drop", seed, doc_key, index) / float(2**63)
    return u < fraction


# ---------------------------------------------------------------------------- tokenizer and model
def control_token_ids(tokenizer, ccfg: ConditionalConfig) -> tuple[int, int]:
    """``(aligned_id, misaligned_id)``; raises :class:`ConditionalSetupError` naming the fix when missing."""
    ids = []
    for token in (ccfg.aligned_token, ccfg.misaligned_token):
        enc = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(enc) != 1 or token not in tokenizer.get_vocab():
            raise ConditionalSetupError(
                f"the tokenizer has no single token {token!r} (it encodes to {enc}); add the control tokens and "
                "resize the embeddings first: `stillroom conditional-extend SRC DST`, "
                "then point teacher.model and student.model at DST"
            )
        ids.append(int(enc[0]))
    if ids[0] == ids[1]:
        raise ConditionalSetupError("conditional.aligned_token and conditional.misaligned_token must differ")
    return ids[0], ids[1]


def add_control_tokens(model: torch.nn.Module, tokenizer, ccfg: ConditionalConfig) -> tuple[int, int]:
    """Add both control tokens to ``tokenizer`` and resize ``model`` in place (new rows: the mean row,
    :func:`stillroom.models.control_tokens.add_special_tokens`). Returns ``(aligned_id, misaligned_id)``."""
    add_special_tokens(model, tokenizer, [ccfg.aligned_token, ccfg.misaligned_token])
    return control_token_ids(tokenizer, ccfg)


def extend_model_folder(src: str | Path, dst: str | Path, ccfg: ConditionalConfig | None = None) -> Path:
    """Load ``src`` (HF folder, ``.gguf`` file or ``builtin:NAME``), add the control tokens, save ``dst``
    (safetensors + tokenizer): what ``stillroom conditional-extend SRC DST`` does."""
    from stillroom.models import load_model, model_source

    ccfg = ccfg or ConditionalConfig()
    loaded = load_model(model_source(str(src)))
    add_control_tokens(loaded.model, loaded.tokenizer, ccfg)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(dst)
    loaded.tokenizer.save_pretrained(dst)
    return dst


# ---------------------------------------------------------------------------- tagging
@dataclass
class TaggedDoc:
    """One tagged document: ``input_ids [n]`` (EOS, then per segment [control] + tokens) and its segment tags."""

    input_ids: list[int]
    tags: list[str]  # per segment: "aligned", "misaligned" or "dropped"


def tag_document(
    text: str, *, encode: Callable[[str], list[int]], score: Callable[[str], float], ccfg: ConditionalConfig,
    ids: tuple[int, int], eos_id: int, seed: int, doc_key: str,
) -> TaggedDoc:
    """``EOS [c_1] x^1 [c_2] x^2 ...`` for ``text`` (see the module docstring). ``ids``: (aligned, misaligned)."""
    out, tags = [eos_id], []
    for i, segment in enumerate(split_segments(text, ccfg.splitter)):
        if drops_control(seed, doc_key, i, ccfg.drop_token_fraction):
            tags.append("dropped")
        elif score(segment) <= ccfg.threshold:
            out.append(ids[0])
            tags.append("aligned")
        else:
            out.append(ids[1])
            tags.append("misaligned")
        out.extend(encode(segment))
    return TaggedDoc(out, tags)


class TaggingEncoder:
    """Text records -> the tagged stream ``EOS [c_1] x^1 [c_2] x^2 ...`` (train view; every token a target,
    control tokens included) and the untagged text (eval and plain views: the held-out loss is measured on
    plain text, and ``baseline: true`` trains the plain-MLE baseline on the same documents).

    Packed into ``data.seq_len`` blocks with ``data.pack`` (documents in source order), else one sequence
    per document ending in EOS, cut to ``seq_len``. ``counts``: documents, segments and their tags, over
    every record the pipeline encodes (held-out and steer records included).
    """

    roles = (None,)
    on_too_long: Literal["truncate", "drop"] = "truncate"
    packs_text = True
    views_differ = True

    def __init__(self, ccfg: ConditionalConfig, *, seed: int, pack: bool) -> None:
        self.ccfg = ccfg
        self.seed = seed
        self.pack = pack
        self.score = load_scorer(ccfg.scorer)
        split_segments("", ccfg.splitter)  # a bad regex fails when the run starts, naming the setting
        self.counts = {"conditional_documents": 0, "conditional_segments": 0, "conditional_aligned": 0,
                       "conditional_misaligned": 0, "conditional_untagged": 0}

    def encode(self, fields: dict, fmt: Format, src: DataSource, text: TextEncoder, key: str) -> RecordViews | None:
        if fmt != "text":
            raise ConditionalSetupError(
                f"conditional training tags plain-text documents, but a data source has format {fmt!r}; "
                "use text records (data.sources[].text_field)"
            )
        plain = encode_record(fields, fmt, src, text)
        if plain is None:
            return None
        eos = text.tok.eos_token_id
        doc = tag_document(fields[src.text_field], encode=text.encode, score=self.score, ccfg=self.ccfg,
                           ids=control_token_ids(text.tok, self.ccfg), eos_id=eos, seed=self.seed, doc_key=key)
        self.counts["conditional_documents"] += 1
        self.counts["conditional_segments"] += len(doc.tags)
        for t in doc.tags:
            self.counts["conditional_" + ("untagged" if t == "dropped" else t)] += 1
        ids = doc.input_ids + ([] if self.pack else [eos])
        return RecordViews([Encoded(ids, [True] * len(ids))], plain, plain)


def build(ctx: MethodContext) -> MethodPlan:
    """``method: conditional``: train on the tagged stream with plain MLE (``ce``); checks the control tokens."""
    aligned, misaligned = control_token_ids(ctx.tokenizer, ctx.cfg.conditional)
    if max(aligned, misaligned) >= ctx.vocab_size:
        raise ConditionalSetupError(
            f"control token ids {aligned}, {misaligned} have no logit (vocab {ctx.vocab_size}); "
            "resize the model with `stillroom conditional-extend SRC DST`"
        )
    st = ctx.data.stats
    ctx.log(f"conditional: {st['conditional_documents']} documents, {st['conditional_segments']} segments: "
            f"{st['conditional_aligned']} aligned, {st['conditional_misaligned']} misaligned, "
            f"{st['conditional_untagged']} without a token; {len(ctx.data.train)} training sequences")
    n = max(st["conditional_segments"], 1)
    state = {"conditional/misaligned_fraction": st["conditional_misaligned"] / n,
             "conditional/dropped_fraction": st["conditional_untagged"] / n}
    return MethodPlan(metrics=lambda: dict(state))


METHOD = Method("conditional", build=build,
                encoder=lambda cfg: TaggingEncoder(cfg.conditional, seed=cfg.seed, pack=cfg.data.pack))


# ---------------------------------------------------------------------------- inference
@torch.no_grad()
def sample_with_control(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, sampling_temperature: float = 0.7,
    top_p: float = 0.9, seed: int = 0, control: str | None = "aligned", ccfg: ConditionalConfig | None = None,
    batch_size: int = 32, ban: str = "both", min_new_tokens: int = 0,
) -> list[list[int]]:
    """Sampled continuation ids of ``prompts``, each generated after ``EOS [control] prompt``.

    ``control``: ``"aligned"`` (the paper's inference), ``"misaligned"``, or ``None`` (no
    control token: unconditional). ``ban="both"`` (the paper's inference) bans both control
    tokens from the continuations (``bad_words_ids``) whenever the tokenizer has them;
    ``ban="misaligned"`` bans only ``<|misaligned|>``, so the model still emits a control token
    where it learned one belongs (segment starts) and that token is ``<|aligned|>`` (a variant that
    conditions every segment; not in the paper). ``min_new_tokens``: EOS is banned for the first tokens of each
    continuation (the official configs' ``min_length: 10``, counted there with the prefix). Padding/EOS after a
    row's end are stripped.
    Sampling is seeded by ``seed`` without touching the caller's global RNG state.
    """
    if ban not in ("both", "misaligned"):
        raise ValueError(f"ban must be 'both' or 'misaligned', got {ban!r}")
    ccfg = ccfg or ConditionalConfig()
    if control not in ("aligned", "misaligned", None):
        raise ValueError(f"control must be 'aligned', 'misaligned' or None, got {control!r}")
    has_tokens = all(t in tokenizer.get_vocab() for t in (ccfg.aligned_token, ccfg.misaligned_token))
    bad = None
    prefix = [tokenizer.eos_token_id]
    if has_tokens or control is not None:
        a, m = control_token_ids(tokenizer, ccfg)  # raises with the fix when the tokens are missing
        bad = [[a], [m]] if ban == "both" else [[m]]
        if control is not None:
            prefix.append(a if control == "aligned" else m)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            ids, att = left_pad([prefix + tokenizer(x, add_special_tokens=False)["input_ids"]
                                 for x in prompts[i : i + batch_size]], pad)
            width = ids.shape[1]
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                do_sample=True, temperature=sampling_temperature, top_p=top_p, top_k=0, pad_token_id=pad,
                eos_token_id=eos, bad_words_ids=bad, min_new_tokens=min_new_tokens,
            )
            for row in gen[:, width:].tolist():
                out.append(row[: row.index(eos)] if eos in row else row)
    model.train(was_training)
    return out


def generate_aligned(model, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """:func:`sample_with_control` decoded to text (special tokens skipped); same keyword arguments."""
    return tokenizer.batch_decode(sample_with_control(model, tokenizer, prompts, **kwargs), skip_special_tokens=True)
