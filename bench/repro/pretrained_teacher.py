"""A pretrained teacher matters (issue #13), at CPU scale, through stillroom's own runner.

Data: the colour ``shapes`` (10 classes, 3x32x32, images from generator seed 0 for every run seed): 100 training
images per class, of which only the first 10 per class are labelled (100 labels); 30 held-out images per class
(300, the test set). Student: CNN [16, 32, 64] (24K params), the same steps, batch and schedule in every arm.
Per seed:

* A: the student trained with cross-entropy on the 100 labelled images alone (``method: sft``,
  ``classifier.train_images_per_class: 10``);
* B: a teacher trained here from scratch on the same 100 labels (CNN [32, 64, 128], the same ``sft`` run with a
  larger architecture, seed-dependent), then the student distilled from it (``forward_kl`` at T = 2, no labels) on
  all 1000 training images;
* C: the same distillation from EfficientNet-Lite0 (ImageNet-1k, frozen) with a linear head fitted on the same
  100 labels' features at 96 px (``classifier.teacher.pretrained``; deterministic, so one teacher for every seed),
  its soft labels paid for once (``stillroom cache-teacher``, top-10 of 10 classes, fp16);
* D: C + feature distillation (``method: feature_kd``, its defaults: the student's last conv, pooled, a linear
  projector to 1280, L1 on L2-normalised features, weight 1: DMAE's released value; not swept).

Metrics (``report.json``): teacher and student held-out accuracy, ECE, top-1 agreement with the teacher.
The bar, stated before running: C - B >= 2 points beyond the seed spread; D vs C is reported as measured.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.repro.common import fmt, markdown_table, run_stillroom
from bench.repro.verdict import beyond_spread, paired, parts_table, verdict_fields

CLAIM = ("A pretrained teacher matters: with few labels (10 per class) and many unlabelled images, a small student "
         "distilled from EfficientNet-Lite0 with a head fitted on those labels beats the same student distilled "
         "from a teacher trained from scratch on the same labels (bar: by >= 2 points beyond the seed spread); "
         "adding feature distillation from the pretrained teacher is reported as measured.")
ARMS = {"A": "student, CE on the 100 labels", "B": "KD from a scratch teacher (same labels)",
        "C": "KD from EfficientNet-Lite0 + fitted head", "D": "C + feature distillation"}
STUDENT = {"kind": "cnn", "channels": [16, 32, 64]}
SCRATCH_TEACHER = {"kind": "cnn", "channels": [32, 64, 128], "dropout": 0.3}
LABELS = 10
PRETRAINED = {"backbone": "efficientnet-lite0", "size": 96, "labels_per_class": LABELS, "C": 1.0}


def settings(quick: bool) -> dict:
    if quick:
        return dict(per_class=20, held=10, steps=20, teacher_steps=20)
    return dict(per_class=100, held=30, steps=400, teacher_steps=300)


def base(name: str, work: Path, seed: int, s: dict) -> dict:
    return {
        "name": name, "output_dir": str(work / "runs"), "cache_dir": str(work / "cache"), "seed": seed,
        "domain": "classifier", "baseline": False,
        "classifier": {"dataset": "shapes", "eval_batch_size": 32, "student": STUDENT,
                       "shapes": {"classes": 10, "image_size": 32, "train_per_class": s["per_class"],
                                  "heldout_per_class": s["held"], "seed": 0}},
        "loss": {"terms": [{"name": "forward_kl"}], "loss_temperature": 2.0, "scale_by_temperature_squared": True},
        "train": {"steps": s["steps"], "micro_batch_size": 64, "lr": 3e-3, "warmup_steps": 20, "schedule": "cosine",
                  "precision": "fp32", "threads": 2, "keep_checkpoints": 1, "log_every": 1000, "weight_decay": 0.0},
        "eval": {"before": False},
    }


def few_label_run(name: str, work: Path, seed: int, s: dict, arch: dict, steps: int, teacher: dict) -> Path:
    """CE on the first ``LABELS`` training images per class (arm A, and arm B's teacher); ``teacher``: the one the
    report compares with (it does not train)."""
    cfg = base(name, work, seed, s)
    cfg.update(method="sft", loss={"terms": [{"name": "ce"}]})
    cfg["classifier"].update(train_images_per_class=LABELS, student=arch, teacher=teacher)
    cfg["train"]["steps"] = steps
    return run_stillroom(cfg)


def kd_run(arm: str, work: Path, seed: int, s: dict, teacher_path: Path | None = None) -> Path:
    cfg = base(f"{arm}_s{seed}", work, seed, s)
    sec = cfg["classifier"]
    if arm == "B":
        cfg["method"] = "kd"
        sec["teacher"] = {"path": str(teacher_path)}
    else:
        cfg["method"] = "kd" if arm == "C" else "feature_kd"
        sec.update(teacher={"pretrained": PRETRAINED}, teacher_source="store",
                   store={"path": str(work / "store"), "k": 10})
    return run_stillroom(cfg)


def write_store(work: Path, s: dict) -> None:
    """The pretrained teacher's head (fitted once, cached) and its soft labels of every training image."""
    from stillroom.config.schema import RunConfig
    from stillroom.run.cache_teacher import cache_teacher

    cfg = base("store", work, 0, s)
    cfg["classifier"].update(teacher={"pretrained": PRETRAINED}, teacher_source="store",
                             store={"path": str(work / "store"), "k": 10})
    cache_teacher(RunConfig.model_validate({**cfg, "method": "kd"}), log=lambda _m: None)


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def final_terms(run_dir: Path) -> dict:
    """Arm D's last logged per-image loss parts: how large the feature term is beside the soft-label term."""
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"feature": last["loss/feature"], "forward_kl": last["loss/forward_kl"]}


