"""Self-data distillation (spec section 9, Appendix B item 9) at CPU scale.

Per seed:
1. The "original" model: a 5-layer char-level Llama (d=64) trained with a hand-written loop on
   English prose (pydoc topics) plus task A (26 facts "Q: next c = d.") and half of the 26 facts of
   task B ("Q: prev d = c."), in the model's own short answer style, so it half-solves B.
2. Pruning: drop 2 layers. Prose held-out loss right after pruning: angular block
   (the product's ``derive_student``, calibrated on prose) vs the last 2 layers.
3. Recovery on task B with stillroom's own `run` (method sft, student derived from the
   original by angular pruning, CE on completions), on (a) the data set's references, written in
   another style ("The letter before d is c! The answer is c."), vs (b) the same set rewritten by
   the unpruned model (``rewrite_with_fallback``: greedy answer, kept when it matches the
   reference answer, else the reference).
4. Merge: a pruned copy recovered the same way (b) on task A, SLERP-merged (t=0.5) with the
   task-B one by ``merge_model_folders``; scored on A, B and prose.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from bench.repro.common import char_tokenizer, fmt, greedy_complete, markdown_table, mean_std, run_stillroom, \
    save_model, tiny_llama, write_jsonl
from bench.repro.verdict import beyond_spread, paired, verdict_fields

LAYERS, HIDDEN, PRUNE = 5, 64, 2
PRETRAIN_STEPS, RECOVER_STEPS, RECOVER_LR, COPIES = 350, 80, 1e-3, 3
GEN_LEN = 64  # characters per prose training sequence


def _prose() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    docs = [" ".join(v.split()) for _, v in sorted(topics.items())]
    random.Random(0).shuffle(docs)
    return docs[20:], docs[:20]  # train, held-out documents


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _problems(task: str) -> list[dict]:
    """The 26 facts of a task: next (task A) or previous (task B) letter of the alphabet, cyclic."""
    step = 1 if task == "next" else -1
    return [{"id": f"{task}-{c}", "letter": c, "answer": LETTERS[(i + step) % 26], "task": task,
             "prompt": f"Q: {task} {c} ="} for i, c in enumerate(LETTERS)]


def own_style(item: dict) -> str:
    """How the original model answers (its pretraining format)."""
    return f" {item['answer']}."


def reference_style(item: dict) -> str:
    """How the recovery data set's references are written (another author's style)."""
    where = "after" if item["task"] == "next" else "before"
    return f" The letter {where} {item['letter']} is {item['answer']}! The answer is {item['answer']}."


def _encode_rows(tok, texts: list[str], width: int) -> torch.Tensor:
    ids = torch.full((len(texts), width), tok.pad_token_id, dtype=torch.long)
    for i, t in enumerate(texts):
        row = tok(t, add_special_tokens=False)["input_ids"][: width - 1] + [tok.eos_token_id]
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def pretrain(tok, prose: list[str], task_a: list[dict], task_b: list[dict], *, seed: int, steps: int):
    """The original model: prose LM + task A + a little task B (own style), plain CE, hand loop."""
    model = tiny_llama(len(tok), layers=LAYERS, hidden=HIDDEN, seed=seed, eos_id=tok.eos_token_id,
                       pad_id=tok.pad_token_id)
    stream = tok(" ".join(prose), add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * max(0.1, 1 - s / steps))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - GEN_LEN - 1, (4,), generator=g).tolist()
        prose_bt = torch.tensor([stream[s: s + GEN_LEN] for s in starts])
        tasks = [rng.choice(task_a) for _ in range(24)] + [rng.choice(task_b) for _ in range(8)]
        task_bt = _encode_rows(tok, [t["prompt"] + own_style(t) for t in tasks], 16)
        loss = model(input_ids=prose_bt, labels=prose_bt).loss
        labels = task_bt.masked_fill(task_bt == tok.pad_token_id, -100)
        loss = loss + model(input_ids=task_bt, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    return model.eval()


@torch.no_grad()
def prose_ce(model, tok, heldout: list[str], n: int = 48) -> float:
    stream = tok(" ".join(heldout), add_special_tokens=False)["input_ids"]
    rows = torch.tensor([stream[i * GEN_LEN:(i + 1) * GEN_LEN] for i in range(n)])
    model.eval()
    return float(model(input_ids=rows, labels=rows).loss)


def accuracy(model, tok, items: list[dict]) -> float:
    from stillroom.datagen.verifiers import string_match

    outs = greedy_complete(model, tok, [it["prompt"] for it in items], max_new_tokens=64)  # references are ~45 chars
    return sum(string_match(o.split("\n")[0], it["answer"]) for it, o in zip(items, outs)) / len(items)


def make_rewrites(model, tok, items: list[dict], store_path: Path) -> tuple[list[dict], dict]:
    from stillroom.datagen.store import GenerationStore
    from stillroom.datagen.self_data import rewrite_with_fallback
    from stillroom.datagen.complete import hf_complete_fn
    from stillroom.datagen.verifiers import load_verifier

    base = hf_complete_fn(model, tok, sampling_temperature=0.0, top_p=1.0, max_new_tokens=40, seed=0,
                          use_chat_template=False)

    def complete(prompts, n):  # the model answers on one line; drop what follows it
        return [[s.split("\n")[0] for s in samples] for samples in base(prompts, n)]

    with GenerationStore(store_path) as store:
        return rewrite_with_fallback(complete, items, template="{prompt}", verifier=load_verifier("string"),
                                     store=store, teacher_id="original", settings={"greedy": True}, batch_size=64)


def recover(original_dir: Path, data: Path, out: Path, *, seed: int, steps: int) -> Path:
    """stillroom run: method sft, student = original pruned to LAYERS-PRUNE layers by angular distance."""
    cfg = {
        "name": out.name, "output_dir": str(out.parent), "seed": seed, "method": "sft",
        "teacher": {"model": {"path": str(original_dir)}, "dtype": "float32"},
        "student": {"from_teacher": {"strategy": "angular", "num_layers": LAYERS - PRUNE, "calibration_batches": 4}},
        "data": {"sources": [{"path": str(data), "format": "prompt_completion"}], "seq_len": 64,
                 "heldout_fraction": 0.05, "heldout_max": 8},
        "loss": {"terms": [{"name": "ce"}]},
        "train": {"steps": steps, "micro_batch_size": 16, "lr": RECOVER_LR, "warmup_steps": 5, "precision": "fp32",
                  "device": "cpu", "keep_checkpoints": 1, "log_every": 50},
        "eval": {"heldout_sequences": 8, "generations": 0, "before": False, "speed_tokens": 16, "max_new_tokens": 8},
    }
    return run_stillroom(cfg) / "student"


def one_seed(seed: int, work: Path, quick: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from stillroom.config.schema import LayerSelection
    from stillroom.compress.merge import merge_model_folders
    from stillroom.models import derive_student

    work.mkdir(parents=True, exist_ok=True)
    prose, heldout = _prose()
    task_a, task_b = _problems("next"), _problems("prev")
    # the original model sees all of task A and half of task B's facts (it half-solves B)
    b_seen = random.Random(seed).sample(task_b, len(task_b) // 2)
    tok = char_tokenizer([" ".join(prose), " ".join(heldout), "Q:=.!\n" + LETTERS, "The letter after before is answer"])
    t0 = time.perf_counter()
    original = pretrain(tok, prose, task_a, b_seen, seed=seed, steps=60 if quick else PRETRAIN_STEPS)
    original_dir = save_model(original, tok, work / "original")
    r = {"pretrain_s": time.perf_counter() - t0}
    r["original"] = {"acc_a": accuracy(original, tok, task_a), "acc_b": accuracy(original, tok, task_b),
                     "prose_ce": prose_ce(original, tok, heldout)}

    # pruning: angular (calibrated on prose) vs the last PRUNE layers, before any recovery
    stream = tok(" ".join(prose[:40]), add_special_tokens=False)["input_ids"]
    calib = [torch.tensor([stream[(i * 8 + j) * GEN_LEN:(i * 8 + j + 1) * GEN_LEN] for j in range(8)]) for i in range(4)]
    angular, kept = derive_student(original, LayerSelection(strategy="angular", num_layers=LAYERS - PRUNE), calib)
    last, _ = derive_student(original, LayerSelection(strategy="explicit", layers=list(range(LAYERS - PRUNE))))
    r["kept_angular"] = kept
    r["pruned_angular"] = {"prose_ce": prose_ce(angular, tok, heldout), "acc_b": accuracy(angular, tok, task_b)}
    r["pruned_last"] = {"prose_ce": prose_ce(last, tok, heldout)}

    # the two recovery data sets for task B, and the self-distilled one for task A (merge)
    ref_b = [{**it, "completion": reference_style(it)} for it in task_b]
    ref_a = [{**it, "completion": reference_style(it)} for it in task_a]
    self_b, stats_b = make_rewrites(original, tok, ref_b, work / "rewrites_b.jsonl")
    self_a, stats_a = make_rewrites(original, tok, ref_a, work / "rewrites_a.jsonl")
    r["rewrite_rate_b"], r["rewrite_rate_a"] = stats_b["rewrite_rate"], stats_a["rewrite_rate"]
    # 3 copies of each fact (a `copy` field keeps their held-out hashes apart)
    paths = {name: write_jsonl([{"prompt": x["prompt"], "completion": x["completion"], "copy": k}
                                for k in range(COPIES) for x in rows], work / f"{name}.jsonl")
             for name, rows in (("sft_b", ref_b), ("self_b", self_b), ("self_a", self_a))}
    steps = 10 if quick else RECOVER_STEPS
    t0 = time.perf_counter()
    students = {name: recover(original_dir, paths[name], work / "runs" / name, seed=seed, steps=steps)
                for name in ("sft_b", "self_b", "self_a")}
    r["recover_s"] = time.perf_counter() - t0
    merged_dir = work / "merged"
    merge = merge_model_folders(students["self_a"], students["self_b"], merged_dir, t=0.5, overwrite=True)
    r["merge_lerp_fallbacks"] = merge["lerp_fallbacks"]
    for name, folder in {**students, "merged": merged_dir}.items():
        m = AutoModelForCausalLM.from_pretrained(folder).eval()
        r[name] = {"acc_a": accuracy(m, tok, task_a), "acc_b": accuracy(m, tok, task_b),
                   "prose_ce": prose_ce(m, tok, heldout)}
    return r


def main(seeds: list[int], work: Path, quick: bool) -> dict:
    torch.set_num_threads(1)
    per_seed = []
    for seed in seeds:
        t0 = time.perf_counter()
        per_seed.append(one_seed(seed, Path(work) / f"seed{seed}", quick))
        print(f"seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    return summarize(per_seed, quick)


def resummarize(stored: dict) -> dict:
    """The summary recomputed from a stored result's per-seed numbers (no experiment is re-run)."""
    return summarize(stored["per_seed"], bool(stored.get("quick")))


