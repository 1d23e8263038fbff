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
   happen before a run because :func:`stillroom.train.run.prepare` checks the tokenizer against
   the models' heads before any method hook exists.
2. ``method: conditional`` with teacher and student pointing at that folder. The data pipeline
   builds the usual *untagged* splits (so the held-out loss is measured on plain text, without
   control tokens, and ``baseline: true`` trains the plain-MLE baseline on the same documents);
   :func:`build_hooks` re-reads the *training* records (same held-out rule:
   :func:`stillroom.data.pipeline.is_heldout`), tags them and packs them into ``data.seq_len``
   blocks (or one truncated sequence per document with ``data.pack: false``).

Only ``text`` records are tagged (prompt/completion and chat records are refused). The
teacher is loaded (``prepare`` needs a tokenizer) but never used for training.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from stillroom.config.schema import ConditionalConfig, DataConfig
from stillroom.data.batch import Example
from stillroom.data.errors import BadRecordPolicy
from stillroom.data.formats import TextEncoder, infer_format
from stillroom.data.pipeline import good_records, is_heldout, record_key, source_tags
from stillroom.data.readers import describe
from stillroom.methods.hooks import MethodHooks
from stillroom.models.control_tokens import add_special_tokens
from stillroom.data.seeds import derive_seed
from stillroom.datagen.verifiers import import_callable

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


def tagged_train_examples(
    data: DataConfig, tokenizer, ccfg: ConditionalConfig, seed: int
) -> tuple[list[Example], dict[str, int]]:
    """The training records of ``data`` (held-out ones skipped by the pipeline's rule), tagged and sequenced.

    Packed (``data.pack``): documents concatenated in source order and cut into ``seq_len``
    blocks (the last partial block dropped). Otherwise one sequence per document, truncated
    to ``seq_len``. Every token is a target (control tokens included). Returns the examples
    and counts (documents, segments, aligned, misaligned, dropped).
    """
    score = load_scorer(ccfg.scorer)
    ids = control_token_ids(tokenizer, ccfg)
    enc = TextEncoder(tokenizer, add_eos=True)
    stats = {"documents": 0, "segments": 0, "aligned": 0, "misaligned": 0, "dropped": 0}
    examples: list[Example] = []
    for src, tag in zip(data.sources, source_tags(data.sources)):
        info = describe(src)
        fmt = src.format
        docs: list[list[int]] = []
        for item in good_records(src, seed, BadRecordPolicy(data.on_bad_record)):  # the pipeline's rules
            fmt = fmt or info.default_format or infer_format(item.fields, src, info.label, item.where)
            if fmt != "text":
                raise ConditionalSetupError(
                    f"conditional training tags plain-text documents, but {info.label} has format {fmt!r}; "
                    "use text records (data.sources[].text_field)"
                )
            key = record_key(tag, item.index, item.fields)
            text = item.fields.get(src.text_field)
            if is_heldout(key, data.heldout_fraction) or not isinstance(text, str) or not text.strip():
                continue
            doc = tag_document(text, encode=enc.encode, score=score, ccfg=ccfg, ids=ids, eos_id=enc.eos_id,
                               seed=seed, doc_key=key)
            stats["documents"] += 1
            stats["segments"] += len(doc.tags)
            for t in doc.tags:
                stats[t] += 1
            docs.append(doc.input_ids + ([] if data.pack else [enc.eos_id]))
        examples.extend(_sequences(docs, data, tag, src.domain, tokenizer))
    if not examples:
        raise ConditionalSetupError(
            f"conditional: no training sequence after tagging ({stats['documents']} documents); "
            f"add data or lower data.seq_len ({data.seq_len})"
        )
    return examples, stats