def main(seeds: list[int], work: Path, quick: bool) -> dict:
    s = settings(quick)
    write_store(work, s)
    raw: dict = {"student": {a: {"accuracy": [], "ece": [], "top1_agreement": []} for a in ARMS},
                 "teacher": {"B": {"accuracy": [], "ece": []}, "C": {"accuracy": [], "ece": []}},
                 "d_final_terms": []}
    for seed in seeds:
        runs = {"A": few_label_run(f"A_s{seed}", work, seed, s, STUDENT, s["steps"], {"pretrained": PRETRAINED})}
        teacher_b = few_label_run(f"teacherB_s{seed}", work, seed, s, SCRATCH_TEACHER, s["teacher_steps"],
                                  {"path": str(runs["A"] / "student")})  # a cheap stand-in for the report's row
        runs["B"] = kd_run("B", work, seed, s, teacher_b / "student")
        runs["C"] = kd_run("C", work, seed, s)
        runs["D"] = kd_run("D", work, seed, s)
        for arm, run_dir in runs.items():
            rep = report(run_dir)
            for k in ("accuracy", "ece", "top1_agreement"):
                raw["student"][arm][k].append(rep["student_after"][k])
            if arm in ("B", "C"):
                for k in ("accuracy", "ece"):
                    raw["teacher"][arm][k].append(rep["teacher"][k])
            if arm == "D":
                raw["d_final_terms"].append(final_terms(run_dir))
            print(f"seed {seed} arm {arm}: student {rep['student_after']['accuracy']:.4f}, teacher "
                  f"{rep['teacher']['accuracy']:.4f}", flush=True)
    return summarise(raw, s, seeds)


def resummarize(stored: dict) -> dict:
    """The summary recomputed from a stored result's per-seed numbers (no experiment is re-run)."""
    return summarise(stored["raw"], settings(bool(stored.get("quick"))), stored["seeds"])


def scale_note(raw: dict) -> str:
    """How large D's feature term ended beside its soft-label term (mean over seeds of the last logged step)."""
    terms = raw.get("d_final_terms") or []
    if not terms:
        return ""
    feat = sum(t["feature"] for t in terms) / len(terms)
    kl = sum(t["forward_kl"] for t in terms) / len(terms)
    return (f" At its default weight (1.0, a mean over 1280 channels) D's feature term ended at {feat:.4f} per image "
            f"beside {kl:.4f} for the soft-label term (last step, mean over seeds): it contributes "
            f"{100 * feat / (feat + kl):.1f}% of D's loss, so D vs C measures a small nudge, not feature "
            "distillation at a tuned weight.")


