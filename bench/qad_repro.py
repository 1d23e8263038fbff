"""QAD reproduction at CPU scale: post-training quantization (round to nearest) vs quantization-aware training
with cross-entropy (QAT-CE) vs quantization-aware distillation from the full-precision model (QAD), at Q4_0, with
Q8_0 as a near-lossless check.

Per seed: a byte-level BPE tokenizer and a tiny Llama (4 layers, hidden 128) trained here with ``stillroom run``
(method sft) on Python's pydoc prose: the full-precision model. Then, for each format, one ``stillroom run``
(method kd, ``baseline: true``) whose student is that model with ``student.quantize``:

* ``student_before``: the quantized model before training, i.e. PTQ (round to nearest on the grid);
* ``student_after``: QAD, forward KL from the full-precision model, N steps;
* ``baseline``: QAT-CE, the same quantized student, cross-entropy on the same batches, N steps.

Held-out CE and KL(full precision || quantized) on the same held-out sequences (which the full-precision model
never trained on: the held-out split is by record, the same in both runs).

    .venv/bin/python bench/qad_repro.py                  # 3 seeds -> bench/results/repro_qad.json
    .venv/bin/python bench/qad_repro.py --from-results   # re-decide the verdict from the stored numbers
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.repro.common import RESULTS, fmt, markdown_table, mean_std, run_stillroom  # noqa: E402
from bench.repro.verdict import beyond_spread, paired, verdict_fields, within_tolerance  # noqa: E402

CLAIM = ("QAD (NVIDIA Model Optimizer's quantization-aware distillation; issue 12 item 6): at 4 bits (llama.cpp "
         "Q4_0), a quantized student trained by distillation from its full-precision model recovers more of that "
         "model than quantization-aware training with cross-entropy at equal steps, and both beat post-training "
         "round-to-nearest; at 8 bits (Q8_0) round to nearest is already near lossless")
DATA = {"sources": [{"bundled": "pydoc"}], "seq_len": 64, "heldout_fraction": 0.1, "heldout_max": 40}
MODEL = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "mlp": 384, "vocab": 512}
FORMATS = ["q4_0", "q8_0"]
ARMS = {"teacher": "teacher", "ptq": "student_before", "qad": "student_after", "qat_ce": "baseline"}
LABELS = {"teacher": "full precision", "ptq": "PTQ (round to nearest)", "qat_ce": "QAT-CE", "qad": "QAD (KD)"}


def tokenizer(folder: Path):
    """A byte-level BPE (GPT-2 style, so the GGUF export could write it) trained on the pydoc topics."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MODEL["vocab"], special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([v for _, v in sorted(topics.items())], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def initial_model(folder: Path, seed: int) -> Path:
    """A random tiny Llama and the tokenizer, saved as the sft run's starting point."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=MODEL["hidden"], intermediate_size=MODEL["mlp"],
                      num_hidden_layers=MODEL["layers"], num_attention_heads=MODEL["heads"],
                      num_key_value_heads=MODEL["kv_heads"], max_position_embeddings=256, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def common(name: str, seed: int, work: Path, steps: int, lr: float) -> dict:
    return {"name": name, "output_dir": str(work / "runs"), "cache_dir": str(work / "cache"), "seed": seed,
            "data": DATA, "train": {"steps": steps, "micro_batch_size": 8, "lr": lr, "warmup_steps": steps // 10,
                                    "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.0,
                                    "precision": "fp32", "threads": 1, "keep_checkpoints": 1, "log_every": 1000},
            "eval": {"heldout_sequences": 40, "batch_size": 8, "generations": 0, "speed_tokens": 16}}


def full_precision(seed: int, work: Path, steps: int) -> Path:
    """The full-precision model: the random tiny Llama trained with cross-entropy (method sft)."""
    init = initial_model(work / f"init_s{seed}", seed)
    cfg = common(f"fp_s{seed}", seed, work, steps, 3e-3) | {
        "method": "sft", "baseline": False, "teacher": {"model": {"path": str(init)}, "dtype": "float32"},
        "student": {"model": {"path": str(init)}}}
    cfg["train"]["micro_batch_size"] = 16
    cfg["eval"]["before"] = False
    return run_stillroom(cfg) / "student"


def seed_rows(seed: int, work: Path, steps: int, fp_steps: int, lr: float) -> dict:
    """Held-out CE and KL to the full-precision model of every arm, for each format, at one seed."""
    fp = full_precision(seed, work, fp_steps)
    rows: dict = {}
    for fmt_name in FORMATS:
        cfg = common(f"qad_{fmt_name}_s{seed}", seed, work, steps, lr) | {
            "method": "kd", "baseline": True, "teacher": {"model": {"path": str(fp)}, "dtype": "float32"},
            "student": {"model": {"path": str(fp)}, "quantize": {"format": fmt_name, "export": ["hf"]}},
            "loss": {"terms": [{"name": "forward_kl"}]}}
        report = json.loads((run_stillroom(cfg) / "report.json").read_text())
        rows[fmt_name] = {arm: {"ce": report[key]["heldout_ce"], "kl": report[key].get("kl_teacher_student") or 0.0}
                          for arm, key in ARMS.items()}
    return rows


def summarize(per_seed: dict, steps: int, fp_steps: int, lr: float) -> dict:
    seeds = sorted(per_seed, key=int)

    def col(fmt_name: str, arm: str, key: str) -> list[float]:
        return [per_seed[s][fmt_name][arm][key] for s in seeds]

    table = markdown_table(
        ["format", "model", "held-out CE", "KL(full precision || model)"],
        [[f, LABELS[a], fmt(col(f, a, "ce")), fmt(col(f, a, "kl"), 4)] for f in FORMATS for a in LABELS
         if not (a == "teacher" and f != FORMATS[0])])
    parts = [
        beyond_spread("Q4_0: QAD KL < QAT-CE KL", paired(col("q4_0", "qat_ce", "kl"), col("q4_0", "qad", "kl"))),
        beyond_spread("Q4_0: QAD CE < PTQ CE", paired(col("q4_0", "ptq", "ce"), col("q4_0", "qad", "ce"))),
        beyond_spread("Q4_0: QAT-CE CE < PTQ CE", paired(col("q4_0", "ptq", "ce"), col("q4_0", "qat_ce", "ce"))),
        within_tolerance("Q8_0: PTQ CE within 0.01 nats of full precision",
                         paired(col("q8_0", "ptq", "ce"), col("q8_0", "teacher", "ce")), tolerance=0.01),
        beyond_spread("Q4_0: QAD CE < QAT-CE CE", paired(col("q4_0", "qat_ce", "ce"), col("q4_0", "qad", "ce"))),
        beyond_spread("Q4_0: QAD KL < PTQ KL", paired(col("q4_0", "ptq", "kl"), col("q4_0", "qad", "kl"))),
        beyond_spread("Q4_0: QAT-CE KL < PTQ KL", paired(col("q4_0", "ptq", "kl"), col("q4_0", "qat_ce", "kl"))),
    ]
    fields = verdict_fields(parts, required=[p.name for p in parts[:4]])
    return {"claim": CLAIM, "setting": setting(steps, fp_steps, lr), "table_md": table,
            "analysis": analysis(per_seed, seeds, parts), "seeds": [int(s) for s in seeds], "per_seed": per_seed,
            **fields}


def setting(steps: int, fp_steps: int, lr: float) -> str:
    m = MODEL
    return (f"A Llama of {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads ({m['kv_heads']} KV), MLP "
            f"{m['mlp']}, tied embeddings, byte-level BPE of {m['vocab']} tokens, trained here per seed with "
            f"`stillroom run` (method sft, {fp_steps} steps x 16 x {DATA['seq_len']} tokens of pydoc prose, lr 3e-3): "
            "the full-precision model. Its 28 linear layers quantized to llama.cpp Q4_0 / Q8_0 (blocks of 32, "
            "float16 scale; embeddings and head full precision). PTQ: round to nearest; QAT-CE and QAD: "
            f"`student.quantize` (fake-quant forward, straight-through gradient), {steps} steps x 8 x "
            f"{DATA['seq_len']} tokens, AdamW lr {lr:g} cosine to 0.1x, same batches in the same order (one "
            "`stillroom run` with `baseline: true`). Held-out: 40 sequences of records the model never trained on. "
            "CPU, 1 thread, fp32.")


def analysis(per_seed: dict, seeds: list, parts: list) -> str:
    """What held and why, from the stored numbers (every figure below is computed, none typed in)."""
    def mean(fmt_name: str, arm: str, key: str) -> float:
        return mean_std([per_seed[s][fmt_name][arm][key] for s in seeds])[0]

    gap = mean("q4_0", "ptq", "ce") - mean("q4_0", "teacher", "ce")
    kl = {a: mean("q4_0", a, "kl") for a in ("ptq", "qat_ce", "qad")}
    kd_vs_ce, qad_ptq, ce_ptq, q8, _, qad_ptq_kl, ce_ptq_kl = parts
    below_fp = mean("q4_0", "teacher", "ce") - mean("q4_0", "qat_ce", "ce")
    return (
        f"Round to nearest to Q4_0 costs this tiny model only {gap:+.4f} nats of held-out CE (KL to the "
        f"full-precision model {kl['ptq']:.4f}), so at this scale there is almost no CE to recover. Against the "
        f"full-precision model, {'QAD is the closest' if kl['qad'] < min(kl['ptq'], kl['qat_ce']) else 'QAD is not the closest'}: "
        f"KL {kl['qad']:.4f}, {kl['ptq'] / kl['qad']:.1f}x below PTQ "
        f"({qad_ptq_kl.evidence(4)}, {'beyond' if qad_ptq_kl.held else 'not beyond'} the spread), while QAT-CE "
        f"moves away from it: KL {kl['qat_ce']:.4f}, {kl['qat_ce'] / kl['ptq']:.1f}x above PTQ; QAT-CE - QAD "
        f"{kd_vs_ce.evidence(4)} ({'beyond' if kd_vs_ce.held else 'not beyond'} the spread). On held-out CE "
        + ("the order reverses: " if mean("q4_0", "qat_ce", "ce") < mean("q4_0", "qad", "ce") else "")
        + f"QAT-CE ends {below_fp:+.3f} nats below the full-precision model "
        f"(QAT-CE beats PTQ {ce_ptq.evidence()}, {'beyond' if ce_ptq.held else 'not beyond'} the spread), "
        "because the full-precision model is itself undertrained and QAT-CE simply trains it further on the same "
        "distribution, while QAD is bounded by its teacher; QAD's CE stays at PTQ's "
        f"({qad_ptq.evidence()}, {'beyond' if qad_ptq.held else 'not beyond'} the spread). "
        + ("So the part 'both beat PTQ at 4 bits' failed for QAD on CE, and the claim is not held as stated; "
           if not qad_ptq.held else "")
        + ("distillation recovers the full-precision model's behaviour (KL) better than QAT-CE at equal steps, "
           "beyond the spread. " if kd_vs_ce.held else "QAD's KL advantage over QAT-CE is not beyond the spread. ")
        + f"Q8_0 round to nearest: CE {q8.evidence(4)} from full precision "
        f"({'within' if q8.held else 'not within'} 0.01 nats beyond the spread), KL "
        f"{mean('q8_0', 'ptq', 'kl'):.6f}. The setting where Q4_0 costs real CE (hundred-million-parameter "
        "models and up, as in NVIDIA's QAD reports; `stillroom run qad_smollm2`) is beyond this machine's "
        "budget for 3 seeds.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=120, help="QAT-CE / QAD steps")
    ap.add_argument("--fp-steps", type=int, default=400, help="steps that train the full-precision model")
    ap.add_argument("--lr", type=float, default=3e-4, help="QAT-CE / QAD learning rate")
    ap.add_argument("--from-results", action="store_true", help="only re-decide the verdict from the stored numbers")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    path, t0 = RESULTS / "repro_qad.json", time.time()
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if a.from_results:
        per_seed, steps, fp_steps, lr = stored["per_seed"], stored["steps"], stored["fp_steps"], stored["lr"]
        seconds = stored.get("seconds")
    else:
        per_seed, steps, fp_steps, lr = {}, a.steps, a.fp_steps, a.lr
        with tempfile.TemporaryDirectory() as tmp:
            for seed in a.seeds:
                per_seed[str(seed)] = seed_rows(seed, Path(tmp), steps, fp_steps, lr)
                print(seed, json.dumps(per_seed[str(seed)]), flush=True)
        seconds = round(time.time() - t0, 1)
    result = {"method": "qad", **summarize(per_seed, steps, fp_steps, lr), "steps": steps, "fp_steps": fp_steps,
              "lr": lr, "seconds": seconds, "finished": stored.get("finished") if a.from_results else
              time.strftime("%Y-%m-%d %H:%M:%S")}
    if a.from_results:
        result["verdict_recomputed"] = time.strftime("%Y-%m-%d %H:%M:%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2))
    tmp_path.replace(path)
    print(result["table_md"], "\n", result["verdict_text"], "\n", result["analysis"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