def summarize(per_seed: list[dict], quick: bool) -> dict:
    """Table, parts, verdict and analysis from the per-seed numbers."""

    def col(model: str, key: str) -> list[float]:
        return [r[model][key] for r in per_seed if key in r[model]]

    rows = []
    labels = {"original": f"original ({LAYERS} layers)", "pruned_angular": "pruned, angular, no recovery",
              "pruned_last": "pruned, last 2 layers, no recovery", "sft_b": "(a) SFT on references (B)",
              "self_b": "(b) self-data rewrites (B)", "self_a": "self-data rewrites (A)",
              "merged": "SLERP merge of A and B (t=0.5)"}
    for key, label in labels.items():
        cells = []
        for metric in ("acc_b", "acc_a", "prose_ce"):
            vals = col(key, metric)
            cells.append(fmt(vals) if vals else "-")
        rows.append([label, *cells])
    table = markdown_table(["model", "task B accuracy", "task A accuracy", "prose held-out CE (nats/char)"], rows)
    rate_b = fmt([r["rewrite_rate_b"] for r in per_seed], 2)
    table += f"\n\nRewrites kept (answer matched) for task B: {rate_b}; for task A: " \
             f"{fmt([r['rewrite_rate_a'] for r in per_seed], 2)}. Angular kept layers per seed: " \
             f"{[r['kept_angular'] for r in per_seed]}."

    m = {k: mean_std(col(k, "prose_ce"))[0] for k in labels}
    acc_b = {k: mean_std(col(k, "acc_b"))[0] for k in labels if col(k, "acc_b")}
    acc_a = {k: mean_std(col(k, "acc_a"))[0] for k in labels if col(k, "acc_a")}
    # Each part is a per-seed paired difference (same original model), held only beyond the seed spread.
    parts = [
        beyond_spread("self-data forgets less (prose CE: references - self-data)",
                      paired(col("sft_b", "prose_ce"), col("self_b", "prose_ce"))),
        beyond_spread("task-B accuracy no more than 0.05 below the references' (self-data - references)",
                      paired(col("self_b", "acc_b"), col("sft_b", "acc_b")), margin=-0.05),
        beyond_spread("recovery raises task-B accuracy above the pruned model's (self-data - pruned)",
                      paired(col("self_b", "acc_b"), col("pruned_angular", "acc_b"))),
    ]
    def union_acc(r: dict, k: str) -> float:
        return (r[k]["acc_a"] + r[k]["acc_b"]) / 2

    secondary = [  # reported, not part of the verdict
        beyond_spread("secondary: the merge beats both components (mean A/B accuracy: merged - best component)",
                      [union_acc(r, "merged") - max(union_acc(r, "self_a"), union_acc(r, "self_b")) for r in per_seed]),
        beyond_spread("secondary: angular pruning beats dropping the last layers (prose CE: last - angular)",
                      paired(col("pruned_last", "prose_ce"), col("pruned_angular", "prose_ce"))),
    ]
    verdict = verdict_fields([*parts, *secondary], [p.name for p in parts])
    held = verdict["held"]
    less_forgetting, task_ok, recovered = (p.held for p in parts)
    union = {k: (acc_a[k] + acc_b[k]) / 2 for k in ("self_a", "self_b", "merged")}
    merge_better, angular_better = (p.held for p in secondary)
    wins = sum(r["self_b"]["prose_ce"] < r["sft_b"]["prose_ce"] for r in per_seed)
    analysis = (
        f"Forgetting: after recovery on task B the prose held-out CE is {m['self_b']:.3f} with self-data rewrites vs "
        f"{m['sft_b']:.3f} with the references (original model {m['original']:.3f}, pruned before recovery "
        f"{m['pruned_angular']:.3f}); paired difference {parts[0].evidence()}: self-data forgets "
        f"{'less, beyond the seed spread' if less_forgetting else 'NOT less beyond the seed spread'} "
        f"(less in {wins}/{len(per_seed)} seeds). Task B accuracy: {acc_b['self_b']:.2f} (self-data) vs "
        f"{acc_b['sft_b']:.2f} (references); the original solved {acc_b['original']:.2f}. The claim (less forgetting "
        f"at no loss of task accuracy, tolerance 0.05, and recovery raising task-B accuracy above the pruned model's "
        f"{acc_b['pruned_angular']:.2f}, each beyond the seed spread) "
        + ("holds here. " if held else "does not hold here: " + "; ".join(p.name for p in parts if not p.held)
           + " not beyond the seed spread. ")
        + 
        f"Merge: the SLERP merge of the A- and B-recovered models averages {union['merged']:.2f} accuracy over A and B "
        f"vs {union['self_a']:.2f} (A model) and {union['self_b']:.2f} (B model): "
        f"{'better than either component' if merge_better else 'not better than the best component'} beyond the "
        f"seed spread ({secondary[0].evidence()}). "
        f"Pruning: right after pruning, the angular block gives prose CE {m['pruned_angular']:.3f} vs "
        f"{m['pruned_last']:.3f} for dropping the last 2 layers "
        f"({'angular is better' if angular_better else 'angular is not better'} beyond the seed spread: "
        f"{secondary[1].evidence()}). "
        f"Caveats: a {LAYERS}-layer char model; the tasks are 26 facts each, evaluated on the facts trained on "
        "(recovery = re-learning facts, not generalisation); rewrites are prompted by the question alone (the tiny "
        "model cannot follow a rephrase instruction), so a rewrite is the original model's own answer."
    )
    return {
        "claim": "Recovering a pruned model by fine-tuning on its original model's own rewrites of the targets "
                 "(answer-matched, fallback to the reference) forgets less than SFT on the references at equal task "
                 "accuracy; SLERP-merging models recovered on different tasks keeps more than either.",
        "setting": f"char-level Llama {LAYERS} layers d={HIDDEN}, pruned by {PRUNE} layers (angular); original "
                   f"model pretrained ({PRETRAIN_STEPS} steps, hand-written loop) on pydoc prose + all 26 facts of task A "
                   "('Q: next c = d.') + 13 of the 26 facts of task B ('Q: prev d = c.'), so it half-solves B; "
                   "recovery with `stillroom run` (method sft, student.from_teacher angular) for "
                   f"{10 if quick else RECOVER_STEPS} steps x 16 at lr {RECOVER_LR} on the 26 facts x {COPIES} copies; rewrites by rewrite_with_fallback + hf_complete_fn (greedy); "
                   "merge by merge_model_folders. Accuracy: greedy answers to the 26 facts of a task; prose CE on "
                   "20 held-out pydoc documents (48 x 64 chars).",
        "table_md": table,
        **verdict,
        "analysis": analysis,
        "secondary": {"merge_better_than_components": merge_better, "angular_better_than_last": angular_better},
        "per_seed": per_seed,
    }
