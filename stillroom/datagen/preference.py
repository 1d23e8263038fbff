"""REDI's data sets from teacher generations checked by a verifier (Xu et al. 2025).

D_SFT holds every correct trace (stage 1, ``method: sft``); D_Pref holds, per problem with both,
one correct and one incorrect trace (stage 2, ``method: redi``; see :mod:`stillroom.methods.redi`).
:func:`make_preference_data` writes both files (``stillroom preference-data --export FILE --out DIR``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stillroom.data.errors import DataError
from stillroom.data.jsonl import write_jsonl_atomic

if TYPE_CHECKING:
    from stillroom.config.commands import PreferenceDataConfig

say: Callable[[str], None] = functools.partial(print, flush=True)


def build_preference_data(
    records: Iterable[dict],
    items: Sequence[dict] | Mapping[str, dict],
    verifier: Callable[[str, dict], bool] | str,
    *,
    id_field: str = "id",
    prompt_field: str = "prompt",
    dedupe: bool = True,
    stats: dict | None = None,
) -> tuple[list[dict], list[dict]]:
    """D_SFT and D_Pref from teacher generations checked by ``verifier``.

    ``records``: generation-store records (``prompt_id``, ``sample_index``, ``text``; records with an
    ``error`` or no text are skipped and counted). ``items``: the source problems (a list, or a mapping
    from id), each with ``id_field`` (matching ``prompt_id``), ``prompt_field`` (the prompt text the
    student sees) and whatever the verifier needs (e.g. ``answer``). ``verifier``: ``fn(text, item) ->
    bool`` or a spec for :func:`stillroom.datagen.verifiers.load_verifier` (``"numeric"``, ...).

    Returns ``(sft_rows, pref_rows)``: ``sft_rows`` = every correct trace ``{id, prompt, completion,
    sample_index}`` (identical texts of one problem kept once when ``dedupe``); ``pref_rows`` = per
    problem with both, ``{id, prompt, chosen, rejected, chosen_index, rejected_index}`` where chosen is
    its correct sample and rejected its incorrect sample with the lowest ``sample_index`` each (the
    paper's teacher sampled until the first correct trace). Rows follow the order of ``items``.
    ``stats`` (a dict), when given, receives the counts.
    """
    if isinstance(verifier, str):
        from stillroom.datagen.verifiers import load_verifier

        verifier = load_verifier(verifier)
    by_id: dict[str, dict] = {}
    if isinstance(items, Mapping):
        by_id = {str(k): v for k, v in items.items()}
    else:
        for i, item in enumerate(items):
            if id_field not in item:
                raise KeyError(f"item {i} has no {id_field!r} field; keys: {sorted(item)}")
            by_id[str(item[id_field])] = item
    samples: dict[str, list[tuple[int, str]]] = {}
    counts = {"records": 0, "error_records": 0}
    for rec in records:
        counts["records"] += 1
        pid = str(rec["prompt_id"])
        if pid not in by_id:
            raise KeyError(f"generation record {rec.get('key', pid)!r}: prompt_id {pid!r} is not among the items "
                           f"(matched by {id_field!r}); use the items file the generations were made from")
        text = rec.get("text")
        if "error" in rec or not isinstance(text, str):
            counts["error_records"] += 1
            continue
        samples.setdefault(pid, []).append((int(rec["sample_index"]), text))
    judged: dict[str, tuple[str, list[tuple[int, str, bool]]]] = {}
    for pid, item in by_id.items():
        if pid in samples:
            if prompt_field not in item:
                raise KeyError(f"item {pid!r} has no {prompt_field!r} field (the prompt text); keys: {sorted(item)}")
            judged[pid] = (item[prompt_field], [(i, t, bool(verifier(t, item))) for i, t in sorted(samples[pid])])
    counts["problems"] = len(by_id)
    return _select(judged, counts, dedupe=dedupe, stats=stats)


def preference_data_from_export(rows: Iterable[dict], *, dedupe: bool = True,
                                stats: dict | None = None) -> tuple[list[dict], list[dict]]:
    """D_SFT and D_Pref from ``stillroom generate``'s ``prompt_completion`` export with ``keep: all``.

    Each row is ``{prompt, completion, prompt_id, sample_index, source, verified}`` (the export ran the
    verifier). Same selection as :func:`build_preference_data`. A teacher row with ``verified`` None
    (no verifier) is an error; ``source: original`` rows (fallbacks, not teacher samples) are skipped.
    """
    counts = {"records": 0, "error_records": 0}
    judged = judged_from_export(rows, counts)
    return _select(judged, counts, dedupe=dedupe, stats=stats)


def judged_from_export(rows: Iterable[dict], counts: dict) -> dict[str, tuple[str, list[tuple[int, str, bool]]]]:
    """``{prompt_id: (prompt, [(sample_index, text, correct), ...] sorted)}`` of an export's teacher rows."""
    judged: dict[str, tuple[str, list[tuple[int, str, bool]]]] = {}
    for n, row in enumerate(rows):
        counts["records"] += 1
        if row.get("source", "teacher") != "teacher":
            continue
        if row.get("verified") is None:
            raise ValueError(f"export row {n} (prompt_id {row.get('prompt_id')!r}) has no verifier verdict; "
                             "run `stillroom generate` with generate.verifier set (e.g. numeric)")
        pid = str(row["prompt_id"])
        judged.setdefault(pid, (row["prompt"], []))[1].append(
            (int(row["sample_index"]), row["completion"], bool(row["verified"])))
    for _, samples in judged.values():
        samples.sort()
    counts["problems"] = len(judged)
    return judged


def copg_groups(judged: dict[str, tuple[str, list[tuple[int, str, bool]]]], k: int, counts: dict) -> list[dict]:
    """CoPG's records ``{id, prompt, completions, rewards}`` (reward 1.0 for a verified sample, else 0.0) of every
    problem with exactly ``k`` samples (``copg.group_size``); the others are counted as ``groups_skipped``."""
    rows = []
    for pid, (prompt, samples) in judged.items():
        if len(samples) != k:
            counts["groups_skipped"] = counts.get("groups_skipped", 0) + 1
            continue
        rows.append({"id": pid, "prompt": prompt, "completions": [t for _, t, _ in samples],
                     "rewards": [1.0 if ok else 0.0 for _, _, ok in samples]})
    counts["groups"] = len(rows)
    return rows


def _select(judged: dict[str, tuple[str, list[tuple[int, str, bool]]]], counts: dict, *, dedupe: bool,
            stats: dict | None) -> tuple[list[dict], list[dict]]:
    """D_SFT / D_Pref rows from ``{prompt_id: (prompt, [(sample_index, text, correct), ...] sorted)}``."""
    counts.update(correct=0, incorrect=0, duplicates=0)
    sft_rows, pref_rows = [], []
    for pid, (prompt, samples) in judged.items():
        correct, wrong, seen = [], [], set()
        for idx, text, ok in samples:
            counts["correct" if ok else "incorrect"] += 1
            if ok:
                if dedupe and text in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(text)
                correct.append((idx, text))
            else:
                wrong.append((idx, text))
        sft_rows += [{"id": pid, "prompt": prompt, "completion": t, "sample_index": i} for i, t in correct]
        if correct and wrong:
            pref_rows.append({"id": pid, "prompt": prompt, "chosen": correct[0][1], "rejected": wrong[0][1],
                              "chosen_index": correct[0][0], "rejected_index": wrong[0][0]})
    counts.update(problems_with_samples=len(judged), sft_rows=len(sft_rows), pref_rows=len(pref_rows))
    if stats is not None:
        stats.update(counts)
    return sft_rows, pref_rows


def preference_data_from_store(store_path: str | os.PathLike, items: Sequence[dict], verifier: Any, out_dir: str | os.PathLike,
                               **kwargs: Any) -> dict:
    """Read a generation store, build D_SFT / D_Pref, write ``<out_dir>/sft.jsonl`` and ``pref.jsonl``; return the counts."""
    from stillroom.datagen.store import GenerationStore

    with GenerationStore(store_path, read_only=True) as store:
        records = store.read()
    stats: dict = {}
    sft_rows, pref_rows = build_preference_data(records, items, verifier, stats=stats, **kwargs)
    out = Path(out_dir)
    stats["sft_path"] = str(write_jsonl_atomic(out / "sft.jsonl", sft_rows))
    stats["pref_path"] = str(write_jsonl_atomic(out / "pref.jsonl", pref_rows))
    return stats


def make_preference_data(cfg: PreferenceDataConfig, *, log: Callable[[str], None] = say) -> dict:
    """``stillroom preference-data``: write D_SFT (``<out>/sft.jsonl``) and D_Pref (``<out>/pref.jsonl``) from
    ``stillroom generate``'s export (``cfg.export``, rows with verifier verdicts) or from a generation store and
    its problems (``cfg.store`` + ``cfg.items``, checked by ``cfg.verifier``); returns (and logs) the counts."""
    out = Path(cfg.out)
    if cfg.export is not None:
        stats: dict = {}
        rows = _read_jsonl(cfg.export)
        sft_rows, pref_rows = preference_data_from_export(rows, dedupe=cfg.dedupe, stats=stats)
        stats["sft_path"] = str(write_jsonl_atomic(out / "sft.jsonl", sft_rows))
        stats["pref_path"] = str(write_jsonl_atomic(out / "pref.jsonl", pref_rows))
        if cfg.group_size is not None:  # CoPG's k completions per prompt with their rewards
            groups = copg_groups(judged_from_export(rows, {"records": 0, "error_records": 0}), cfg.group_size, stats)
            stats["groups_path"] = str(write_jsonl_atomic(out / "groups.jsonl", groups))
    else:
        stats = preference_data_from_store(cfg.store, _read_jsonl(cfg.items), cfg.verifier, out,
                                           id_field=cfg.id_field, prompt_field=cfg.prompt_field, dedupe=cfg.dedupe)
    log(json.dumps(stats, indent=2))
    return stats


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows
