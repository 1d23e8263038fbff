"""MiniPLM difference sampling (Gu et al., ICLR 2025): the teacher selects the pre-training text.

Knowledge distillation at the data level, done once and offline. Every instance ``x`` of the
corpus (cut exactly as training cuts it: :func:`stillroom.data.build_splits` with the recipe's
``data`` section, so ``seq_len`` and ``pack`` apply) is scored by

    NLL_M(x) = (1 / |x|) * sum_{t in loss mask} -log p_M(x_t | x_<t)        (per-instance mean)
    score(x) = NLL_ref(x) - NLL_teacher(x) = (1/|x|) log( p_teacher(x) / p_ref(x) )

where ``|x|`` counts the instance's target tokens (padding and non-target positions excluded,
exactly :attr:`Batch.loss_mask`) and ``p_M`` is the softmax over the token ids of the shared
tokenizer only (:func:`scoring_vocab_size`: padded head rows are cut off). Degenerate instances (no target token, or only special
tokens) are removed before ranking. Instances are sorted by score, descending (ties keep the
corpus order), the top ``floor(fraction * N)`` are kept, re-sorted into corpus order and written
as *text* (JSONL ``{"text": ...}``, detokenised), so a student with any tokenizer or
architecture can train on them (``method: sft``). High scores: text the teacher predicts much
better than the weak reference (hard but learnable). Low scores: easy text (both predict it)
and noise (neither does).

Files (``<out>`` = ``select.output`` without ``.jsonl``): ``<out>.jsonl`` (the selection),
``<out>.scores.jsonl`` (one row per scored instance: id, index, source, domain, n_tokens,
nll_teacher, nll_ref, score, kept), ``<out>.summary.json`` (counts kept per source and domain,
score statistics, models, settings). While scoring, rows are appended per batch to
``<out>.scores.partial.jsonl``; an interrupted run resumes from it when the teacher, reference,
precision, scoring vocabulary and instances are the same (``select.resume``).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from stillroom.data.batch import Batch, Example, collate
from stillroom.eval.metrics import row_nll as instance_nll  # per-instance NLL sums and counts

Log = Callable[[str], None]


@dataclass
class InstanceScore:
    """One scored instance. ``n_tokens``: its counted (target) tokens; NLLs in nats per token."""

    id: str
    index: int
    source: str | None
    domain: str | None
    n_tokens: int
    nll_teacher: float
    nll_ref: float
    score: float
    kept: bool = False


# ---------------------------------------------------------------- scoring math
def degenerate_reason(example: Example, special_ids: set[int]) -> str | None:
    """Why ``example`` cannot be ranked (``None`` when it can): no target token, or nothing but special tokens."""
    if not any(example.target[1:]):
        return "no target tokens"
    if all(t in special_ids for t in example.input_ids):
        return "only special tokens (padding/EOS)"
    return None


def select_top(scores: Sequence[float], fraction: float) -> list[int]:
    """Indices of the top ``floor(fraction * len(scores))`` scores, returned in ascending (corpus) order.

    Sorted by score descending; equal scores keep the earlier index first (stable), so the
    result is deterministic. ``fraction`` in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"select.fraction must be in (0, 1], got {fraction}")
    k = math.floor(fraction * len(scores))
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])


def check_same_tokenizer(teacher_tok, reference_tok, reference_model: torch.nn.Module, *, teacher: str, reference: str) -> None:
    """Refuse a reference whose tokenizer differs from the teacher's (both NLLs must be over the same tokens)."""
    from stillroom.models import tokenizer_hash
    from stillroom.models.vocab import logit_width

    th, rh = tokenizer_hash(teacher_tok), tokenizer_hash(reference_tok)
    if th != rh:
        va, vb = teacher_tok.get_vocab(), reference_tok.get_vocab()
        ia, ib = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
        diff = [f"id {i}: {ia.get(i)!r} vs {ib.get(i)!r}" for i in sorted(set(ia) | set(ib)) if ia.get(i) != ib.get(i)][:3]
        raise ValueError(
            f"select.reference ({reference}) and teacher.model ({teacher}) have different tokenizers "
            f"({len(reference_tok)} vs {len(teacher_tok)} tokens; {'; '.join(diff) or 'special tokens differ'}). "
            "MiniPLM compares NLL_ref and NLL_teacher over the same token sequence: use a reference trained "
            "with the teacher's tokenizer (e.g. a small model derived from the teacher with `student.from_teacher` "
            "and trained briefly with `method: sft` on other data)"
        )
    width = logit_width(reference_model)
    if width < len(teacher_tok):
        raise ValueError(
            f"select.reference ({reference}) has {width} output logits but the tokenizer has {len(teacher_tok)} tokens; "
            "resize its embeddings (`model.resize_token_embeddings(len(tokenizer))`)"
        )


def scoring_vocab_size(tokenizer, *models: torch.nn.Module) -> int:
    """How many leading logits the NLLs are taken over: the token ids the shared tokenizer can produce.

    Heads are often padded past the tokenizer (to a multiple of 64 or 128) with rows no token id
    reaches; their logits must not enter the log-softmax, or they take probability mass from the real
    tokens and shift NLL_teacher and NLL_ref by amounts that have nothing to do with the text. This is
    at most :func:`stillroom.models.vocab.check_vocab`'s shared width, and smaller when both heads are
    padded alike. Raises when a head has fewer rows than that (some token ids would have no logit).
    """
    from stillroom.models.vocab import logit_width

    n = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    for model in models:
        width = logit_width(model)
        if width < n:
            raise ValueError(f"{type(model).__name__} has {width} output logits but the tokenizer has {n} token ids; "
                             "resize its embeddings (`model.resize_token_embeddings(len(tokenizer))`)")
    return n


def score_instances(
    teacher: torch.nn.Module,
    reference: torch.nn.Module,
    examples: Sequence[Example],
    *,
    pad_id: int,
    vocab_size: int | None,
    batch_size: int = 8,
    precision: str = "fp32",
    done: dict[str, InstanceScore] | None = None,
    on_batch: Callable[[list[InstanceScore]], None] | None = None,
    log: Log = print,
) -> list[InstanceScore]:
    """Score every example (none degenerate) in batches; returns one :class:`InstanceScore` per example, in order.

    ``vocab_size``: the log-softmax is over the first ``vocab_size`` logits of both models
    (:func:`scoring_vocab_size`; ``None``: the whole head, only right when no head is padded).
    ``done``: scores already known by example uid (resume); ``on_batch``: called with each
    batch's new rows (e.g. to append them to a file). Logs a progress line at most every 10 s.
    """
    done = done or {}
    out: list[InstanceScore | None] = [None] * len(examples)
    todo = []
    for i, ex in enumerate(examples):
        if ex.uid in done:
            out[i] = InstanceScore(**{**asdict(done[ex.uid]), "index": i, "kept": False})
        else:
            todo.append(i)
    if done:
        log(f"select: resuming, {len(examples) - len(todo)} of {len(examples)} instances already scored")
    t0 = last = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        batch = collate([examples[i] for i in idx], pad_id)
        t_sum, t_cnt = instance_nll(teacher, batch, precision, vocab_size=vocab_size)
        r_sum, r_cnt = instance_nll(reference, batch, precision, vocab_size=vocab_size)
        assert torch.equal(t_cnt, r_cnt)
        rows = []
        for j, i in enumerate(idx):
            n = int(t_cnt[j])
            nll_t, nll_r = float(t_sum[j]) / n, float(r_sum[j]) / n
            ex = examples[i]
            rows.append(InstanceScore(ex.uid, i, ex.meta.get("source"), ex.domain, n, nll_t, nll_r, nll_r - nll_t))
        for r in rows:
            out[r.index] = r
        if on_batch is not None:
            on_batch(rows)
        now = time.perf_counter()
        finished = start + len(idx)
        if now - last >= 10.0 or finished == len(todo):
            rate = finished / max(now - t0, 1e-9)
            log(f"select: scored {finished}/{len(todo)} instances ({rate:.1f}/s, {now - t0:.0f}s)")
            last = now
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- text out
def instance_texts(example: Example, tokenizer) -> list[str]:
    """The documents of an instance as text: its token ids split at EOS, each piece decoded
    with special tokens skipped; empty pieces dropped. A packed block yields the (possibly cut)
    documents it holds; an unpacked record yields its one document."""
    eos = tokenizer.eos_token_id
    pieces, cur = [], []
    for t in example.input_ids:
        if t == eos:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    pieces.append(cur)
    texts = [tokenizer.decode(p, skip_special_tokens=True, clean_up_tokenization_spaces=False) for p in pieces if p]
    return [t for t in texts if t.strip()]


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
    }


