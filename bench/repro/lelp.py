"""LELP at CPU scale (spec llm-methods.md section 11), through stillroom's own runner.

Task: scikit-learn's 8x8 digits grouped into two classes, even and odd (``classifier.class_groups:
parity``), the classifier domain's hash split (about 1440 training / 360 held-out images). Teacher: an MLP
64-256-64-2 trained here with cross-entropy on the 2-class task (teacher seed 0 for every student seed,
cached). Student: an MLP 64-16-(2 or 2 x S), from the run's seed, the same steps and image order in
every arm:

* CE: cross-entropy on the 2-class labels (``method: sft``);
* KD: vanilla KD, forward KL to the teacher's 2-class distribution (``method: kd``, T = 1);
* LELP: forward KL to the teacher's subclass distribution, S = 4, beta = 1, no labels (``method: lelp``);
* LELP+CE: LELP with ``lelp.alpha = 1`` (CE on the aggregated classes).

Metrics: held-out accuracy on the 2 classes (``report.json``), and how well the student's most probable
output recovers the hidden digit: NMI(argmax output, digit) on the held-out images (for CE / KD the
argmax is one of 2 classes; for LELP one of 8 subclasses), next to the teacher's subclasses' NMI.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.repro.common import fmt, markdown_table, run_stillroom
from bench.repro.verdict import beyond_spread, paired, parts_table, verdict_fields

CLAIM = ("LELP: on a few-class task (2 classes), distilling the teacher's pseudo-subclass distribution (null "
         "space of its head, per-class PCA, random rotation, tempered softmax) into a student with S x C outputs "
         "beats vanilla KD and cross-entropy, and the pseudo-subclasses carry the hidden fine structure (here: "
         "which digit).")
ARMS = {"CE": "cross-entropy on the 2 classes", "KD": "vanilla KD (forward KL, T = 1)",
        "LELP": "LELP (S = 4, beta = 1, alpha = 0)", "LELP+CE": "LELP with alpha = 1"}
TEACHER = {"arch": {"kind": "mlp", "hidden": [256, 64]}, "steps": 400, "lr": 2e-3, "warmup_steps": 20, "seed": 0}


def settings(quick: bool) -> dict:
    if quick:
        return dict(teacher_steps=30, steps=20, batch=32, lr=5e-3)
    return dict(teacher_steps=400, steps=300, batch=64, lr=5e-3)


def arm_config(arm: str, work: Path, seed: int, s: dict) -> dict:
    method = {"CE": "sft", "KD": "kd"}.get(arm, "lelp")
    cfg = {
        "name": f"{arm}_s{seed}", "output_dir": str(work / "runs"), "cache_dir": str(work / "cache"), "seed": seed,
        "domain": "classifier", "method": method, "baseline": False,
        "classifier": {"dataset": "digits", "heldout_fraction": 0.2, "class_groups": "parity",
                       "teacher": {**TEACHER, "steps": s["teacher_steps"]}, "student": {"kind": "mlp", "hidden": [16]}},
        "loss": {"terms": [{"name": "ce" if arm == "CE" else "forward_kl"}], "loss_temperature": 1.0},
        "train": {"steps": s["steps"], "micro_batch_size": s["batch"], "lr": s["lr"], "warmup_steps": 20,
                  "schedule": "cosine", "precision": "fp32", "threads": 1, "keep_checkpoints": 1, "log_every": 100,
                  "weight_decay": 0.0},
        "eval": {"before": False},
    }
    if method == "lelp":
        cfg["lelp"] = {"subclasses": 4, "beta": 1.0, "alpha": 1.0 if arm == "LELP+CE" else 0.0}
    return cfg


def output_nmi(run_dir: Path) -> float:
    """NMI between the saved student's most probable raw output and the held-out images' digits."""
    from sklearn.metrics import normalized_mutual_info_score

    from stillroom.config.domains import ClassifierConfig
    from stillroom.domains.vision.data import build_image_splits
    from stillroom.domains.vision.subclasses import GroupedOutputs, load_grouped

    held = build_image_splits("digits", 0.2, ClassifierConfig(class_groups="parity")).heldout
    model = load_grouped(run_dir / "student")
    raw = model.inner if isinstance(model, GroupedOutputs) else model
    with torch.no_grad():
        pred = raw(torch.stack([e.image for e in held])).argmax(-1).tolist()
    return float(normalized_mutual_info_score([e.fine_label for e in held], pred))


def main(seeds: list[int], work: Path, quick: bool) -> dict:
    s = settings(quick)
    acc: dict[str, list[float]] = {arm: [] for arm in ARMS}
    nmi: dict[str, list[float]] = {arm: [] for arm in ARMS}
    info: dict[str, list[float]] = {"teacher_accuracy": [], "teacher_subclass_nmi": []}
    for seed in seeds:
        for arm in ARMS:
            run_dir = run_stillroom(arm_config(arm, work, seed, s))
            report = json.loads((run_dir / "report.json").read_text())
            acc[arm].append(report["student_after"]["accuracy"])
            nmi[arm].append(output_nmi(run_dir))
            if arm == "LELP":
                info["teacher_accuracy"].append(report["teacher"]["accuracy"])
                info["teacher_subclass_nmi"].append(
                    json.loads((run_dir / "lelp.json").read_text())["nmi_teacher_subclass_fine_label"])
            print(f"seed {seed} arm {arm}: accuracy {acc[arm][-1]:.4f}, output NMI {nmi[arm][-1]:.3f}", flush=True)
    return summarise({"accuracy": acc, "nmi": nmi}, s, seeds, info)


def resummarize(stored: dict) -> dict:
    """The summary recomputed from a stored result's per-seed numbers (no experiment is re-run)."""
    return summarise(stored["raw"], settings(bool(stored.get("quick"))), stored["seeds"], stored["teacher_info"])


