"""Self-data distillation (Thangarasa et al. 2025): the rewrite-with-fallback data set.

Recipe (spec section 9): prune the original model by angular distance
(``student.from_teacher.strategy: angular``), let the *unpruned* model rewrite
the targets of a fine-tuning set, keep a rewrite only when its answer matches
the reference (otherwise fall back to the original target), fine-tune the pruned
model on the result (``method: sft``), and optionally SLERP-merge pruned models
recovered on different data sets.

:func:`rewrite_with_fallback` builds the self-distilled data set D~ from any
``complete_fn`` (a local HF model through :func:`stillroom.datagen.complete.hf_complete_fn`
or a remote one), through the resumable :class:`GenerationStore`. The merge step is
:mod:`stillroom.compress.merge` (``stillroom merge A B --t 0.5 --out DIR``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from stillroom.datagen.store import GenerationStore, make_key
from stillroom.datagen.complete import CompleteFn, default_check, generate_with

Verifier = Callable[[str, dict], bool]


# ---------------------------------------------------------------------- rewrites

def rewrite_with_fallback(
    complete_fn: CompleteFn,
    items: Sequence[dict],
    *,
    template: str,
    verifier: Verifier,
    store: GenerationStore,
    teacher_id: str,
    settings: dict,
    batch_size: int = 16,
    target_field: str = "completion",
    id_field: str = "id",
) -> tuple[list[dict], dict]:
    """The self-distilled data set D~ = {(x_i, y~_i)} and counts.

    For each item (a dict with ``id_field``, ``target_field`` = the reference
    response y_i, the fields ``template`` uses, and whatever ``verifier`` reads,
    e.g. ``answer``), the original model's rewrite y~_i = complete_fn(c_t(x_i, y_i))
    is generated (one greedy-or-sampled text per item, stored in ``store`` as it
    arrives, so a rerun resumes). y~_i replaces y_i only if it is a well-formed
    text and ``verifier(y~_i, item)`` is True; otherwise the item keeps y_i.

    Returns ``(records, stats)``. ``records`` are the items in input order with
    ``target_field`` set to the chosen target, plus ``original_<target_field>``
    (y_i) and ``target_source``: ``"rewrite"`` or ``"original"``. ``stats``:
    ``items``, ``rewritten`` (kept rewrites), ``fallback_unverified`` (rewrite
    failed the verifier), ``fallback_malformed`` (empty/erroring generation),
    ``rewrite_rate`` (rewritten / items) and ``generation`` (the stats of
    :func:`~stillroom.datagen.complete.generate_with`).
    """
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get(target_field), str):
            ident = item.get(id_field, "?") if isinstance(item, dict) else "?"
            raise ValueError(
                f"item {i} (id={ident!r}) needs a string {target_field!r} field (the reference response to fall back to)"
            )
    gen_stats = generate_with(
        complete_fn, items, template=template, n_samples=1, batch_size=batch_size, store=store,
        teacher_id=teacher_id, settings=settings, check=default_check, on_error="record", id_field=id_field,
    )
    by_key = {rec["key"]: rec for rec in store.read()}
    records: list[dict] = []
    stats = {"items": len(items), "rewritten": 0, "fallback_unverified": 0, "fallback_malformed": 0}
    for item in items:
        rec = by_key.get(make_key(str(item[id_field]), 0))
        out = dict(item)
        out[f"original_{target_field}"] = item[target_field]
        text = rec.get("text") if rec is not None else None
        if rec is None or "error" in rec or not isinstance(text, str):
            stats["fallback_malformed"] += 1
            out["target_source"] = "original"
        elif verifier(text, item):
            stats["rewritten"] += 1
            out[target_field] = text
            out["target_source"] = "rewrite"
        else:
            stats["fallback_unverified"] += 1
            out["target_source"] = "original"
        records.append(out)
    stats["rewrite_rate"] = stats["rewritten"] / max(1, len(items))
    stats["generation"] = gen_stats
    return records, stats
