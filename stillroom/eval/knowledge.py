"""Knowledge-injection accuracy (``eval.knowledge``): does a model answer fictional facts in the phrasing it was
trained on, in a paraphrase, and as an implication? The suite comes from ``stillroom knowledge-data``
(:mod:`stillroom.datagen.knowledge`) or any JSONL of ``{"kind", "form", "prompt", "answer"}`` items.

A model's answer is its greedy continuation of the item's prompt (plain text, no chat template), cut at the first
newline; it is correct when its first word equals the answer (case and surrounding punctuation ignored). The run
folder gets ``knowledge.json`` (per model, per kind and form: accuracy and count) and ``knowledge.md``; the
report's rows get ``knowledge_<form>`` (new and updated facts pooled) and ``knowledge_known`` (retention).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

from stillroom.eval.metrics import _model_device
from stillroom.files import write_atomic
from stillroom.generate.sampling import left_pad

REQUIRED = ("kind", "form", "prompt", "answer")
INJECTED = ("new", "update")
"""Kinds whose facts a fine-tuning run injects; ``known`` facts measure retention."""


def load_items(path: str | os.PathLike) -> list[dict]:
    """The items of ``path`` (a suite folder's ``eval.jsonl``, or a JSONL file); a bad line names file:line."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "eval.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"eval.knowledge: {file} not found; write a suite with `stillroom knowledge-data OUT` "
                                "and set eval.knowledge to OUT")
    items = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{n}: not JSON ({err.msg})") from None
        missing = [k for k in REQUIRED if not isinstance(item.get(k), str) or not item[k]]
        if missing:
            raise ValueError(f"{file}:{n}: a knowledge item needs non-empty string fields {list(REQUIRED)}; "
                             f"missing or empty: {missing}")
        items.append(item)
    if not items:
        raise ValueError(f"{file}: no knowledge items")
    return items


def _normal(word: str) -> str:
    return re.sub(r"^\W+|\W+$", "", word).lower()


def answer_matches(generated: str, answer: str) -> bool:
    """The first line's first words equal ``answer``'s words (case and surrounding punctuation ignored; an answer
    after a line break does not count: the prompt ends in ``A:``)."""
    want = [_normal(w) for w in answer.split()]
    got = [_normal(w) for w in generated.lstrip(" \t").split("\n", 1)[0].split()][: len(want)]
    return bool(want) and got == want


@torch.no_grad()
def batched_greedy(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                   batch_size: int = 16) -> list[str]:
    """Greedy continuations of plain-text ``prompts`` in left-padded batches (the same text as one prompt at a
    time: :func:`stillroom.eval.generations.greedy_generations`; tested); only the new text, special tokens
    stripped."""
    device = _model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"]
                                  for p in prompts[i : i + batch_size]], pad)
            width = ids.shape[1]
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
            out += [tokenizer.decode(row, skip_special_tokens=True) for row in gen[:, width:].tolist()]
    finally:
        model.train(was_training)
    return out


def knowledge_accuracy(model: torch.nn.Module, tokenizer, items: list[dict], *, max_new_tokens: int = 8,
                       batch_size: int = 16) -> dict[str, dict]:
    """``{"<kind>/<form>": {"accuracy", "n"}}`` over ``items``, plus a few wrong answers per group."""
    answers = batched_greedy(model, tokenizer, [it["prompt"] for it in items], max_new_tokens, batch_size)
    groups: dict[str, list[bool]] = defaultdict(list)
    wrong: dict[str, list[dict]] = defaultdict(list)
    for item, text in zip(items, answers):
        key = f"{item['kind']}/{item['form']}"
        ok = answer_matches(text, item["answer"])
        groups[key].append(ok)
        if not ok and len(wrong[key]) < 3:
            wrong[key].append({"prompt": item["prompt"], "answer": item["answer"], "model": text.strip()})
    return {k: {"accuracy": sum(v) / len(v), "n": len(v), "wrong": wrong.get(k, [])} for k, v in sorted(groups.items())}


def row_metrics(groups: dict[str, dict]) -> dict[str, float]:
    """The report row's scalars: per form, new and updated facts pooled (weighted by count); known retention."""
    out = {}
    for form in sorted({k.split("/", 1)[1] for k in groups}):
        pooled = [g for k, g in groups.items() if k.split("/", 1)[1] == form and k.split("/", 1)[0] in INJECTED]
        if pooled:
            n = sum(g["n"] for g in pooled)
            out[f"knowledge_{form}"] = sum(g["accuracy"] * g["n"] for g in pooled) / n
    if "known/trained" in groups:
        out["knowledge_known"] = groups["known/trained"]["accuracy"]
    return out


def knowledge_report(run_dir: Path, path: str, models: dict[str, torch.nn.Module], tokenizer, *,
                     log: Callable[[str], None] = print) -> dict[str, dict]:
    """Score every model on the suite at ``path``; write ``knowledge.json`` / ``knowledge.md`` into ``run_dir``;
    return each model's row scalars."""
    items = load_items(path)
    results = {name: knowledge_accuracy(model, tokenizer, items) for name, model in models.items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {**_earlier(run_dir / "knowledge.json", str(path)), **results}  # the run evaluates before and after
    write_atomic(run_dir / "knowledge.json", json.dumps({"suite": str(path), "models": results}, indent=2))
    write_atomic(run_dir / "knowledge.md", knowledge_markdown(results, str(path)))
    rows = {name: row_metrics(results[name]) for name in models}
    for name, row in rows.items():
        log(f"knowledge {name}: " + ", ".join(f"{k.removeprefix('knowledge_')} {100 * v:.1f}%" for k, v in row.items()))
    return rows


def _earlier(file: Path, suite: str) -> dict[str, dict]:
    """Models scored earlier in this run folder on the same suite (the teacher and the student before training
    are evaluated before the students after it); another suite's results are dropped."""
    try:
        stored = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return stored.get("models", {}) if stored.get("suite") == suite else {}


def knowledge_markdown(results: dict[str, dict], suite: str) -> str:
    keys = sorted({k for groups in results.values() for k in groups})
    lines = [f"# Knowledge injection ({suite})", "",
             "Accuracy of the greedy answer's first word; kinds: new (facts only in the fine-tuning data), update "
             "(a fact the background stated differently), known (background facts: retention). Forms: trained "
             "(the fine-tuning phrasing), paraphrase (never trained on), implication (needs a second fact).", "",
             "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, groups in results.items():
        cells = [f"{100 * groups[k]['accuracy']:.1f}% (n={groups[k]['n']})" if k in groups else "" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