def summarise(raw: dict, s: dict, seeds: list[int]) -> dict:
    acc = {a: [100 * v for v in raw["student"][a]["accuracy"]] for a in ARMS}
    agreement_of = {"A": "Lite0 teacher", "B": "its scratch teacher", "C": "Lite0 teacher", "D": "Lite0 teacher"}
    rows = [[f"{a}: {ARMS[a]}", fmt(acc[a], 2), fmt(raw["student"][a]["ece"], 3),
             f"{fmt([100 * v for v in raw['student'][a]['top1_agreement']], 1)} ({agreement_of[a]})"] for a in ARMS]
    for a, what in (("B", "teacher B: CNN [32, 64, 128] from scratch on 100 labels"),
                    ("C", "teacher C: EfficientNet-Lite0 + head fitted on 100 labels")):
        rows.append([what, fmt([100 * v for v in raw["teacher"][a]["accuracy"]], 2),
                     fmt(raw["teacher"][a]["ece"], 3), "-"])
    header = ["model", "held-out accuracy (%)", "ECE", "top-1 agreement with the teacher (%)"]
    parts = [beyond_spread("C - B >= 2 points (Lite0 teacher over a scratch teacher)", paired(acc["C"], acc["B"]),
                           margin=2.0, unit=" pt"),
             beyond_spread("D beats C (feature distillation on top; reported, not required)",
                           paired(acc["D"], acc["C"]), unit=" pt"),
             beyond_spread("B beats A (distillation from the scratch teacher over CE on the labels)",
                           paired(acc["B"], acc["A"]), unit=" pt"),
             beyond_spread("C beats A", paired(acc["C"], acc["A"]), unit=" pt")]
    verdict = verdict_fields(parts, [parts[0].name])
    mean = {a: sum(v) / len(v) for a, v in acc.items()}
    t_b = 100 * sum(raw["teacher"]["B"]["accuracy"]) / len(raw["teacher"]["B"]["accuracy"])
    t_c = 100 * sum(raw["teacher"]["C"]["accuracy"]) / len(raw["teacher"]["C"]["accuracy"])
    analysis = (f"Teachers: the scratch CNN reaches {t_b:.1f}% held-out on 100 labels, EfficientNet-Lite0 with a "
                f"fitted head {t_c:.1f}%. Students (means): A {mean['A']:.1f}%, B {mean['B']:.1f}%, C {mean['C']:.1f}%, "
                f"D {mean['D']:.1f}%. " + " ".join(
                    f"{p.name}: {p.evidence(2)} -> {'held' if p.held else 'not held'}." for p in parts)
                + f" Verdict (the bar, C - B >= 2 points): {verdict['verdict_text']}." + scale_note(raw)
                + " Caveats: one synthetic data "
                "set of simple shapes (an ImageNet backbone's features separate them almost linearly, which favours "
                "C); the Lite0 head and its stored soft labels are the same for every seed (the fit is "
                "deterministic), so C's and D's spread is the student's alone; 300 held-out images (one image = "
                "0.33 points); the feature term ran at its default weight only (no sweep).")
    setting = (f"shapes 10 classes 3x32x32 ({s['per_class']} training / {s['held']} held-out per class, generator "
               f"seed 0), {LABELS} labels per class; student CNN [16, 32, 64], {s['steps']} AdamW steps (lr 3e-3, "
               f"cosine, batch 64); scratch teacher CNN [32, 64, 128] dropout 0.3, {s['teacher_steps']} steps of CE "
               f"on the labels; Lite0 teacher at 96 px, logistic-regression head (C 1.0) on the labelled images' "
               f"features, soft labels stored once (top-10, fp16); KD: forward_kl at T = 2 (x T^2) on every training "
               f"image, no labels; seeds {seeds}; all through `stillroom cache-teacher` / `stillroom run`.")
    return {"claim": CLAIM, "setting": setting,
            "table_md": markdown_table(header, rows) + "\n\n" + parts_table(parts, 2), **verdict,
            "analysis": analysis, "raw": raw}
