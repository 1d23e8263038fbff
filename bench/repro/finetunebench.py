"""FineTuneBench at CPU scale (Wu, Wu and Zou 2024; spec vision-generative-methods.md section 15): does fine-tuning
inject new knowledge a model can use beyond the phrasing it was trained on?

Suite: ``stillroom knowledge-data`` (seed = the run's seed): fictional people (birth city, profession) and companies
(headquarters). A base model is pretrained on the suite's background text (world facts; 60 known people asked in
every question form; the companies' old headquarters), then fine-tuned through ``stillroom run`` (method sft) on
the new people and the moved headquarters:

* A: one phrasing per fact (``train.jsonl``);
* B: two phrasings per fact (``train_augmented.jsonl``; the same steps), FineTuneBench's suggested mitigation.

Both are scored by ``eval.knowledge`` (greedy first word): the trained phrasing, a paraphrase neither saw, and an
implication that needs a background fact (the country of the city, the workplace of the profession); known facts
measure retention.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bench.repro.common import SPECIALS, fmt, markdown_table, mean_std, run_stillroom, save_model, tiny_llama
from bench.repro.verdict import beyond_spread, verdict_fields
from stillroom.config.knowledge import KnowledgeDataConfig
from stillroom.datagen.knowledge import write_knowledge_suite

CLAIM = ("Fine-tuning injects new facts in the phrasing it was trained on but generalises poorly to paraphrases and "
         "to implications (FineTuneBench: about 37% for new knowledge); updates of facts the model already knew "
         "generalise even worse (about 19%).")
SEQ_LEN = 64
ARMS = {"A: one phrasing": "train.jsonl", "B: two phrasings": "train_augmented.jsonl"}


def settings(quick: bool) -> dict:
    if quick:
        return dict(pretrain_steps=40, steps=10, batch=4, heldout=0.2, new_people=6, known_people=8, companies=4)
    return dict(pretrain_steps=2500, steps=200, batch=16, heldout=0.05, new_people=40, known_people=60, companies=30)


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate([*SPECIALS, *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pretrain(model, tok, texts: list[str], *, steps: int, seed: int):
    """CE on packed background text (EOS between records), AdamW 3e-3, warm-up 50 then cosine, batches of 32."""
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // SEQ_LEN
    data = torch.tensor(ids[: n * SEQ_LEN]).view(n, SEQ_LEN)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(0, n, (32,), generator=g)]
        model(input_ids=rows, labels=rows).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def one_seed(seed: int, work: Path, s: dict) -> dict:
    root = work / f"seed{seed}"
    suite = write_knowledge_suite(KnowledgeDataConfig(
        out=str(root / "suite"), seed=seed, new_people=s["new_people"], known_people=s["known_people"],
        companies=s["companies"]), log=lambda _m: None)
    texts = [r["text"] for r in _rows(suite / "background.jsonl")]
    tuned = [r["prompt"] + r["completion"] for r in _rows(suite / "train_augmented.jsonl")]
    tok = word_tokenizer(texts + tuned + [r["prompt"] + " " + r["answer"] for r in _rows(suite / "eval.jsonl")])
    t0 = time.perf_counter()
    base = pretrain(tiny_llama(len(tok), layers=4, hidden=128, seed=seed, eos_id=tok.eos_token_id,
                               pad_id=tok.pad_token_id), tok, texts, steps=s["pretrain_steps"], seed=seed)
    base_dir = save_model(base, tok, root / "base")
    out = {"pretrain_s": round(time.perf_counter() - t0, 1), "arms": {}}
    for arm, file in ARMS.items():
        config = {
            "name": file.removesuffix(".jsonl"), "output_dir": str(root / "runs"), "seed": seed, "method": "sft",
            "teacher": {"model": {"path": str(base_dir)}, "dtype": "float32"},
            "student": {"model": {"path": str(base_dir)}},
            "data": {"sources": [{"path": str(suite / file)}], "seq_len": SEQ_LEN, "heldout_fraction": s["heldout"],
                     "heldout_max": 8},
            "loss": {"terms": [{"name": "ce"}]},
            "train": {"steps": s["steps"], "micro_batch_size": s["batch"], "lr": 1e-3, "warmup_steps": 10,
                      "precision": "fp32", "threads": 1, "keep_checkpoints": 1},
            "eval": {"knowledge": str(suite), "generations": 0, "heldout_sequences": 8, "batch_size": 8,
                     "speed_tokens": 16, "before": True},
        }
        run_dir = run_stillroom(config)
        scored = json.loads((run_dir / "knowledge.json").read_text())["models"]
        acc = lambda name: {k: g["accuracy"] for k, g in scored[name].items()}  # noqa: E731
        out["arms"][arm] = {"after": acc("student_after"), "before": acc("student_before")}
    return out


def main(seeds: list[int], work: Path, quick: bool) -> dict:
    torch.set_num_threads(1)
    s = settings(quick)
    return summarize({seed: one_seed(seed, work, s) for seed in seeds}, s)


def resummarize(stored: dict) -> dict:
    return summarize({int(k): v for k, v in stored["per_seed"].items()}, settings(bool(stored.get("quick"))))


GROUPS = ("new/trained", "new/paraphrase", "new/implication", "update/trained", "update/paraphrase",
          "update/implication", "known/trained")


def summarize(per_seed: dict, s: dict) -> dict:
    seeds = sorted(per_seed)
    a, b = ARMS
    col = lambda arm, when, key: [per_seed[k]["arms"][arm][when][key] for k in seeds]  # noqa: E731
    pct = lambda xs: fmt([100 * x for x in xs], 1)  # noqa: E731
    rows = [["base (before fine-tuning)", *[pct(col(a, "before", g)) for g in GROUPS]]]
    rows += [[arm, *[pct(col(arm, "after", g)) for g in GROUPS]] for arm in ARMS]
    table = markdown_table(["model", *[g.replace("/", ", ") + " (%)" for g in GROUPS]], rows)
    diff = lambda x, y: [p - q for p, q in zip(x, y)]  # noqa: E731
    parts = [
        beyond_spread("A: new facts, trained phrasing - paraphrase", diff(col(a, "after", "new/trained"),
                                                                          col(a, "after", "new/paraphrase"))),
        beyond_spread("A: new facts, trained phrasing - implication", diff(col(a, "after", "new/trained"),
                                                                           col(a, "after", "new/implication"))),
        beyond_spread("A: paraphrase accuracy, new - updated facts", diff(col(a, "after", "new/paraphrase"),
                                                                          col(a, "after", "update/paraphrase"))),
    ]
    verdict = verdict_fields(parts)
    m = lambda arm, when, g: 100 * mean_std(col(arm, when, g))[0]  # noqa: E731
    analysis = (
        f"After fine-tuning on one phrasing (A), new facts are answered {m(a, 'after', 'new/trained'):.1f}% of the "
        f"time in that phrasing, {m(a, 'after', 'new/paraphrase'):.1f}% in a paraphrase and "
        f"{m(a, 'after', 'new/implication'):.1f}% as an implication (the base model: "
        f"{m(a, 'before', 'new/trained'):.1f}%, {m(a, 'before', 'new/paraphrase'):.1f}%, "
        f"{m(a, 'before', 'new/implication'):.1f}%). Updated headquarters: {m(a, 'after', 'update/trained'):.1f}% "
        f"trained, {m(a, 'after', 'update/paraphrase'):.1f}% paraphrased, {m(a, 'after', 'update/implication'):.1f}% "
        f"implied (before: {m(a, 'before', 'update/paraphrase'):.1f}% on the paraphrase, which then still names the "
        f"new city only by chance). Retention of background facts: {m(a, 'before', 'known/trained'):.1f}% before, "
        f"{m(a, 'after', 'known/trained'):.1f}% after A, {m(b, 'after', 'known/trained'):.1f}% after B. Two phrasings "
        f"(B) give {m(b, 'after', 'new/paraphrase'):.1f}% on the unseen paraphrase and "
        f"{m(b, 'after', 'update/paraphrase'):.1f}% on updated facts' paraphrase (A: "
        f"{m(a, 'after', 'new/paraphrase'):.1f}%, {m(a, 'after', 'update/paraphrase'):.1f}%). "
        + ("Every part held beyond the seed spread." if verdict["held"] else
           "Not every part held beyond the seed spread; see the parts.")
    )
    setting = (
        f"`stillroom knowledge-data` suites (seed = run seed): {s['new_people']} new people (2 facts each), "
        f"{s['companies']} moved headquarters, {s['known_people']} known people in the background; word-level "
        f"tokenizer; base: 4-layer Llama d 128 pretrained on the background text for {s['pretrain_steps']} steps of "
        f"32x{SEQ_LEN} tokens (AdamW 3e-3, cosine); fine-tuning through `stillroom run` (method sft, ce on the "
        f"completion) for {s['steps']} steps of {s['batch']} records, lr 1e-3, scored by eval.knowledge (greedy first word). "
        f"The run's held-out split ({100 * s['heldout']:.0f}% of the records, by hash) is not trained on; its facts "
        "still count in the trained-phrasing accuracy, which caps it slightly below 100%."
    )
    return {"claim": CLAIM, "setting": setting, "table_md": table, **verdict, "analysis": analysis,
            "per_seed": {str(k): v for k, v in per_seed.items()}}