def summarise(raw: dict, s: dict, seeds: list[int], info: dict) -> dict:
    pts = {k: [100 * v for v in vals] for k, vals in raw["accuracy"].items()}
    nmi = raw["nmi"]
    header = ["arm", "held-out accuracy (%)", "LELP minus arm (paired, points)", "NMI(argmax output, digit)"]
    table = [[f"{arm}: {desc}", fmt(pts[arm], 2), "-" if arm == "LELP" else fmt(paired(pts["LELP"], pts[arm]), 2),
              fmt(nmi[arm], 3)] for arm, desc in ARMS.items()]
    parts = [
        beyond_spread("LELP beats KD", paired(pts["LELP"], pts["KD"]), unit=" pt"),
        beyond_spread("LELP beats CE", paired(pts["LELP"], pts["CE"]), unit=" pt"),
        beyond_spread("LELP's subclasses carry more of the digit than KD's classes (NMI)",
                      paired(nmi["LELP"], nmi["KD"])),
        beyond_spread("LELP+CE beats CE", paired(pts["LELP+CE"], pts["CE"]), unit=" pt"),
    ]
    verdict = verdict_fields(parts, [parts[0].name, parts[1].name])
    t_acc, t_nmi = info.get("teacher_accuracy") or [float("nan")], info.get("teacher_subclass_nmi") or [float("nan")]
    analysis = (f"Teacher (MLP [256, 64], 2 classes): held-out accuracy {100 * t_acc[0]:.1f}%; its 8 pseudo-"
                f"subclasses' NMI with the digit {t_nmi[0]:.3f}. " + " ".join(
                    f"{p.name}: {p.evidence(3)} -> {'held' if p.held else 'not held'}." for p in parts)
                + f" Verdict (required: LELP beats KD and CE beyond the seed spread): {verdict['verdict_text']}."
                " Caveats: 8x8 digits, ~360 held-out images (one image = 0.28 points); S and beta were not tuned "
                "(the recipe's defaults); one teacher; the NMI of a 2-way argmax is bounded by the 2-class "
                "partition, so the NMI part shows that the extra outputs carry digit structure, not that LELP "
                "recovers the digits better than a clustering would.")
    setting = (f"digits 8x8 grouped by parity into 2 classes, hash split (held-out fraction 0.2); teacher MLP "
               f"[256, 64] trained here ({s['teacher_steps']} AdamW steps, seed 0, cached); student MLP [16]; "
               f"{s['steps']} AdamW steps (lr {s['lr']}, cosine, batch {s['batch']}) per arm, same image order per "
               f"seed; seeds {seeds}; all through `stillroom run`.")
    return {"claim": CLAIM, "setting": setting, "table_md": markdown_table(header, table) + "\n\n" +
            parts_table(parts, 3), **verdict, "analysis": analysis, "raw": raw, "teacher_info": info}
