"""LLaVA-MoD (spec 14.1) at CPU scale: dense vs MoE student at equal active parameters, then DPO with the
teacher vs the student as the reference: ``python bench/llava_mod_repro.py [--seeds 0 1 2] [--quick]``.

Per seed (data, teacher and students all depend on the seed):
1. Text scene QA (Part 1's ``stillroom.domains.vl.vqa.write_text_qa``): "Scene: <caption> Question: ...
   Answer:" -> one word; five families incl. ``unanswerable`` (answer "unknown"). Word-level tokenizer.
2. Teacher: a 2-layer Llama d=128 trained here with ``method: sft`` through ``stillroom.run``.
3. Stage 1 mimic (``method: llava_mod``, forward KL + CE on the answer tokens, same steps / lr / batches):
   dense student d=32 with MLP width 128, vs MoE student d=32 upcycled from a dense MLP of width 64 into 4
   experts top-2 (active MLP width 2 x 64 = 128: equal active parameters; router aux 0.01, capacity 1.5).
4. Pairs: for training prompts, chosen = the teacher's greedy answer, rejected = the MoE student's own sampled
   wrong answer (``stillroom.methods.llava_mod_pairs``; up to 4 samples at temperature 1).
5. Stage 2 from the MoE mimic student, the same pairs, steps and lr: DPO (sigmoid, beta 0.1) with
   reference = teacher vs reference = the student as it starts stage 2 (frozen copy).
Metrics on held-out scenes (greedy): exact-match accuracy; hallucination rate = share of unanswerable
questions answered with anything but "unknown". Writes ``bench/results/repro_llava_mod.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from bench.repro.common import RESULTS, SPECIALS, fmt, greedy_complete, markdown_table, run_stillroom, \
    save_model, tiny_llama  # noqa: E402
from bench.repro.verdict import beyond_spread, paired, verdict_fields  # noqa: E402

CLAIM = ("LLaVA-MoD: an MoE student (experts upcycled from the dense MLP, top-2 of 4) beats a dense student of "
         "equal active parameters under mimic distillation; preference distillation (DPO) with the teacher as "
         "reference lowers hallucination and is at least as good as the student-as-reference ablation")
FULL = dict(train_scenes=700, heldout_scenes=120, per_image=5, teacher_steps=1000, student_steps=400,
            dpo_steps=120, pair_prompts=1200, batch=32)
QUICK = dict(train_scenes=60, heldout_scenes=20, per_image=5, teacher_steps=20, student_steps=10,
             dpo_steps=6, pair_prompts=40, batch=8)
LR, DPO_LR = 3e-3, 1e-4
SCENES = dict(shapes=4, colours=4, max_objects=2)  # smaller scenes: a teacher near the spec's ~99%
TEACHER_D, STUDENT_D = 128, 32


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words and punctuation of ``texts`` (decoding joins with spaces)."""
    words = sorted({w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def make_data(seed: int, work: Path, size: dict) -> tuple[Path, list[dict]]:
    from stillroom.config.scenes import ScenesConfig
    from stillroom.domains.vl.vqa import write_text_qa

    scenes = ScenesConfig(seed=seed, **SCENES)
    train = write_text_qa(scenes, work / "train.jsonl", size["train_scenes"], "train", seed, size["per_image"])
    held = write_text_qa(scenes, work / "heldout.jsonl", size["heldout_scenes"], "heldout", seed, size["per_image"])
    return train, [json.loads(line) for line in held.read_text().splitlines()]


def score(model, tok, rows: list[dict]) -> dict:
    """Exact-match accuracy and hallucination rate (non-"unknown" answers to unanswerable questions)."""
    answers = greedy_complete(model, tok, [r["prompt"] for r in rows], max_new_tokens=3)
    got = [a.strip().split(" ")[0].lower() if a.strip() else "" for a in answers]
    right = [g == r["completion"].strip().lower() for g, r in zip(got, rows)]
    unans = [g for g, r in zip(got, rows) if r["family"] == "unanswerable"]
    families = sorted({r["family"] for r in rows})
    by_family = {f: sum(ok for ok, r in zip(right, rows) if r["family"] == f) /
                 sum(r["family"] == f for r in rows) for f in families}
    return {"accuracy": sum(right) / len(rows), "hallucination": sum(g != "unknown" for g in unans) / len(unans),
            "by_family": by_family}


def base_config(name: str, work: Path, teacher: Path, train: Path, size: dict, seed: int) -> dict:
    return {
        "name": name, "output_dir": str(work / "runs"), "seed": seed,
        "teacher": {"model": {"path": str(teacher)}, "dtype": "float32"},
        "data": {"sources": [{"path": str(train), "format": "prompt_completion"}], "seq_len": 96,
                 "heldout_fraction": 0.02, "heldout_max": 16},
        "train": {"micro_batch_size": size["batch"], "precision": "fp32", "lr": LR, "warmup_steps": 10,
                  "keep_checkpoints": 1, "clip_grad_norm": 1.0},
        "eval": {"before": False, "generations": 0, "heldout_sequences": 16, "speed_tokens": 16},
    }


def student_arch(width: int) -> dict:
    return {"hidden_size": STUDENT_D, "intermediate_size": width, "num_attention_heads": 4,
            "num_key_value_heads": 4, "head_dim": STUDENT_D // 4}


def seed_rows(seed: int, work: Path, size: dict) -> dict:
    from stillroom.methods.llava_mod_pairs import wrong_answer_pairs, write_pairs

    train, held = make_data(seed, work, size)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    tok = word_tokenizer([r["prompt"] + r["completion"] for r in rows + held])
    teacher_init = save_model(tiny_llama(len(tok), layers=2, hidden=TEACHER_D, seed=seed), tok, work / "t0")
    cfg = base_config("teacher", work, teacher_init, train, size, seed)
    cfg.update(method="sft", student={"from_config": {}}, loss={"terms": [{"name": "ce"}]})
    cfg["train"]["steps"] = size["teacher_steps"]
    teacher_dir = run_stillroom(cfg) / "student"
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    teacher = load(teacher_dir)
    out = {"teacher": score(teacher, tok, held)}

    def mimic(name: str, width: int, moe: bool) -> Path:
        c = base_config(name, work, teacher_dir, train, size, seed)
        c.update(method="llava_mod", student={"from_config": student_arch(width)},
                 loss={"terms": [{"name": "forward_kl"}, {"name": "ce"}]},
                 llava_mod={"stage": "mimic", "moe": {"upcycle": moe}})
        c["train"]["steps"] = size["student_steps"]
        return run_stillroom(c) / "student"

    dense_dir, moe_dir = mimic("dense", 4 * STUDENT_D, False), mimic("moe", 2 * STUDENT_D, True)
    out["dense"], out["moe"] = score(load(dense_dir), tok, held), score(load(moe_dir), tok, held)

    prompts = [r["prompt"] for r in rows[: size["pair_prompts"]]]
    chosen = [" " + a.strip().split(" ")[0] for a in greedy_complete(teacher, tok, prompts, max_new_tokens=3)]
    pairs = wrong_answer_pairs(load(moe_dir), tok, prompts, chosen, tries=4, max_new_tokens=3, seed=seed)
    pairs_file = write_pairs(pairs, work / "pairs.jsonl")
    family = {r["prompt"]: r["family"] for r in rows}
    out["pairs"] = {"n": len(pairs), "of": len(prompts),
                    "unanswerable": sum(family[p["prompt"]] == "unanswerable" for p in pairs)}

    for reference in ("teacher", "student"):
        c = base_config(f"dpo_{reference}", work, teacher_dir, pairs_file, size, seed)
        c["data"]["sources"][0]["completion_field"] = "chosen"
        c.update(method="llava_mod", student={"model": {"path": str(moe_dir)}}, loss={"terms": [{"name": "ce"}]},
                 llava_mod={"stage": "preference", "reference": reference, "loss_type": "sigmoid", "beta": 0.1})
        c["train"].update(steps=size["dpo_steps"], lr=DPO_LR)
        out[f"dpo_{reference}"] = score(load(run_stillroom(c) / "student"), tok, held)
    return out


ARMS = ["teacher", "dense", "moe", "dpo_teacher", "dpo_student"]


def verdict_parts(col) -> list:
    """The claim's four parts from ``col(arm, metric) -> per-seed values``: MoE over dense, DPO lowers
    hallucination, teacher reference at least as good as student reference (1 pt tolerance), DPO keeps accuracy
    (not required). Shared by the text and the image reproductions."""
    moe = beyond_spread("MoE mimic beats dense mimic at equal active parameters (accuracy, MoE - dense)",
                        paired(col("moe", "accuracy"), col("dense", "accuracy")))
    dpo = beyond_spread("DPO (teacher reference) lowers hallucination (MoE mimic - DPO)",
                        paired(col("moe", "hallucination"), col("dpo_teacher", "hallucination")))
    ref = beyond_spread("teacher reference >= student reference (accuracy, teacher-ref - student-ref, 1 pt "
                        "tolerance)", paired(col("dpo_teacher", "accuracy"), col("dpo_student", "accuracy")),
                        margin=-0.01)
    acc = beyond_spread("DPO (teacher reference) keeps accuracy within 1 pt (DPO - MoE mimic)",
                        paired(col("dpo_teacher", "accuracy"), col("moe", "accuracy")), margin=-0.01)
    return [moe, dpo, ref, acc]


def summarize(per_seed: dict, quick: bool) -> dict:
    seeds = sorted(per_seed)

    def col(arm: str, key: str) -> list[float]:
        return [per_seed[s][arm][key] for s in seeds]

    table = markdown_table(["arm", "exact match", "hallucination (unanswerable)"],
                           [[a, fmt(col(a, "accuracy")), fmt(col(a, "hallucination"))] for a in ARMS])
    parts = verdict_parts(col)
    moe, dpo, ref, acc = parts
    fields = verdict_fields(parts, required=[moe.name, dpo.name, ref.name])
    fields["parts"] = [p.to_dict() | {"required": p.name != acc.name} for p in parts]
    pairs = [per_seed[s]["pairs"] for s in seeds]
    mean = {a: {k: sum(col(a, k)) / len(seeds) for k in ("accuracy", "hallucination")} for a in ARMS}
    fam = {a: {f: sum(per_seed[s][a]["by_family"][f] for s in seeds) / len(seeds)
               for f in per_seed[seeds[0]][a]["by_family"]} for a in ARMS}
    analysis = " ".join([
        f"Held parts: {[p.name for p in parts if p.held] or 'none'}; not held: "
        f"{[p.name for p in parts if not p.held] or 'none'}.",
        f"(1) MoE vs dense at equal active parameters: accuracy {mean['moe']['accuracy']:.3f} vs "
        f"{mean['dense']['accuracy']:.3f}, paired {moe.evidence()}: the upcycled MoE does "
        + ("better" if moe.held else "not do better") + " after the same 400 mimic steps (here it starts from a "
        "random dense MLP, so upcycling is only an initialisation; the paper upcycles a dense student trained "
        "first).",
        f"(2) Hallucination: the mimic students answer 'unknown' to {1 - mean['moe']['hallucination']:.1%} of "
        f"the unanswerable questions already (teacher {1 - mean['teacher']['hallucination']:.1%}): in this "
        "generator an unanswerable question names an object the caption lacks, a lexical check the students learn "
        "fully, so there was no hallucination for DPO to remove and the part cannot hold here. The pairs still "
        f"held {[p['unanswerable'] for p in pairs]} sampled non-'unknown' answers on unanswerable prompts "
        "(the students hallucinate only when sampled at temperature 1).",
        f"(3) DPO cost accuracy: {mean['moe']['accuracy']:.3f} after mimic -> {mean['dpo_teacher']['accuracy']:.3f} "
        f"(teacher reference) and {mean['dpo_student']['accuracy']:.3f} (student reference), paired "
        f"{acc.evidence()} for the teacher reference. A plausible reason: chosen = the teacher's greedy answer, "
        f"and the teacher reaches only {mean['teacher']['accuracy']:.1%} exact match (per family "
        f"{ {f: round(v, 2) for f, v in fam['teacher'].items()} }; the spec assumes ~99%), so up to about "
        f"{1 - mean['teacher']['accuracy']:.0%} of the pairs prefer a wrong teacher answer over the student's own "
        "sample (which is then sometimes the right one), and DPO pulls the student toward the teacher's mistakes.",
        f"(4) Teacher vs student reference: paired {ref.evidence()} with a 1 pt tolerance: "
        + ("held only in the weak sense the tolerance allows: both references end within about a point of each "
           "other, both below the mimic student." if ref.held else "not beyond the seed spread.") ,
        f"Pairs per seed (prompts with a wrong sampled answer among {pairs[0]['of']}): {[p['n'] for p in pairs]}.",
        "Caveats: a weak, quickly trained teacher; short stage 2 (120 steps, lr 1e-4); 3 seeds make the bar a "
        "paired t above 1.73, not significance. A faithful test needs a near-perfect teacher (or verified chosen "
        "answers) and unanswerable questions the students actually get wrong.",
    ])
    return {"method": "llava_mod", "claim": CLAIM, "seeds": seeds, "per_seed": per_seed, "quick": quick,
            "setting": (f"text scene QA (vqa.write_text_qa, 5 families, scenes {SCENES}), word tokenizer; teacher Llama 2x{TEACHER_D} "
                        f"sft; students d={STUDENT_D}: dense MLP 128 vs MoE 4x64 top-2 (equal active), mimic "
                        f"forward_kl + ce, lr {LR}; DPO sigmoid beta 0.1, lr {DPO_LR}, pairs from the MoE "
                        f"student's own wrong samples; sizes {FULL if not quick else QUICK}"),
            "table_md": table, "analysis": analysis, "finished": time.strftime("%Y-%m-%d %H:%M"), **fields}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (numbers meaningless, nothing written)")
    ap.add_argument("--from-results", action="store_true", help="only re-decide the verdict from the stored numbers")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0, per_seed, path = time.time(), {}, RESULTS / "repro_llava_mod.json"
    if a.from_results:
        stored = json.loads(path.read_text())
        per_seed, t0 = {int(k): v for k, v in stored["per_seed"].items()}, t0 - stored.get("seconds", 0)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in ([] if a.from_results else a.seeds):
            per_seed[seed] = seed_rows(seed, Path(tmp) / f"s{seed}", QUICK if a.quick else FULL)
            print(seed, json.dumps(per_seed[seed]), f"{time.time() - t0:.0f}s", flush=True)
    result = summarize(per_seed, a.quick)
    result["seconds"] = round(time.time() - t0)
    print(result["table_md"], "\n", result["verdict_text"], "\n", result["analysis"])
    if not a.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json.tmp").write_text(json.dumps(result, indent=2))
        path.with_suffix(".json.tmp").replace(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