def summarize(rows: list[InstanceScore], *, fraction: float, degenerate: dict[str, int]) -> dict:
    """Counts kept per source and per domain, and score/NLL statistics of kept vs dropped instances."""

    def groups(key: str) -> dict:
        out: dict = {}
        for r in rows:
            g = out.setdefault(str(getattr(r, key)), {"instances": 0, "kept": 0, "tokens": 0, "kept_tokens": 0})
            g["instances"] += 1
            g["tokens"] += r.n_tokens
            if r.kept:
                g["kept"] += 1
                g["kept_tokens"] += r.n_tokens
        n_kept = sum(1 for r in rows if r.kept)
        for g in out.values():
            g["kept_fraction"] = g["kept"] / g["instances"]
            g["share_of_selection"] = g["kept"] / n_kept if n_kept else 0.0
        return out

    kept = [r for r in rows if r.kept]
    dropped = [r for r in rows if not r.kept]
    return {
        "fraction": fraction,
        "instances_scored": len(rows),
        "instances_kept": len(kept),
        "degenerate_removed": sum(degenerate.values()),
        "degenerate_reasons": degenerate,
        "tokens_scored": sum(r.n_tokens for r in rows),
        "tokens_kept": sum(r.n_tokens for r in kept),
        "per_source": groups("source"),
        "per_domain": groups("domain"),
        "score": {"all": _stats([r.score for r in rows]), "kept": _stats([r.score for r in kept]),
                  "dropped": _stats([r.score for r in dropped])},
        "nll_teacher": {"kept": _stats([r.nll_teacher for r in kept]), "dropped": _stats([r.nll_teacher for r in dropped])},
        "nll_ref": {"kept": _stats([r.nll_ref for r in kept]), "dropped": _stats([r.nll_ref for r in dropped])},
    }


def output_paths(output: str | Path) -> dict[str, Path]:
    """``selected`` (the JSONL given), ``scores``, ``partial`` and ``summary`` next to it."""
    out = Path(output)
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    return {"selected": out if out.suffix == ".jsonl" else out.with_suffix(".jsonl"),
            "scores": Path(f"{stem}.scores.jsonl"), "partial": Path(f"{stem}.scores.partial.jsonl"),
            "summary": Path(f"{stem}.summary.json")}


def _fingerprint(teacher_id: str, reference_id: str, precision: str, vocab_size: int, examples: Sequence[Example]) -> str:
    h = hashlib.sha256(f"{teacher_id}\n{reference_id}\n{precision}\nvocab {vocab_size}\n".encode())
    for ex in examples:
        h.update(ex.uid.encode() + b"\n")
    return h.hexdigest()[:24]