def _sequences(docs: list[list[int]], data: DataConfig, tag: str, domain: str | None, tokenizer) -> list[Example]:
    if data.pack:
        stream = [t for d in docs for t in d]
        blocks = [stream[i : i + data.seq_len] for i in range(0, len(stream) - data.seq_len + 1, data.seq_len)]
        names = [f"{tag}:cond-pack{b}" for b in range(len(blocks))]
    else:
        blocks = [d[: data.seq_len] for d in docs]
        names = [f"{tag}:cond-{i}" for i in range(len(blocks))]
    out = []
    for name, ids in zip(names, blocks):
        n_bytes = len(tokenizer.decode(ids[1:], skip_special_tokens=True).encode("utf-8"))
        digest = hashlib.sha1(",".join(map(str, ids)).encode("ascii")).hexdigest()[:10]
        out.append(Example(input_ids=ids, target=[True] * len(ids), uid=f"{name}:{digest}", domain=domain,
                           n_bytes=n_bytes, meta={"source": tag, "format": "text", "conditional": True}))
    return out


def build_hooks(p, model, *, mix, run_dir, log) -> MethodHooks:
    """``method: conditional``: train on the tagged training documents with plain MLE (``ce``)."""
    names = [t.name for t in mix.cfg.terms]
    if names != ["ce"]:
        raise ConditionalSetupError(
            f"method: conditional is plain MLE over the tagged stream, but loss.terms is {names}; "
            "set loss.terms: [{name: ce}]"
        )
    ccfg = p.cfg.conditional
    aligned, misaligned = control_token_ids(p.tokenizer, ccfg)
    if max(aligned, misaligned) >= p.vocab_size:
        raise ConditionalSetupError(
            f"control token ids {aligned}, {misaligned} have no logit (vocab {p.vocab_size}); "
            "resize the model with `stillroom conditional-extend SRC DST`"
        )
    examples, stats = tagged_train_examples(p.cfg.data, p.tokenizer, ccfg, p.cfg.seed)
    log(f"conditional: {stats['documents']} documents, {stats['segments']} segments: {stats['aligned']} aligned, "
        f"{stats['misaligned']} misaligned, {stats['dropped']} without a token; {len(examples)} sequences")
    n = max(stats["segments"], 1)
    state = {"conditional/misaligned_fraction": stats["misaligned"] / n, "conditional/dropped_fraction": stats["dropped"] / n}
    return MethodHooks(train_examples=examples, log_state=lambda: dict(state))


# ---------------------------------------------------------------------------- inference
@torch.no_grad()
def sample_with_control(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, sampling_temperature: float = 0.7,
    top_p: float = 0.9, seed: int = 0, control: str | None = "aligned", ccfg: ConditionalConfig | None = None,
    batch_size: int = 32, ban: str = "both",
) -> list[list[int]]:
    """Sampled continuation ids of ``prompts``, each generated after ``EOS [control] prompt``.

    ``control``: ``"aligned"`` (the paper's inference), ``"misaligned"``, or ``None`` (no
    control token: unconditional). ``ban="both"`` (the paper's inference) bans both control
    tokens from the continuations (``bad_words_ids``) whenever the tokenizer has them;
    ``ban="misaligned"`` bans only ``<|misaligned|>``, so the model still emits a control token
    where it learned one belongs (segment starts) and that token is ``<|aligned|>`` (a variant that
    conditions every segment; not in the paper). Padding/EOS after a row's end are stripped.
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
            enc = [prefix + tokenizer(x, add_special_tokens=False)["input_ids"] for x in prompts[i : i + batch_size]]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            att = torch.zeros_like(ids)
            for j, e in enumerate(enc):
                ids[j, width - len(e):] = torch.tensor(e)
                att[j, width - len(e):] = 1
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                do_sample=True, temperature=sampling_temperature, top_p=top_p, top_k=0, pad_token_id=pad,
                eos_token_id=eos, bad_words_ids=bad,
            )
            for row in gen[:, width:].tolist():
                out.append(row[: row.index(eos)] if eos in row else row)
    model.train(was_training)
    return out


def generate_aligned(model, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """:func:`sample_with_control` decoded to text (special tokens skipped); same keyword arguments."""
    return tokenizer.batch_decode(sample_with_control(model, tokenizer, prompts, **kwargs), skip_special_tokens=True)
