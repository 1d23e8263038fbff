"""OGEN at CPU scale (spec section 6.6) on the CLIP trained here, through `stillroom run` (domain clip).

The CLIP: the ``ogen_digits`` recipe's (a CLIPVision d 64 x 2 image tower at 32x32 and the frozen pretrained
MiniLM text tower, trained contrastively on scenes, shapes and digits captions for 600 steps, seed 0), trained
once and cached, the same for every arm and seed. Fine-tuning: digits 0-4 are base classes with 16 shots each
(a draw per seed), 5-9 are new (names only); 300 epochs (one step of 80 images each), deliberately long. Arms
(the spec's): A prompt residual with CE on base only (CoOp-like); B A + local-mean-teacher self-distillation;
C A + synthesised unknown features (generator over the 3 nearest base classes, trained leave-one-class-out);
D B + C (OGEN); and E, D with unknown names from another data set (shapes), as the paper draws them. Two
settings: the prompt residual alone (the recipe), and with an image adapter at a 5x learning rate. Metrics:
held-out base accuracy (base images among base classes), new accuracy (new images among new classes),
harmonic mean H, final and over epochs (every 10).

    .venv/bin/python bench/ogen_repro.py                  # 3 seeds x 5 arms x 2 settings: results/repro_ogen.json
    .venv/bin/python bench/ogen_repro.py --from-results   # re-decide the verdict from the stored numbers
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

from bench.repro.common import RESULTS, fmt, markdown_table  # noqa: E402
from bench.repro.verdict import beyond_spread, paired, parts_table, verdict_fields  # noqa: E402

CLAIM = ("OGEN: fine-tuning a CLIP's prompts on base classes alone overfits them and loses zero-shot accuracy on "
         "new classes; synthesised unknown-class features and local-mean-teacher self-distillation counter it, "
         "and both together (D) end with the best new-class accuracy (the spec's bar: D - A >= 3 points) and "
         "harmonic mean.")
ARMS = {"A": (False, False, "CE on base (CoOp-like)"), "B": (False, True, "A + local mean teacher"),
        "C": (True, False, "A + synthesised unknowns"), "D": (True, True, "OGEN (B + C)"),
        "E": (True, True, "D, unknown names from shapes (disjoint from the test classes)")}
SHAPE_NAMES = "[a circle, a square, a triangle, a cross, a ring]"
"""Arm E's unknown names: another data set's class names (the paper's setting), not the new classes'."""
SETTINGS = {"prompt": ("prompt residual only, lr 2e-3 (the recipe)", []),
            "adapter": ("prompt residual + image adapter, lr 1e-2", ["ogen.image_adapter=true", "train.lr=1e-2"])}


def run_arm(setting: str, arm: str, seed: int, work: Path, epochs: int) -> dict:
    """One arm and seed through stillroom's own runner (`stillroom run ogen_digits ...`); returns ogen.json."""
    from stillroom.config.load import load_config
    from stillroom.run import run

    synthesis, self_distill, _ = ARMS[arm]
    overrides = [f"name={setting}_{arm}_s{seed}", f"output_dir={work / 'runs'}", f"cache_dir={work / 'cache'}",
                 f"seed={seed}", f"train.steps={epochs}", f"ogen.synthesis={str(synthesis).lower()}",
                 f"ogen.self_distill={str(self_distill).lower()}", "train.log_every=10", "ogen.eval_every_epochs=10",
                 *SETTINGS[setting][1], *([f"ogen.unknown_names={SHAPE_NAMES}"] if arm == "E" else [])]
    cfg = load_config(ROOT / "stillroom" / "recipes" / "ogen_digits.yaml", overrides)
    run_dir = run(cfg, overwrite=True, log=lambda m: print(m, flush=True) if "clip:" in m or "ogen:" in m else None)
    return json.loads((run_dir / "ogen.json").read_text())


def setting_rows(raw: dict, seeds: list[int]) -> tuple[list, dict]:
    """Table rows of one setting (zero-shot start, then the arms) and the per-arm final points per seed."""
    pts = {arm: {k: [100 * raw[arm][str(s)]["final"][k] for s in seeds] for k in ("base", "new", "hm")}
           for arm in ARMS}
    peak = {arm: [100 * max(c["new"] for c in raw[arm][str(s)]["curve"]) for s in seeds] for arm in ARMS}
    zs = {k: [100 * raw["A"][str(s)]["zero_shot"][k] for s in seeds] for k in ("base", "new", "hm")}
    rows = [["zero-shot (no fine-tuning)", fmt(zs["base"], 1), fmt(zs["new"], 1), "-", fmt(zs["hm"], 1)]]
    rows += [[f"{arm}: {ARMS[arm][2]}", fmt(pts[arm]["base"], 1), fmt(pts[arm]["new"], 1), fmt(peak[arm], 1),
              fmt(pts[arm]["hm"], 1)] for arm in ARMS]
    return rows, {**pts, "zero_shot": zs}


def summarize(raw: dict, epochs: int, seeds: list[int], diag: dict | None = None) -> dict:
    header = ["arm", "base acc (%)", "new acc, final (%)", "new acc, best epoch (%)", "H (%)"]
    tables, parts, required = [], [], []
    for setting, (about, _) in SETTINGS.items():
        if setting not in raw:
            continue
        rows, pts = setting_rows(raw[setting], seeds)
        tables.append(f"**{setting}**: {about}\n\n" + markdown_table(header, rows))
        new = {arm: pts[arm]["new"] for arm in ARMS}
        bar = beyond_spread(f"{setting}: D beats A on new classes by at least 3 points", paired(new["D"], new["A"]),
                            margin=3.0, unit=" pt")
        parts += [bar,
                  beyond_spread(f"{setting}: D beats A on H", paired(pts["D"]["hm"], pts["A"]["hm"]), unit=" pt"),
                  beyond_spread(f"{setting}: A loses new-class accuracy against zero-shot (the pitfall)",
                                paired(pts["zero_shot"]["new"], new["A"]), unit=" pt"),
                  beyond_spread(f"{setting}: B beats A on new classes", paired(new["B"], new["A"]), unit=" pt"),
                  beyond_spread(f"{setting}: C beats A on new classes", paired(new["C"], new["A"]), unit=" pt"),
                  beyond_spread(f"{setting}: E (disjoint unknown names) beats A on new classes",
                                paired(new["E"], new["A"]), unit=" pt")]
        required.append(bar.name)
    verdict = verdict_fields(parts, required)
    analysis = (" ".join(f"{p.name}: {p.evidence(1)} -> {'held' if p.held else 'not held'}." for p in parts)
                + f" Verdict (required: the spec's bar D - A >= 3 points on new classes, in every setting): "
                f"{verdict['verdict_text']}. " + diagnosis_text(diag) + " Caveats: one small CLIP (32x32, 2 "
                "blocks, frozen MiniLM text tower) trained here for 600 steps with 96% zero-shot accuracy on "
                "digits, so there is little to lose or regain; 5 new classes x ~34 held-out images each (one "
                "image = 0.6 points); "
                "the unknown names are the new classes' own names (spec 6.6): synthesis sees their names, never "
                "their images.")
    setting = (f"digits resized to 32x32 RGB; base classes 0-4 with 16 shots per class (drawn per seed), new 5-9; "
               f"{epochs} epochs of one 80-image step (AdamW, cosine); prompt residual A (64x64, init 0), and in the "
               "adapter setting an image adapter B (init 0); k_nn 3, generator 300 leave-one-class-out Adam steps; "
               f"lambda_sd 1, window max(1, floor(0.2 e)); seeds {seeds}; all through `stillroom run ogen_digits` "
               "(domain clip) in one process.")
    return {"claim": CLAIM, "setting": setting, "table_md": "\n\n".join(tables) + "\n\n" + parts_table(parts, 1),
            **verdict, "analysis": analysis, "raw": raw, "seeds": seeds, "epochs": epochs, "diagnosis": diag or {}}


def diagnose(work: Path, seeds: list[int]) -> dict:
    """Per seed and new class: the cosine of the synthesised features (20 draws, the seed's generator) to the class's
    mean real held-out feature, which real class mean they are nearest to, and the cosine of the class's text
    feature to that mean (the zero-shot weight the synthesis competes with). Held-out images are read here only."""
    import glob

    import torch
    import torch.nn.functional as F

    from stillroom.config.load import load_config
    from stillroom.domains.vl.clip_data import build_clip_splits
    from stillroom.domains.vl.clip_model import load_image_text
    from stillroom.methods.ogen_data import ogen_data
    from stillroom.methods.ogen_parts import sample_neighbours

    cfg = load_config(ROOT / "stillroom" / "recipes" / "ogen_digits.yaml", [])
    clip = load_image_text(sorted(glob.glob(str(work / "cache" / "clips" / "*" / "model")))[0])
    data = build_clip_splits(cfg.clip, None, 0)
    out = {}
    for seed in seeds:
        d = ogen_data(clip, data, cfg.ogen, cfg.clip.templates, seed=seed, log=lambda m: None)
        order = d.new + d.base
        means = torch.stack([F.normalize(d.heldout_nd[d.heldout_labels == k].mean(0), dim=0) for k in order])
        gen, rows = torch.Generator().manual_seed(seed), {}
        for u, c in enumerate(d.new):
            unknown = d.unknown_ud[u].repeat(20, 1)
            synth = d.generator(unknown, *sample_neighbours(d.text_cd[d.base], d.bank, unknown, cfg.ogen.k_nn, gen))
            sims = (synth @ means.T).mean(0)
            rows[str(c)] = {"synth_cos": float(sims[u]), "nearest_class": order[int(sims.argmax())],
                            "text_cos": float(d.text_cd[c] @ means[u])}
        out[str(seed)] = rows
    return out


def diagnosis_text(diag: dict) -> str:
    if not diag:
        return ""
    rows = [r for per in diag.values() for r in per.values()]
    wrong = [(s, c, r["nearest_class"]) for s, per in diag.items() for c, r in per.items()
             if r["nearest_class"] != int(c)]
    base_hits = sum(1 for *_, k in wrong if k < 5)  # digits 0-4 are the base classes
    return (f"Why synthesis hurts here (bench/ogen_repro.py diagnose, {len(diag)} seeds x 5 new classes): the "
            f"synthesised features have cosine {min(r['synth_cos'] for r in rows):.2f}-"
            f"{max(r['synth_cos'] for r in rows):.2f} to their class's mean real held-out feature, and in "
            f"{len(wrong)} of {len(rows)} cases their nearest real class mean is another class ({base_hits} of "
            f"them a base class); the new classes' own text features are closer to their images (cosine "
            f"{min(r['text_cos'] for r in rows):.2f}-{max(r['text_cos'] for r in rows):.2f}). Training the residual "
            "to put the synthesised features in the new classes therefore pulls the new-class weights away from "
            "the real images: with a leave-one-out set of only 5 base classes the generator's text-to-image shift "
            "extrapolates poorly. Self-distillation changes little: the base cross-entropy falls to ~1e-4 within "
            "~50 epochs, while the window is still 1-10 snapshots, so the mean teacher follows the drift.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--diagnose", action="store_true", help="with --from-results: measure the synthesised features "
                    "again with the CLIP cached in --work")
    ap.add_argument("--from-results", action="store_true", help="only re-decide the verdict from the stored numbers")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    path, t0 = RESULTS / "repro_ogen.json", time.time()
    if a.from_results:
        stored = json.loads(path.read_text())
        diag = diagnose(a.work, stored["seeds"]) if a.diagnose else stored.get("diagnosis")
        result = {**stored, **summarize(stored["raw"], stored["epochs"], stored["seeds"], diag)}
    else:
        raw = {setting: {arm: {} for arm in ARMS} for setting in a.settings}
        with tempfile.TemporaryDirectory() as tmp:
            work = a.work or Path(tmp)
            for setting in a.settings:
                for seed in a.seeds:
                    for arm in ARMS:
                        raw[setting][arm][str(seed)] = out = run_arm(setting, arm, seed, work, a.epochs)
                        print(setting, arm, seed, json.dumps(out["final"]), flush=True)
            diag = diagnose(work, a.seeds)
        result = {**summarize(raw, a.epochs, a.seeds, diag), "seconds": round(time.time() - t0, 1),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2))
    tmp_path.replace(path)
    print(result["table_md"], "\n", result["verdict_text"], "\n", result["analysis"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