def _read_partial(path: Path, fingerprint: str, log: Log) -> dict[str, InstanceScore]:
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("fingerprint") != fingerprint:
        log(f"select: {path} is from other models, precision or data; scoring from scratch")
        return {}
    done = {}
    for line in lines[1:]:
        try:
            row = InstanceScore(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            break  # a line cut by the interruption: everything after it is rescored
        done[row.id] = row
    return done


# ---------------------------------------------------------------- end to end
@dataclass
class SelectResult:
    selected: Path
    scores: Path
    summary: Path
    summary_data: dict


def run_select(cfg, *, log: Log = print) -> SelectResult:
    """``stillroom select``: load teacher and reference, cut the corpus as training would, score, keep, write.

    ``cfg``: a :class:`stillroom.config.schema.RunConfig` (sections ``teacher``, ``data``,
    ``select``, ``seed``, ``output_dir``/``name``). Scores the *training* split of ``data``
    (set ``data.heldout_fraction: 0`` to score the whole corpus). Text sources only.
    """
    from stillroom.data import build_splits
    from stillroom.models import load_model
    from stillroom.models.precision import resolve_precision, weights_dtype

    sel = cfg.select
    if sel.reference is None:
        raise ValueError("select.reference is not set: give the small reference model, e.g. "
                         "`select.reference.path=runs/reference/student` (it must share the teacher's tokenizer)")
    precision = resolve_precision(sel.precision, cfg.teacher.device)
    dtype = weights_dtype(cfg.teacher.dtype, cfg.teacher.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    paths = output_paths(sel.output or cfg.run_dir / "selected.jsonl")
    paths["selected"].parent.mkdir(parents=True, exist_ok=True)

    teacher = load_model(cfg.teacher.model, dtype=dtype, cache_dir=cfg.cache_dir)
    reference = load_model(sel.reference, dtype=dtype, cache_dir=cfg.cache_dir)
    check_same_tokenizer(teacher.tokenizer, reference.tokenizer, reference.model,
                         teacher=teacher.identity, reference=reference.identity)
    log(f"select: teacher {teacher.identity}; reference {reference.identity}; precision {precision}")
    tok = teacher.tokenizer
    vocab_size = scoring_vocab_size(tok, teacher.model, reference.model)
    splits = build_splits(cfg.data, tok, cfg.seed)
    not_text = sorted({str(e.meta.get("source")) for e in splits.train if e.meta.get("format") != "text"})
    if not_text:
        raise ValueError(f"select scores pre-training text, but data source(s) {not_text} are prompt/completion or "
                         "chat records; use text sources (a `text` field, .txt files or bundled: pydoc)")
    special = set(tok.all_special_ids)
    examples, degenerate = [], {}
    for ex in splits.train:
        reason = degenerate_reason(ex, special)
        if reason is None:
            examples.append(ex)
        else:
            degenerate[reason] = degenerate.get(reason, 0) + 1
    if not examples:
        raise ValueError(f"select: none of the {len(splits.train)} instances can be scored ({degenerate}); check data.sources")
    log(f"select: {len(examples)} instances of {cfg.data.seq_len} tokens (pack={cfg.data.pack}), "
        f"{sum(degenerate.values())} degenerate removed, {len(splits.heldout)} held-out sequences not scored")

    fp = _fingerprint(teacher.identity, reference.identity, precision, vocab_size, examples)
    done = _read_partial(paths["partial"], fp, log) if sel.resume else {}
    with paths["partial"].open("w") as f:  # rewritten: header + the rows kept from the last run
        f.write(json.dumps({"fingerprint": fp}) + "\n")
        for row in done.values():
            f.write(json.dumps(asdict(row)) + "\n")

    def append(rows: list[InstanceScore]) -> None:
        with paths["partial"].open("a") as f:
            for r in rows:
                f.write(json.dumps(asdict(r)) + "\n")

    teacher_model = teacher.model.to(cfg.teacher.device).eval()
    reference_model = reference.model.to(cfg.teacher.device).eval()
    rows = score_instances(teacher_model, reference_model, examples, pad_id=tok.pad_token_id, vocab_size=vocab_size,
                           batch_size=sel.batch_size, precision=precision, done=done, on_batch=append, log=log)
    keep = set(select_top([r.score for r in rows], sel.fraction))
    for r in rows:
        r.kept = r.index in keep

    n_docs = 0
    tmp = paths["selected"].with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for r in rows:
            if r.kept:
                for text in instance_texts(examples[r.index], tok):
                    f.write(json.dumps({"text": text, "instance": r.id}, ensure_ascii=False) + "\n")
                    n_docs += 1
    tmp.replace(paths["selected"])
    with paths["scores"].open("w") as f:
        for r in rows:
            f.write(json.dumps(asdict(r)) + "\n")
    summary = summarize(rows, fraction=sel.fraction, degenerate=degenerate)
    summary.update(
        documents_written=n_docs, teacher=teacher.identity, reference=reference.identity, precision=precision,
        seq_len=cfg.data.seq_len, pack=cfg.data.pack, heldout_sequences_not_scored=len(splits.heldout),
        files={k: str(v) for k, v in paths.items() if k != "partial"},
    )
    paths["summary"].write_text(json.dumps(summary, indent=2))
    paths["partial"].unlink(missing_ok=True)
    s = summary["score"]
    log(f"select: kept {len(keep)}/{len(rows)} instances ({n_docs} text records) -> {paths['selected']}; "
        f"score kept mean {s['kept'].get('mean', float('nan')):.3f} vs dropped {s['dropped'].get('mean', float('nan')):.3f}")
    by = "domain" if any(r.domain is not None for r in rows) else "source"
    for name, g in summary[f"per_{by}"].items():
        log(f"select:   {by} {name}: kept {g['kept']}/{g['instances']} ({100 * g['share_of_selection']:.0f}% of the selection)")
    return SelectResult(paths["selected"], paths["scores"], paths["summary"], summary)
