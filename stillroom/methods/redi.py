"""REDI, reinforcement distillation (Xu et al. 2025): learn from correct *and* incorrect teacher traces.

Stage 1 is plain SFT on the correct traces (``method: sft`` on prompt/completion records,
recipe ``redi_sft``). Stage 2 (``method: redi``, this module) optimises, per pair
``(x, y_w, y_l)`` of a correct and an incorrect trace of the same problem,

    L = - log pi(y_w | x) / |y_w|  +  alpha * log pi(y_l | x) / |y_l|

averaged over the pairs of the optimizer step. ``log pi(y | x)`` sums the response tokens'
log-probabilities (fp32), ``|y|`` is the number of response tokens (>= 1; the EOS appended by
``data.add_eos`` is a response token), prompt tokens are masked, and there is no reference model.
``alpha = 1`` is the symmetric objective, ``alpha = 0`` is SFT on the positives.

How it runs in the one training loop (no loss of its own): the ``ce`` term's per-token value is
``l = -log p``; the loop divides the step's sum by ``N``, the number of target tokens of the step
(all micro-batches, all processes). With ``P`` pairs in the step, every chosen token gets weight
``N / (P * |y_w|)`` and every rejected token ``-alpha * N / (P * |y_l|)`` (``Batch.target_weight``),
so ``sum(w * l) / N`` is exactly the mean of ``L`` over the step's pairs. ``P`` and ``N`` are
summed over processes. The logged ``loss`` is therefore the REDI objective (it can be negative).

Data: ``data.sources`` are files of ``{prompt, chosen, rejected}`` records. The prompt and chosen
fields are the source's ``prompt_field`` and ``completion_field`` (set ``completion_field: chosen``),
so the data pipeline's held-out split and evaluation see ``prompt + chosen``; the rejected field is
``redi.rejected_field``. Held-out records (same hash rule as the pipeline) are not trained on. A pair
with either sequence longer than ``data.seq_len`` is dropped (truncation would change ``|y|``) and
counted. :class:`PairSampler` keeps the two sequences of a pair in the same micro-batch
(``train.micro_batch_size`` counts sequences and must be even).

Monitoring (``redi.monitor_every``): the spec says a simultaneous sharp fall of the chosen and
rejected log-probs signals collapse. Every ``monitor_every`` steps a no-grad forward pass over the
step's micro-batches (before the step's update) measures the mean length-normalised log-probs of the
chosen and rejected traces: ``redi/logp_chosen``, ``redi/logp_rejected`` and ``redi/margin``. Cost:
one extra forward pass on those steps (about a third of a training step). ``log_state`` reports the
latest measurement and the step it was taken at (``redi/monitor_step``).

:func:`build_preference_data` turns teacher generations (``stillroom generate``'s store records,
several samples per prompt) and a verifier into D_SFT (every correct trace) and D_Pref (one correct
and one incorrect trace per problem that has both).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from stillroom.config.schema import RunConfig
from stillroom.data.batch import Batch, Example
from stillroom.data.errors import BadRecord, BadRecordPolicy, DataError
from stillroom.data.formats import TextEncoder, encode_record
from stillroom.data.jsonl import write_jsonl_atomic
from stillroom.eval.metrics import row_nll
from stillroom.data.pipeline import good_records, is_heldout, record_key, source_tags
from stillroom.data.readers import describe
from stillroom.data.sampler import ExampleSampler

CHOSEN, REJECTED = "chosen", "rejected"


# ---------------------------------------------------------------------------------- checks
def check_redi_run(cfg: RunConfig, term_names: Sequence[str], term_weights: Sequence[float] = ()) -> None:
    """Refuse what REDI cannot do, before step 0 (errors name the key to change)."""
    if list(term_names) != ["ce"]:
        raise ValueError(
            "method=redi applies signed, length-normalised weights to cross-entropy and needs loss.terms to be "
            f"exactly one 'ce' term; loss.terms are {list(term_names)}. Set loss.terms: [{{name: ce}}]"
        )
    if any(w != 1.0 for w in term_weights):
        raise ValueError(f"method=redi: the 'ce' term's weight must be 1 (got {list(term_weights)}); "
                         "scale the update with train.lr instead")
    mbs = cfg.train.micro_batch_size
    if mbs % 2:
        raise ValueError(f"method=redi: train.micro_batch_size={mbs} counts sequences and must be even "
                         "(each pair puts its chosen and its rejected trace in the same micro-batch)")


# ---------------------------------------------------------------------------------- data
def _target_bytes(tokenizer: Any, ids: list[int], target: list[bool]) -> int:
    learned = [i for t, i in enumerate(ids) if t >= 1 and target[t]]
    return len(tokenizer.decode(learned, skip_special_tokens=True).encode("utf-8"))


def load_pairs(cfg: RunConfig, tokenizer: Any, *, log: Callable[[str], None] = print) -> tuple[list[Example], dict]:
    """The training pairs of ``cfg.data.sources`` as ``[chosen_0, rejected_0, chosen_1, rejected_1, ...]``.

    Every example's uid is ``<source>:<record index>|chosen`` or ``|rejected``; only response tokens
    (completion + EOS) are targets. Returns ``(examples, stats)`` with counts of pairs read, held out,
    dropped as too long, and bad records (``data.on_bad_record`` applies).
    """
    dc = cfg.data
    rejected_field = cfg.redi.rejected_field
    enc = TextEncoder(tokenizer, dc.add_eos)
    stats = {"records_read": 0, "pairs": 0, "heldout_records": 0, "dropped_too_long": 0, "dropped_no_targets": 0,
             "records_bad": 0}
    examples: list[Example] = []
    for i, (src, tag) in enumerate(zip(dc.sources, source_tags(dc.sources))):
        label = describe(src).label
        if src.format not in (None, "prompt_completion"):
            raise DataError(f"data.sources[{i}] ({label}): method=redi reads prompt/chosen/rejected records, "
                            f"but format is {src.format!r}; set format: prompt_completion (or leave it unset)")
        rejected_src = src.model_copy(update={"completion_field": rejected_field})
        policy = BadRecordPolicy(dc.on_bad_record)
        for item in good_records(src, cfg.seed, policy, stats):
            if is_heldout(record_key(tag, item.index, item.fields), dc.heldout_fraction):
                stats["heldout_records"] += 1
                continue
            try:
                if src.completion_field not in item.fields:
                    raise BadRecord(f"missing the chosen trace field {src.completion_field!r} (fields: "
                                    f"{sorted(item.fields)}); set data.sources[{i}].completion_field")
                if rejected_field not in item.fields:
                    raise BadRecord(f"missing the rejected trace field {rejected_field!r} (fields: "
                                    f"{sorted(item.fields)}); set redi.rejected_field")
                chosen = encode_record(item.fields, "prompt_completion", src, enc)
                rejected = encode_record(item.fields, "prompt_completion", rejected_src, enc)
            except BadRecord as bad:
                policy(bad.at(item.where))
                continue
            if chosen is None or rejected is None or not any(chosen.target[1:]) or not any(rejected.target[1:]):
                stats["dropped_no_targets"] += 1
                continue
            if max(len(chosen.input_ids), len(rejected.input_ids)) > dc.seq_len:
                stats["dropped_too_long"] += 1
                continue
            base = f"{tag}:{item.index}"
            for role, e in ((CHOSEN, chosen), (REJECTED, rejected)):
                examples.append(Example(
                    input_ids=list(e.input_ids), target=list(e.target), uid=f"{base}|{role}", domain=src.domain,
                    n_bytes=_target_bytes(tokenizer, e.input_ids, e.target),
                    meta={"source": tag, "record": item.index, "role": role},
                ))
            stats["pairs"] += 1
        stats["records_bad"] += policy.count
    if not examples:
        raise DataError(f"method=redi: no training pairs in data.sources ({stats}); check the field names "
                        f"(prompt_field, completion_field for the chosen trace, redi.rejected_field), "
                        f"data.seq_len={dc.seq_len} and data.heldout_fraction")
    if stats["dropped_too_long"]:
        log(f"redi: dropped {stats['dropped_too_long']} pairs longer than data.seq_len={dc.seq_len} "
            "(raise data.seq_len to keep them)")
    return examples, stats


# ---------------------------------------------------------------------------------- sampler
class PairSampler:
    """Micro-batches of whole pairs: indices ``2i, 2i + 1`` (chosen, rejected) of each drawn pair ``i``.

    Called like :class:`ExampleSampler` with ``n`` sequences and ``batch_size`` sequences per
    micro-batch; draws ``batch_size / 2`` of the ``n / 2`` pairs with an :class:`ExampleSampler`
    (same epochs, shuffling, rank split and resumable ``state_dict``).
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if n % 2:
            raise ValueError(f"PairSampler: {n} sequences is not a whole number of (chosen, rejected) pairs")
        if batch_size % 2:
            raise ValueError(f"method=redi: train.micro_batch_size={batch_size} counts sequences and must be even")
        self.pairs = ExampleSampler(n // 2, batch_size // 2, seed, shuffle=shuffle, rank=rank, world_size=world_size)

    def next_indices(self) -> list[int]:
        return [j for i in self.pairs.next_indices() for j in (2 * i, 2 * i + 1)]

    def state_dict(self) -> dict:
        return {"pairs": self.pairs.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pairs.load_state_dict(state["pairs"])


# ---------------------------------------------------------------------------------- weights
def pair_rows(batch: Batch) -> int:
    """Number of pairs in ``batch``; checks that rows ``2j, 2j + 1`` are the chosen and rejected of one pair."""
    uids = batch.uids
    if len(uids) % 2:
        raise ValueError(f"redi: a micro-batch of {len(uids)} rows is not made of whole pairs")
    for j in range(0, len(uids), 2):
        c, r = uids[j], uids[j + 1]
        if not (c.endswith("|" + CHOSEN) and r.endswith("|" + REJECTED)
                and c[: -len(CHOSEN)] == r[: -len(REJECTED)]):
            raise ValueError(f"redi: rows {j} and {j + 1} ({c!r}, {r!r}) are not the chosen and rejected "
                             "trace of one pair; REDI batches must come from PairSampler")
    return len(uids) // 2


def redi_weights(batch: Batch, *, alpha: float, global_pairs: float, global_targets: float) -> torch.Tensor:
    """``[B, T]`` float32 weights: ``N / (P |y_w|)`` on chosen tokens, ``-alpha N / (P |y_l|)`` on rejected ones.

    ``N`` = ``global_targets`` (target tokens of the whole step), ``P`` = ``global_pairs``; ``|y|`` is
    the row's number of target tokens (>= 1). Zero where nothing is learned.
    """
    pair_rows(batch)
    mask_bt = batch.loss_mask
    lengths_b = mask_bt.sum(dim=1).clamp(min=1).to(torch.float32)
    sign_b = torch.ones_like(lengths_b)
    sign_b[1::2] = -alpha
    scale_b = sign_b * (float(global_targets) / float(global_pairs)) / lengths_b
    return scale_b[:, None] * mask_bt.to(torch.float32)


def normalised_logps(model: torch.nn.Module, batch: Batch, *, precision: str = "fp32") -> torch.Tensor:
    """``[B]`` float32: ``log pi(y | x) / |y|`` of each row (response tokens only, log-softmax in fp32)."""
    nll_b, count_b = row_nll(model, batch, precision=precision)
    return (-nll_b / count_b.clamp(min=1)).float()


class RediBatches:
    """``prepare_batches(micro, step)``: sets ``target_weight`` of every micro-batch (module docstring)."""

    def __init__(self, *, alpha: float, model: torch.nn.Module, topology: Any, monitor_every: int,
                 precision: str = "fp32") -> None:
        self.alpha = float(alpha)
        self.model = model
        self.topology = topology
        self.monitor_every = int(monitor_every)
        self.precision = precision
        self.state: dict[str, float] = {}

    def __call__(self, micro: list[Batch], step: int) -> list[Batch]:
        local_pairs = sum(pair_rows(b) for b in micro)
        local_targets = sum(b.num_targets for b in micro)
        global_pairs = self.topology.all_reduce_sum(local_pairs)
        global_targets = self.topology.all_reduce_sum(local_targets)
        for b in micro:
            b.target_weight = redi_weights(b, alpha=self.alpha, global_pairs=global_pairs,
                                           global_targets=global_targets)
        len_c = sum(float(b.loss_mask[0::2].sum()) for b in micro)
        len_r = sum(float(b.loss_mask[1::2].sum()) for b in micro)
        self.state.update({
            "redi/pairs": global_pairs,
            "redi/len_chosen": self.topology.all_reduce_sum(len_c) / global_pairs,
            "redi/len_rejected": self.topology.all_reduce_sum(len_r) / global_pairs,
        })
        if self.monitor_every and step % self.monitor_every == 0:
            self._monitor(micro, step, global_pairs)
        return micro

    def _monitor(self, micro: list[Batch], step: int, global_pairs: float) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            sums = torch.zeros(2, dtype=torch.float64)
            for b in micro:
                lp_b = normalised_logps(self.model, b, precision=self.precision).double()
                sums += torch.stack([lp_b[0::2].sum(), lp_b[1::2].sum()])
        finally:
            self.model.train(was_training)
        chosen = self.topology.all_reduce_sum(float(sums[0])) / global_pairs
        rejected = self.topology.all_reduce_sum(float(sums[1])) / global_pairs
        self.state.update({
            "redi/logp_chosen": chosen, "redi/logp_rejected": rejected, "redi/margin": chosen - rejected,
            "redi/objective_before_step": -chosen + self.alpha * rejected, "redi/monitor_step": float(step),
        })

    def log_state(self) -> dict[str, float]:
        return dict(self.state)


def build_hooks(p: Any, model: torch.nn.Module, *, mix: Any, run_dir: Path, log: Callable[[str], None] = print):
    """``method: redi``: pairs from ``data.sources``, pair-preserving sampler, signed length-normalised CE weights."""
    from stillroom.methods.hooks import MethodHooks

    cfg = p.cfg
    terms = mix.cfg.terms
    check_redi_run(cfg, [t.name for t in terms], [t.weight for t in terms])
    examples, stats = load_pairs(cfg, p.tokenizer, log=log)
    rc = cfg.redi
    log(f"redi: {stats['pairs']} training pairs (held out {stats['heldout_records']}, too long "
        f"{stats['dropped_too_long']}, bad {stats['records_bad']}); alpha={rc.alpha}, "
        f"monitor_every={rc.monitor_every}")
    if stats["pairs"] < (cfg.train.micro_batch_size // 2) * p.topology.world_size:
        raise ValueError(f"method=redi: {stats['pairs']} pairs cannot fill one micro-batch of "
                         f"{cfg.train.micro_batch_size // 2} pairs x {p.topology.world_size} processes; "
                         "lower train.micro_batch_size or add pairs")
    prepare = RediBatches(alpha=rc.alpha, model=model, topology=p.topology, monitor_every=rc.monitor_every,
                          precision=cfg.train.precision)
    return MethodHooks(train_examples=examples, sampler_factory=PairSampler, prepare_batches=prepare,
                       log_state=prepare.log_state)


# ---------------------------------------------------------------------------------- D_SFT / D_Pref
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
    bool`` or a spec for :func:`stillroom.methods.verifiers.load_verifier` (``"numeric"``, ...).

    Returns ``(sft_rows, pref_rows)``: ``sft_rows`` = every correct trace ``{id, prompt, completion,
    sample_index}`` (identical texts of one problem kept once when ``dedupe``); ``pref_rows`` = per
    problem with both, ``{id, prompt, chosen, rejected, chosen_index, rejected_index}`` where chosen is
    its correct sample and rejected its incorrect sample with the lowest ``sample_index`` each (the
    paper's teacher sampled until the first correct trace). Rows follow the order of ``items``.
    ``stats`` (a dict), when given, receives the counts.
    """
    if isinstance(verifier, str):
        from stillroom.methods.verifiers import load_verifier

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
    judged: dict[str, tuple[str, list[tuple[int, str, bool]]]] = {}
    counts = {"records": 0, "error_records": 0}
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
    return _select(judged, counts, dedupe=dedupe, stats=stats)


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
    from stillroom.methods.genstore import GenerationStore

    with GenerationStore(store_path, read_only=True) as store:
        records = store.read()
    stats: dict = {}
    sft_rows, pref_rows = build_preference_data(records, items, verifier, stats=stats, **kwargs)
    out = Path(out_dir)
    stats["sft_path"] = str(write_jsonl_atomic(out / "sft.jsonl", sft_rows))
    stats["pref_path"] = str(write_jsonl_atomic(out / "pref.jsonl", pref_rows))
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Write D_SFT (sft.jsonl) and D_Pref (pref.jsonl) into --out, from ``stillroom generate``'s export
    (``--export``, rows with verifier verdicts) or from a generation store and its problems (``--store`` +
    ``--items``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m stillroom.methods.redi", description=main.__doc__)
    ap.add_argument("--export", help="`stillroom generate` export (prompt_completion, keep: all, with a verifier)")
    ap.add_argument("--store", help="generation store (JSONL) written by `stillroom generate`")
    ap.add_argument("--items", help="JSONL of the problems the store's generations answer (id, prompt, answer)")
    ap.add_argument("--out", required=True, help="folder for sft.jsonl (D_SFT) and pref.jsonl (D_Pref)")
    ap.add_argument("--verifier", default="numeric", help="with --store: numeric, string or package.module:function")
    ap.add_argument("--id-field", default="id")
    ap.add_argument("--prompt-field", default="prompt")
    args = ap.parse_args(argv)
    if bool(args.export) == bool(args.store) or bool(args.store) != bool(args.items):
        ap.error("give --export, or --store with --items")
    if args.export:
        stats: dict = {}
        sft_rows, pref_rows = preference_data_from_export(_read_jsonl(args.export), stats=stats)
        stats["sft_path"] = str(write_jsonl_atomic(Path(args.out) / "sft.jsonl", sft_rows))
        stats["pref_path"] = str(write_jsonl_atomic(Path(args.out) / "pref.jsonl", pref_rows))
    else:
        stats = preference_data_from_store(args.store, _read_jsonl(args.items), args.verifier, args.out,
                                           id_field=args.id_field, prompt_field=args.prompt_field)
    print(json.dumps(stats, indent=2))
    return 0


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
