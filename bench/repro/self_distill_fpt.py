"""Self-distillation for further pre-training at CPU scale (spec section 8.7, shortened), through stillroom's runner.

Source domain: 3,000 procedural 8x8 "glyphs" (random strokes, boxes, bars and rings; numpy, seed 0). theta_0: a
tiny MAE ViT (d 48, 4 blocks, 4 heads, 2x2 patches, decoder d 32 x 2) MAE-pre-trained on the glyphs through
the one loop (once, seed 0). Target domain: digits with the hash split (about 1,430 unlabelled training
images; 10 labelled per class for fine-tuning; about 370 held-out images as the test set). Per seed:

* A: fine-tune theta_0;
* B: further-pre-train theta_0 on the digits (MAE, mask 0.75, norm_pix), then fine-tune;
* C: self-distillation: the student from theta_0, MAE + ||h_s - sg(h_B)||^2 on the unmasked [CLS] (teacher:
  B's encoder), the same steps, then fine-tune;
* D: C with the regression replaced by L2-SP to theta_0's encoder weights (weight 0.01).

Fine-tuning: the encoder converted to a ViT classifier (``student_classifier/``), ``method: sft`` on 10
images per class (``classifier.train_images_per_class``), AdamW. Metric: held-out accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bench.repro.common import fmt, markdown_table, run_stillroom
from bench.repro.verdict import beyond_spread, paired, parts_table, verdict_fields

CLAIM = ("Self-distillation for further pre-training: starting again from theta_0 and adding a regression of the "
         "unmasked [CLS] onto the further-pre-trained encoder gives a better fine-tuned classifier than further "
         "pre-training alone (the spec's bar: C - B >= 1 point) and than the L2-SP regulariser (C > D).")
ARMS = {"A": "fine-tune theta_0", "B": "further pre-train, fine-tune", "C": "self-distillation, fine-tune",
        "D": "L2-SP to theta_0, fine-tune"}
ARCH = {"patch_size": 2, "hidden_size": 48, "layers": 4, "heads": 4, "decoder_hidden_size": 32, "decoder_layers": 2,
        "decoder_heads": 2}


def settings(quick: bool) -> dict:
    if quick:
        return dict(glyphs=300, theta0_steps=20, lengths=[5, 10], finetune_steps=10)
    # 1430 unlabelled target images at batch 64: 500 steps ~22 epochs, 2000 ~90 (the spec's 300 "deliberately
    # long" epochs are 6700 steps; out of reach here three seeds over).
    return dict(glyphs=3000, theta0_steps=600, lengths=[500, 2000], finetune_steps=160)


def glyphs(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 1, 8, 8]`` float32 in [0, 1]: each image 1-3 random strokes (lines), boxes, bars or rings."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, 8, 8), np.float32)
    yy, xx = np.mgrid[0:8, 0:8]
    for img in out[:, 0]:
        for _ in range(rng.integers(1, 4)):
            kind = rng.integers(4)
            if kind == 0:  # a stroke between two random points
                (y0, x0), (y1, x1) = rng.integers(0, 8, (2, 2))
                for t in np.linspace(0, 1, 12):
                    img[round(y0 + t * (y1 - y0)), round(x0 + t * (x1 - x0))] = 1.0
            elif kind == 1:  # a box outline
                y0, x0 = rng.integers(0, 5, 2)
                h, w = rng.integers(2, 8 - max(y0, x0), 2)
                img[y0:y0 + h + 1, [x0, min(7, x0 + w)]] = 1.0
                img[[y0, min(7, y0 + h)], x0:x0 + w + 1] = 1.0
            elif kind == 2:  # a bar
                pos = rng.integers(0, 8)
                if rng.integers(2):
                    img[pos, :] = np.maximum(img[pos, :], 0.75)
                else:
                    img[:, pos] = np.maximum(img[:, pos], 0.75)
            else:  # a ring
                cy, cx, r = rng.uniform(2, 6), rng.uniform(2, 6), rng.uniform(1.2, 3.0)
                img[np.abs(np.hypot(yy - cy, xx - cx) - r) < 0.6] = 1.0
    return out


def theta0(work: Path, s: dict) -> Path:
    """MAE-pre-train theta_0 on the glyphs through the loop (once); returns its MAE folder (+ ``_classifier``)."""
    from stillroom.config.core import TrainConfig
    from stillroom.config.mae import MaeArch
    from stillroom.data.batch import ExampleSampler
    from stillroom.domains.vision.data import ImageExample, collate_images
    from stillroom.domains.vision.hf_models import build_vit_mae
    from stillroom.domains.vision.mae import MaeForward, MaeObjective, save_mae
    from stillroom.domains.vision.models import save_classifier
    from stillroom.domains.vision.probe import mae_to_classifier
    from stillroom.train.distributed import Topology
    from stillroom.train.loop import Player, TrainJob, train

    folder = work / "theta0"
    if (folder / "config.json").is_file():
        return folder
    images = torch.from_numpy(glyphs(s["glyphs"]))
    examples = [ImageExample(images[i], 0, f"glyph:{i}") for i in range(len(images))]
    a = MaeArch(**ARCH)
    model = build_vit_mae((1, 8, 8), patch_size=a.patch_size, hidden_size=a.hidden_size, layers=a.layers,
                          heads=a.heads, decoder_hidden_size=a.decoder_hidden_size, decoder_layers=a.decoder_layers,
                          decoder_heads=a.decoder_heads, norm_pix_loss=True, seed=0)
    tc = TrainConfig(steps=s["theta0_steps"], micro_batch_size=128, lr=1e-3, weight_decay=0.05, warmup_steps=20,
                     schedule="cosine", precision="fp32", keep_checkpoints=1, log_every=100, betas=(0.9, 0.95))
    job = TrainJob(train=tc, seed=0, run_dir=work / "theta0_training", run_name="theta0",
                   players=[Player("theta0", model, MaeObjective(MaeForward(model, seed=0, shift=1)))],
                   examples=examples, collate=collate_images, topology=Topology(), device=torch.device("cpu"),
                   sampler=ExampleSampler, log=lambda _m: None, unit="img")
    train(job)
    save_mae(model, folder)
    save_classifier(mae_to_classifier(model, 10, seed=0), work / "theta0_classifier",
                    extra={"classes": [str(i) for i in range(10)]})
    return folder


def _mae_run(name: str, work: Path, seed: int, steps: int, start: Path, teacher: Path | None = None,
             before: bool = False, **method) -> dict:
    """The report of one further-pre-training run (``before``: also evaluate theta_0)."""
    cfg = {"name": name, "output_dir": str(work / "runs"), "cache_dir": str(work / "cache"), "seed": seed,
           "domain": "mae", "baseline": False,
           "mae": {"dataset": "digits", "mask_ratio": 0.75, "norm_pix_loss": True, "student_path": str(start),
                   "probe_max_iter": 300, "probe_images_per_class": 10},
           "train": {"steps": steps, "micro_batch_size": 64, "lr": 1e-3, "weight_decay": 0.01,
                     "betas": [0.9, 0.95], "warmup_steps": 0, "schedule": "linear", "precision": "fp32",
                     "threads": 1, "keep_checkpoints": 1, "log_every": 100},
           "eval": {"before": before}, **method}
    if teacher is not None:
        cfg["mae"]["teacher"] = {"path": str(teacher)}
    return json.loads((run_stillroom(cfg) / "report.json").read_text())


def finetune(name: str, work: Path, seed: int, s: dict, classifier: Path) -> float:
    cfg = {"name": f"ft_{name}", "output_dir": str(work / "runs"), "cache_dir": str(work / "cache"), "seed": seed,
           "domain": "classifier", "method": "sft", "baseline": False,
           "classifier": {"dataset": "digits", "student_path": str(classifier), "train_images_per_class": 10,
                          "teacher": {"steps": 30, "seed": 0}},
           "loss": {"terms": [{"name": "ce"}]},
           "train": {"steps": s["finetune_steps"], "micro_batch_size": 32, "lr": 1e-3, "weight_decay": 0.01,
                     "warmup_steps": 10, "schedule": "cosine", "precision": "fp32", "threads": 1,
                     "keep_checkpoints": 1, "log_every": 100},
           "eval": {"before": False}}
    report = json.loads((run_stillroom(cfg) / "report.json").read_text())
    return report["student_after"]["accuracy"]


def main(seeds: list[int], work: Path, quick: bool) -> dict:
    """Per seed and further-pre-training length: B, C (teacher: B of the same length) and, at the longest, D;
    each arm's 10-per-class probe (from its run's report) and its accuracy after fine-tuning."""
    s = settings(quick)
    start = theta0(work, s)
    acc: dict = {str(n): {arm: [] for arm in ARMS} for n in s["lengths"]}
    probe: dict = {str(n): {arm: [] for arm in ARMS} for n in s["lengths"]}
    longest = s["lengths"][-1]
    for seed in seeds:
        for n in s["lengths"]:
            rb = _mae_run(f"B{n}_s{seed}", work, seed, n, start, method="sft", before=True)
            b = work / "runs" / f"B{n}_s{seed}"
            rc = _mae_run(f"C{n}_s{seed}", work, seed, n, start, method="self_distill_fpt", teacher=b / "student",
                          self_distill_fpt={"regularizer": "regression", "weight": 1.0})
            folders = {"A": work / "theta0_classifier", "B": b / "student_classifier",
                       "C": work / "runs" / f"C{n}_s{seed}" / "student_classifier"}
            reports = {"A": rb["student_before"], "B": rb["student_after"], "C": rc["student_after"]}
            if n == longest:
                rd = _mae_run(f"D{n}_s{seed}", work, seed, n, start, method="self_distill_fpt",
                              self_distill_fpt={"regularizer": "l2sp", "weight": 0.01})
                folders["D"] = work / "runs" / f"D{n}_s{seed}" / "student_classifier"
                reports["D"] = rd["student_after"]
            for arm, folder in folders.items():
                acc[str(n)][arm].append(finetune(f"{arm}{n}_s{seed}", work, seed, s, folder))
                probe[str(n)][arm].append(reports[arm]["probe_accuracy"])
            print(f"seed {seed}, {n} steps: " + ", ".join(
                f"{arm} {acc[str(n)][arm][-1]:.4f} (probe {probe[str(n)][arm][-1]:.4f})" for arm in folders),
                flush=True)
    return summarise({"finetuned": acc, "probe": probe}, s, seeds)


def resummarize(stored: dict) -> dict:
    return summarise(stored["raw"], settings(bool(stored.get("quick"))), stored["seeds"])


def summarise(raw: dict, s: dict, seeds: list[int]) -> dict:
    if "finetuned" not in raw:  # results stored before the second length: one length, fine-tuning only
        raw = {"finetuned": {"500": raw}, "probe": {}}
    lengths = sorted(raw["finetuned"], key=int)
    longest = lengths[-1]

    def pts(kind: str, n: str) -> dict:
        return {k: [100 * v for v in vals] for k, vals in raw[kind].get(n, {}).items() if vals}

    ft, pr = pts("finetuned", longest), pts("probe", longest)
    table = []
    for n in lengths:
        f, p = pts("finetuned", n), pts("probe", n)
        for arm, desc in ARMS.items():
            if arm in f and (arm != "A" or n == lengths[0]):
                table.append([f"{arm}: {desc}", "-" if arm == "A" else n, fmt(f[arm], 2),
                              fmt(p[arm], 2) if arm in p else "-",
                              "-" if arm == "C" else fmt(paired(f["C"], f[arm]), 2)])
    header = ["arm", "further pre-training steps", "held-out accuracy after fine-tuning (%)",
              "linear probe, 10/class (%)", "C minus arm, fine-tuned (paired, points)"]
    parts = [
        beyond_spread(f"C beats B by at least 1 point ({longest} steps)", paired(ft["C"], ft["B"]), margin=1.0,
                      unit=" pt"),
        beyond_spread(f"C beats D (regression over L2-SP, {longest} steps)", paired(ft["C"], ft["D"]), unit=" pt"),
        beyond_spread(f"C beats A (further pre-training helps, {longest} steps)", paired(ft["C"], ft["A"]),
                      unit=" pt"),
    ]
    if pr:
        parts.append(beyond_spread(f"C beats B on the linear probe ({longest} steps)", paired(pr["C"], pr["B"]),
                                   unit=" pt"))
    if len(lengths) > 1:
        first = pts("finetuned", lengths[0])
        parts.append(beyond_spread(f"B degrades from {lengths[0]} to {longest} steps (the over-fitting premise)",
                                   paired(first["B"], ft["B"]), unit=" pt"))
    verdict = verdict_fields(parts, [parts[0].name])
    analysis = (" ".join(f"{p.name}: {p.evidence(2)} -> {'held' if p.held else 'not held'}." for p in parts)
                + f" Verdict (required: the spec's pass bar C - B >= 1 point): {verdict['verdict_text']}."
                f" Caveats: further pre-training of {', '.join(lengths)} steps of batch 64 (about "
                f"{', '.join(str(int(n) * 64 // 1430) for n in lengths)} epochs; the spec's 300 'deliberately long' "
                "epochs are not reached) and theta_0 from "
                f"{s['theta0_steps']} steps on {s['glyphs']} glyphs; one theta_0 (seed 0) for every seed; "
                "~370 held-out images (one image = 0.27 points); fine-tuning on 100 images is noisy (see the spread).")
    setting = (f"source: {s['glyphs']} procedural 8x8 glyphs; theta_0: MAE ViT d 48 x 4 blocks, {s['theta0_steps']} "
               f"steps (batch 128, norm_pix, seed 0); target: digits (hash split 0.2); B/C/D: {' or '.join(lengths)} "
               "AdamW steps (lr 1e-3, wd 0.01, betas 0.9/0.95, linear decay, batch 64, mask 0.75, norm_pix) from "
               "theta_0; C's teacher is B's encoder (same seed and length); D (at the longest): L2-SP weight 0.01; "
               f"fine-tune: the encoder as a ViT classifier, {s['finetune_steps']} AdamW steps (lr 1e-3, batch 32) on "
               "10 labelled images per class; probe: logistic regression on 10 images per class; seeds "
               f"{seeds}; all through `stillroom run`.")
    return {"claim": CLAIM, "setting": setting, "table_md": markdown_table(header, table) + "\n\n" +
            parts_table(parts, 2), **verdict, "analysis": analysis, "raw": raw}
