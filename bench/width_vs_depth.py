"""Width vs depth pruning at equal parameter count, and angular vs block-influence vs last-N depth pruning
(issue 12 "Width vs depth"; self-data distillation's sub-claim, spec 9 / Appendix B.9), at CPU scale.

Per seed:
1. A teacher: an 8-layer Llama (d 64, 4 heads over 2 KV heads, MLP 256, character vocabulary) trained with a
   hand-written loop on lower-cased Python documentation prose (``pydoc_data.topics``).
2. Five students, each with half of the teacher's non-embedding parameters (the embedding is shared and
   untouched), made by ``stillroom.compress.prune.prune`` from a RunConfig exactly as ``stillroom prune`` does
   (calibration: 8 x 4 x 64 tokens of the training split):
   width (MLP 256 -> 96), width (heads 4 -> 2 over 1 KV head, MLP 256 -> 128), depth by angular distance,
   by block influence and by dropping the last 4 layers (8 -> 4 layers). Every student has 30,848
   non-embedding parameters per layer-equivalent: 246,784 in all vs the teacher's 492,544.
3. Each student recovered by KD (forward KL) from the teacher for the same steps, through ``stillroom run``
   (``student.model: {path: pruned}``); held-out CE before (right after pruning) and after recovery.

Claims (two results): width beats depth at equal parameters after the same KD (Minitron; primary width
variant: MLP only, chosen before running), and angular depth pruning beats dropping the last layers
(self-data's sub-claim; required: right after pruning; after recovery reported).

    .venv/bin/python bench/width_vs_depth.py                 # 3 seeds -> bench/results/repro_width_vs_depth.json,
                                                             #            bench/results/repro_depth_choice.json
    .venv/bin/python bench/width_vs_depth.py --from-results  # re-decide both verdicts from the stored numbers
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.repro.common import RESULTS, char_tokenizer, fmt, markdown_table, save_model, write_jsonl  # noqa: E402
from bench.repro.verdict import beyond_spread, paired, verdict_fields  # noqa: E402

SETTING = {"layers": 8, "hidden": 64, "heads": 4, "kv_heads": 2, "mlp": 256, "seq_len": 64, "pretrain_steps": 400,
           "pretrain_batch": 16, "pretrain_lr": 3e-3, "recover_steps": 100, "recover_batch": 8, "recover_lr": 1e-3}
VARIANTS = {
    "width (MLP)": {"width": {"intermediate_size": 96}},
    "width (heads+MLP)": {"width": {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128}},
    "depth (angular)": {"depth": {"strategy": "angular", "num_layers": 4}},
    "depth (block influence)": {"depth": {"strategy": "block_influence", "num_layers": 4}},
    "depth (last 4)": {"depth": {"strategy": "last_n", "num_layers": 4}},
}
CHARS = "abcdefghijklmnopqrstuvwxyz .,=()\n"
CLAIM_WIDTH = ("Minitron (Muralidharan et al. 2024): at equal parameter count, a width-pruned model (MLP, heads, "
               "embedding channels ranked by activation importance) recovers better under the same KD than a "
               "depth-pruned one")
CLAIM_DEPTH = ("Self-data distillation / Gromov et al. 2024 (spec 9, B.9): choosing the dropped layers by angular "
               "distance beats dropping the last layers (and block influence is an alternative criterion)")


def documents() -> list[str]:
    from pydoc_data.topics import topics

    docs = []
    for _, v in sorted(topics.items()):
        text = re.sub(f"[^{re.escape(CHARS)}]", " ", v.lower())
        docs.append(re.sub(r"\s+", " ", text).strip())
    return [d for d in docs if len(d) > 200]


def teacher_model(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    s = SETTING
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def pretrain(model, tok, docs: list[str], seed: int):
    """Plain CE on random windows of the training documents (hand loop; warmup then linear decay)."""
    stream = tok(" ".join(docs), add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    steps, t = SETTING["pretrain_steps"], SETTING["seq_len"]
    opt = torch.optim.AdamW(model.parameters(), lr=SETTING["pretrain_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 30) * max(0.05, 1 - k / steps))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - t - 1, (SETTING["pretrain_batch"],), generator=g).tolist()
        ids_bt = torch.tensor([stream[s: s + t] for s in starts])
        model(input_ids=ids_bt, labels=ids_bt).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    return model.eval()


def base_config(teacher_dir: Path, data: Path, out: Path, seed: int) -> dict:
    s = SETTING
    return {
        "name": "recover", "output_dir": str(out), "seed": seed, "method": "kd",
        "teacher": {"model": {"path": str(teacher_dir)}, "dtype": "float32"},
        "data": {"sources": [{"path": str(data)}], "seq_len": s["seq_len"], "heldout_fraction": 0.1, "heldout_max": 32},
        "loss": {"terms": [{"name": "forward_kl"}]},
        "train": {"steps": s["recover_steps"], "micro_batch_size": s["recover_batch"], "lr": s["recover_lr"],
                  "warmup_steps": 10, "precision": "fp32", "device": "cpu", "keep_checkpoints": 1, "log_every": 1000},
        "eval": {"heldout_sequences": 32, "batch_size": 8, "generations": 0, "speed_tokens": 64},
    }


def one_variant(name: str, spec: dict, teacher_dir: Path, data: Path, work: Path, seed: int) -> dict:
    from stillroom.compress.prune import prune
    from stillroom.config.schema import RunConfig
    from stillroom.run import run

    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    cfg = base_config(teacher_dir, data, work / slug, seed)
    pruned = work / slug / "pruned"
    result = prune(RunConfig.model_validate({**cfg, "prune": {
        "out": str(pruned), "calibration": {"seq_len": 64, "batches": 8, "batch_size": 4}, **spec}}), log=lambda _m: None)
    run_dir = run(RunConfig.model_validate({**cfg, "student": {"model": {"path": str(pruned)}}}), log=lambda _m: None)
    models = json.loads((run_dir / "report.json").read_text())["models"]
    return {"params": result.params_after, "kept_layers": result.details["kept_layers"],
            "ce_pruned": models["student_before"]["heldout_ce"], "ce_recovered": models["student_after"]["heldout_ce"],
            "kl_recovered": models["student_after"].get("kl_teacher_student"),
            "teacher_ce": models["teacher"]["heldout_ce"]}


def one_seed(seed: int) -> dict:
    docs = documents()
    random.Random(0).shuffle(docs)
    tok = char_tokenizer(CHARS)
    with tempfile.TemporaryDirectory(prefix="width_vs_depth_") as tmp:
        work = Path(tmp)
        data = write_jsonl(({"text": d} for d in docs), work / "prose.jsonl")
        teacher = pretrain(teacher_model(len(tok), seed), tok, docs, seed)
        teacher_dir = save_model(teacher, tok, work / "teacher")
        rows = {name: one_variant(name, spec, teacher_dir, data, work, seed) for name, spec in VARIANTS.items()}
    return {"seed": seed, "teacher_params": sum(p.numel() for p in teacher.parameters()), "variants": rows}


def decide(per_seed: list[dict]) -> tuple[dict, dict]:
    """The two results (width vs depth; depth criteria) from the per-seed numbers."""
    def col(variant: str, key: str) -> list[float]:
        return [s["variants"][variant][key] for s in per_seed]

    table = markdown_table(
        ["student (half the non-embedding parameters)", "params", "held-out CE after pruning",
         "held-out CE after KD", "KL to teacher after KD"],
        [[v, per_seed[0]["variants"][v]["params"], fmt(col(v, "ce_pruned")), fmt(col(v, "ce_recovered")),
          fmt(col(v, "kl_recovered"))] for v in VARIANTS]
        + [["teacher (8 layers)", per_seed[0]["teacher_params"], fmt(col("width (MLP)", "teacher_ce")), "", ""]])
    width_parts = [
        beyond_spread("width (MLP) beats depth (angular) after KD: CE(depth) - CE(width)",
                      paired(col("depth (angular)", "ce_recovered"), col("width (MLP)", "ce_recovered")), unit=" nats"),
        beyond_spread("width (heads+MLP) beats depth (angular) after KD",
                      paired(col("depth (angular)", "ce_recovered"), col("width (heads+MLP)", "ce_recovered")), unit=" nats"),
        beyond_spread("best width beats best depth after KD",
                      paired([min(a, b, c) for a, b, c in zip(col("depth (angular)", "ce_recovered"),
                                                                col("depth (block influence)", "ce_recovered"),
                                                                col("depth (last 4)", "ce_recovered"))],
                             [min(a, b) for a, b in zip(col("width (MLP)", "ce_recovered"),
                                                        col("width (heads+MLP)", "ce_recovered"))]), unit=" nats"),
        beyond_spread("width (MLP) beats depth (angular) right after pruning",
                      paired(col("depth (angular)", "ce_pruned"), col("width (MLP)", "ce_pruned")), unit=" nats"),
    ]
    depth_parts = [
        beyond_spread("angular beats last 4 right after pruning: CE(last) - CE(angular)",
                      paired(col("depth (last 4)", "ce_pruned"), col("depth (angular)", "ce_pruned")), unit=" nats"),
        beyond_spread("angular beats last 4 after KD",
                      paired(col("depth (last 4)", "ce_recovered"), col("depth (angular)", "ce_recovered")), unit=" nats"),
        beyond_spread("block influence beats last 4 right after pruning",
                      paired(col("depth (last 4)", "ce_pruned"), col("depth (block influence)", "ce_pruned")), unit=" nats"),
        beyond_spread("angular beats block influence after KD",
                      paired(col("depth (block influence)", "ce_recovered"), col("depth (angular)", "ce_recovered")),
                      unit=" nats"),
    ]
    setting = (f"Teacher: {SETTING['layers']}-layer Llama, d {SETTING['hidden']}, 4 heads / 2 KV heads, MLP 256, "
               f"character vocabulary, {SETTING['pretrain_steps']} CE steps on pydoc prose. Students: half the "
               "non-embedding parameters by each pruning (stillroom.compress.prune), recovered by forward-KL KD from "
               f"the teacher through stillroom run for {SETTING['recover_steps']} steps x {SETTING['recover_batch']} "
               f"x {SETTING['seq_len']} tokens (lr {SETTING['recover_lr']}); held-out CE on 32 x 64-token sequences "
               "of held-out documents. Seeds change the teacher's initialisation and data order.")
    common = {"setting": setting, "table_md": table, "seeds": [s["seed"] for s in per_seed], "per_seed": per_seed,
              "config": SETTING}
    width = {"claim": CLAIM_WIDTH, **common, **verdict_fields(width_parts, [width_parts[0].name])}
    depth = {"claim": CLAIM_DEPTH, **common, **verdict_fields(depth_parts, [depth_parts[0].name, depth_parts[1].name])}
    return width, depth


ANALYSIS_WIDTH = (
    "Width wins, as Minitron reports, when the width is taken from the MLP: at the same parameter count "
    "(249,152 vs 248,640, the width students keep 512 more norm weights), the MLP-pruned student ends 0.093 "
    "± 0.034 nats below the angular depth-pruned one after the same 100 KD steps, and it starts 0.39 nats "
    "ahead right after pruning; it recovers to within 0.03 nats of the teacher (KL 0.011). Pruning heads too "
    "(4 -> 2 heads, 2 -> 1 KV group, MLP 256 -> 128) is no better than depth here (+0.017 ± 0.028, inside the "
    "spread): at d 64 a head is a quarter of the attention, and Minitron too found heads the costliest axis "
    "to prune. The best width variant beats the best depth variant in every seed (+0.080 ± 0.018). The "
    "primary comparison (MLP width vs angular depth) was fixed before the run; the others are reported. "
    "Scale: 8-layer, d-64 teachers trained for 400 steps on prose; whether the ordering holds at 135M is "
    "what the real-scale run in docs/BENCHMARKS.md looks at (one seed, few steps)."
)
ANALYSIS_DEPTH = (
    "Split result. After the same 100 KD steps the angular choice beats dropping the last 4 layers in every "
    "seed (+0.122 ± 0.037 nats, held); right after pruning it does not (+0.024 ± 0.100: in seed 0 the "
    "last-4 student, which keeps layers 0-3, is 0.09 nats better than the angular one, which keeps 0, 1, 6, "
    "7). Angular distance always picked the middle block 2-5, and block influence picked the same layers in "
    "2 of 3 seeds (seed 0: 0, 1, 5, 7, the best depth student after pruning there); the two are "
    "indistinguishable after KD (-0.013 ± 0.022). Our reading: in a model this shallow, dropping half the "
    "layers removes so much that the zero-shot loss of any choice is dominated by which representations the "
    "head happens to tolerate, while keeping the last layers (which the head was trained on) is what makes "
    "the model recoverable, which is the use Gromov et al. make of the rule (prune, then heal). The "
    "self-data sub-claim as stated (angular beats last-N) therefore holds after recovery and not before it "
    "at this scale; both parts were required, so the verdict is not held."
)


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"repro_{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"method": name, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **result}, indent=2))
    tmp.replace(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--from-results", action="store_true", help="re-decide the verdicts from the stored numbers")
    ap.add_argument("--quick", action="store_true", help="a plumbing check: 2 seeds, a few steps, nothing saved")
    args = ap.parse_args()
    if args.quick:
        SETTING.update(pretrain_steps=20, recover_steps=3)
        args.seeds = [0, 1]
    torch.set_num_threads(1)
    start = time.time()
    if args.from_results:
        old = json.loads((RESULTS / "repro_width_vs_depth.json").read_text())
        per_seed, seconds = old["per_seed"], old["seconds"]
    else:
        per_seed = []
        for seed in args.seeds:
            per_seed.append(one_seed(seed))
            print(f"seed {seed} done at {time.time() - start:.0f} s: " + json.dumps(
                {k: round(v["ce_recovered"], 3) for k, v in per_seed[-1]["variants"].items()}), flush=True)
        seconds = round(time.time() - start)
    width, depth = decide(per_seed)
    for name, result, analysis in (("width_vs_depth", width, ANALYSIS_WIDTH), ("depth_choice", depth, ANALYSIS_DEPTH)):
        result["analysis"] = analysis
        if args.quick:
            print(f"{name}: held={result['held']} (quick run: nothing saved)")
            continue
        print(f"{name}: held={result['held']} ({result['verdict_text']}) -> {save(name, {**result, 'seconds': seconds})}")
    print(width["table_md"])


if __name__ == "__main__":
    main()
