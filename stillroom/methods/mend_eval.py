"""MEND's evaluation: the frozen LLM on unseen tasks with no demonstrations, the full demonstrations (in-context
learning) and the distilled vectors, and the LLM input length of each (docs/methods/mend.md).

A record is answered correctly when the LLM's arg-max at every answer position is the answer token (teacher
forcing on the answer: the same as greedy decoding of the answer, token for token). Input length: the positions
the LLM reads up to the end of the sequence (no demonstrations: ``|x|``; full: ``|D| + |x|``; distilled:
``l + |x|``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from stillroom.data.batch import Example, collate
from stillroom.data.errors import BadRecord, DataError
from stillroom.data.formats import TextEncoder
from stillroom.methods.base import MethodContext
from stillroom.methods.mend_data import DEMO_LEN, MendEncoder
from stillroom.models.mend import (
    MendDistiller, gather_positions, llm_width, prefix_logits, save_distiller, split_rows,
)

ARMS = ("no_demonstrations", "full_icl", "distilled")
REPORT = "mend_report.json"


def eval_examples(path: Path, encoder, src, text: TextEncoder, limit: int) -> list[Example]:
    """The first ``limit`` records of the JSONL ``path`` (finetune format) as sequences; a malformed line is an
    error naming ``path:line``."""
    if not path.is_file():
        raise DataError(f"mend.eval_path: {path} does not exist; write the meta-test records there or set it to null")
    out: list[Example] = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
                if not isinstance(fields, dict):
                    raise BadRecord("a record must be a JSON object")
                views = encoder.encode(fields, "prompt_completion", src, text, f"eval:{line_no}")
            except (json.JSONDecodeError, BadRecord) as err:
                raise DataError(f"{path}:{line_no}: {err}; fix the record or drop it") from None
            enc = views.eval
            out.append(Example(enc.input_ids, enc.target, f"mend-eval:{line_no}", meta=dict(enc.meta)))
    if not out:
        raise DataError(f"mend.eval_path: {path} holds no records")
    return out


@torch.no_grad()
def three_arms(llm: torch.nn.Module, distiller: MendDistiller, examples: list[Example], demo_lens: dict[str, int],
               pad_id: int, vocab: int, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Accuracy and mean LLM input positions of each arm (module docstring) over ``examples``."""
    was_training = distiller.training
    distiller.eval()
    device = next(llm.parameters()).device
    hits = {a: 0 for a in ARMS}
    lengths = {a: 0 for a in ARMS}
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id).to(device)
        rows = split_rows(batch.input_ids, batch.attention_mask, batch.target_ids,
                          [demo_lens[u] for u in batch.uids], pad_id)
        full = llm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        empty = full.new_zeros(rows.x_ids.shape[0], 0, llm_width(llm))
        dist_device = distiller.summary.device
        summary = distiller(rows.demo_ids.to(dist_device), rows.demo_mask.to(dist_device)).to(device)
        arms = {"no_demonstrations": prefix_logits(llm, empty, rows.x_ids, rows.x_mask, vocab),
                "full_icl": gather_positions(full[..., :vocab], rows.full_index),
                "distilled": prefix_logits(llm, summary, rows.x_ids, rows.x_mask, vocab)}
        answer = rows.x_targets != -100
        x_len = rows.x_mask.sum(dim=1)
        prefix = {"no_demonstrations": torch.zeros_like(x_len), "full_icl": batch.attention_mask.sum(dim=1) - x_len,
                  "distilled": torch.full_like(x_len, distiller.summary_len)}
        for arm, logits in arms.items():
            wrong = (logits.argmax(-1) != rows.x_targets) & answer
            hits[arm] += int((~wrong.any(dim=1)).sum())
            lengths[arm] += int((prefix[arm] + x_len).sum())
    distiller.train(was_training)
    n = max(len(examples), 1)
    return {a: {"accuracy": hits[a] / n, "input_positions": lengths[a] / n, "records": len(examples)} for a in ARMS}


def write_report(ctx: MethodContext, distiller: MendDistiller, demo_lens: dict[str, int], run_dir: Path) -> dict:
    """Save the distiller into ``run_dir/distiller``; measure the three arms on ``mend.eval_path`` (or the held-out
    split) and write ``mend_report.json`` / ``mend_report.md`` (atomically); returns the results."""
    cfg, mc = ctx.cfg, ctx.cfg.mend
    save_distiller(distiller, run_dir / "distiller")
    if mc.eval_path is not None:
        text = TextEncoder(ctx.tokenizer, cfg.data.add_eos)
        src = cfg.data.sources[0]
        finetune = MendEncoder("finetune", mc.demos_field, mc.demo_separator, mc.pretrain_split)
        examples = eval_examples(Path(mc.eval_path), finetune, src, text, mc.eval_max)
        lens = {e.uid: int(e.meta[DEMO_LEN]) for e in examples}
        where = mc.eval_path
    else:
        examples, lens, where = ctx.data.heldout[: mc.eval_max], demo_lens, "the held-out split"
    if not examples:
        ctx.log("mend: no evaluation records (no held-out split and no mend.eval_path); the three arms are skipped")
        return {}
    results = three_arms(ctx.teacher_model, distiller, examples, lens, ctx.tokenizer.pad_token_id, ctx.vocab_size,
                         batch_size=max(cfg.train.micro_batch_size, 8))
    payload = {"evaluated_on": where, "stage": mc.stage, "summary_len": mc.summary_len, "arms": results}
    _atomic(run_dir / REPORT, json.dumps(payload, indent=2))
    _atomic(run_dir / "mend_report.md", markdown(payload))
    for arm, r in results.items():
        ctx.log(f"mend: {arm}: accuracy {r['accuracy']:.3f}, LLM input {r['input_positions']:.1f} positions")
    return payload


def markdown(payload: dict) -> str:
    lines = [f"# MEND: the frozen LLM on {payload['evaluated_on']} ({payload['stage']} stage)", "",
             "| arm | accuracy | LLM input positions |", "|---|---|---|"]
    for arm, r in payload["arms"].items():
        lines.append(f"| {arm} | {r['accuracy']:.3f} | {r['input_positions']:.1f} |")
    return "\n".join(lines) + "\n"


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
