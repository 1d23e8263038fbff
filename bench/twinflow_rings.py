"""TwinFlow at CPU scale (spec 13.5, shortened), through stillroom's own runner (``domain: generative``).

Data: the rings toy (4 classes x 8 Gaussian modes, std 0.05; 20k training / 4k held-out points). Stage 0 (per
seed): the rectified-flow MLP (4 x 128) of ``stillroom/recipes/twinflow_rings.yaml``, trained here and cached
(8000 steps, spec: 10k). Arms, each from the same stage-0 weights copied into the twinflow network (``tt``
input at zero), batch 256, at two lengths: 5000 steps (the spec's; arms B/C/D) and 2000 (shortened; arms
B2/C2/D2, run first, and the only length of this script's first version):

* A: the stage-0 model itself, sampled with 1 and 2 Euler steps (deterministic ODE);
* B: any-step training only (``twinflow.adversarial: false``: groups e2e/mul/any, no adv group, no
  rectification; target enhancement on, as in C);
* C: TwinFlow in full (4 groups + rectification);
* D: C without target enhancement (``twinflow.enhance: false``).

Metrics (1000 samples per class from the same noise for every model, against the held-out data): SWD and
RBF-MMD^2 per class (averaged), mode precision and recall against the exact mixture, at 1 NFE and 2 NFE (B, C,
D: TwinFlow's "few" sampler, x_hat at tt = 0 then fresh noise to t = 0.6, the released 2-NFE gaps [0.001, 0.6]).
Pass (spec): C's 1-NFE SWD <= 0.7 x B's, held only beyond the seed spread.

    python bench/twinflow_rings.py [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.repro.verdict import beyond_spread, parts_table, verdict_fields  # noqa: E402

METHOD = "twinflow_rings"
CLAIM = ("TwinFlow: training one network as generator, real score and fake score (the negative-time branch on its "
         "own one-step samples, and the self-adversarial rectification) gives high one-step quality without a "
         "teacher: C's 1-NFE SWD <= 0.7 x B's (any-step training alone), and far better than the flow model at one "
         "Euler step (A).")
ARMS = {"A": "stage-0 flow model, Euler", "B": "any-step only (no adv, no rectification)", "C": "TwinFlow full",
        "D": "TwinFlow without target enhancement", "B2": "B at 2000 steps", "C2": "C at 2000 steps",
        "D2": "D at 2000 steps"}
OVERRIDES = {"B": {"adversarial": False}, "C": {}, "D": {"enhance": False}}
TRAINED = ("C", "B", "D", "C2", "B2", "D2")
METRICS = ("swd_data", "mmd_data", "mode_precision", "mode_recall")


def settings(quick: bool) -> dict:
    if quick:
        return dict(teacher_steps=40, steps=8, short_steps=5, samples=40)
    return dict(teacher_steps=8000, steps=5000, short_steps=2000, samples=1000)


def arm_config(arm: str, work: Path, seed: int, s: dict) -> dict:
    cfg = yaml.safe_load((ROOT / "stillroom" / "recipes" / "twinflow_rings.yaml").read_text())
    cfg.update(name=f"{arm}_s{seed}", output_dir=str(work / "runs"), cache_dir=str(work / "cache"), seed=seed)
    cfg["generative"]["teacher"]["steps"] = s["teacher_steps"]
    cfg["generative"]["eval"]["samples_per_class"] = s["samples"]
    cfg["twinflow"] = {**cfg["twinflow"], **OVERRIDES[arm[0]]}
    steps = s["short_steps"] if arm.endswith("2") else s["steps"]
    cfg["train"].update(steps=steps, log_every=max(1, steps // 4))
    cfg["eval"] = {"before": False}
    return cfg


def measure(model, data, s: dict, *, steps: int, few: bool) -> dict:
    """The metrics of ``model`` sampled at ``steps`` NFE (``few``: TwinFlow's stochastic sampler)."""
    from stillroom.domains.generative.data import balanced_labels
    from stillroom.domains.generative.evaluate import point_metrics
    from stillroom.domains.generative.sampling import generate

    labels = balanced_labels(s["samples"] * data.num_classes, data.num_classes)
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    with torch.no_grad():
        noise = model.convention.prior((len(labels), 2), generator=gen)
        fractions = [1.0, 0.6] if few and steps == 2 else None
        x = generate(model, noise, labels, steps=steps, stochastic=few, generator=gen, fractions=fractions)
    row = point_metrics(x.float(), labels, data, None, None, projections=256)
    return {k: row[k] for k in METRICS}


def run_seed(seed: int, work: Path, s: dict, out: dict) -> None:
    from stillroom.config.schema import RunConfig
    from stillroom.run import run
    from stillroom.domains.generative.data import build_splits
    from stillroom.domains.generative.models import load_denoiser

    first = arm_config("C", work, seed, s)
    sec0 = RunConfig.model_validate(first).generative
    out["stage0_cached"].append(_teacher_folder(work, sec0, build_splits(sec0, cache_dir=None, run_seed=seed),
                                                seed).is_dir())
    for arm in TRAINED:
        cfg = arm_config(arm, work, seed, s)
        run_dir = run(RunConfig.model_validate(cfg), overwrite=True, log=lambda _m: None)  # stage 0 stays cached
        sec = RunConfig.model_validate(cfg).generative
        data = build_splits(sec, cache_dir=None, run_seed=seed)
        student = load_denoiser(run_dir / "student")
        for nfe in (1, 2):
            out[arm][nfe].append(measure(student, data, s, steps=nfe, few=True))
        if arm == "C":
            teacher = load_denoiser(_teacher_folder(work, sec, data, seed))
            for nfe in (1, 2):
                out["A"][nfe].append(measure(teacher, data, s, steps=nfe, few=False))
            out["teacher50"].append(measure(teacher, data, s, steps=50, few=False))
        print(f"seed {seed} arm {arm}: 1-NFE SWD {out[arm][1][-1]['swd_data']:.4f} (A {out['A'][1][-1]['swd_data']:.4f})",
              flush=True)


def _teacher_folder(work: Path, sec, data, seed: int) -> Path:
    """The cached stage-0 folder the runs of ``seed`` read (the domain's cache key)."""
    from stillroom.domains.generative.teacher import teacher_key
    from stillroom.models.builtin import cache_root

    return cache_root(str(work / "cache")) / "generative_teachers" / teacher_key(sec.teacher, data, seed)


def mean_std(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{float(t.mean()):.4f} ± {float(t.std()) if len(values) > 1 else 0.0:.4f}"


def summarise(out: dict, s: dict, seeds: list[int], seconds: float) -> dict:
    header = "| arm | NFE | SWD | MMD^2 | mode precision | mode recall |\n|---|---|---|---|---|---|"
    rows = [header]
    for arm, label in ARMS.items():
        for nfe in (1, 2):
            vals = [[r[k] for r in out[arm][nfe]] for k in METRICS]
            rows.append(f"| {arm}: {label} | {nfe} | " + " | ".join(mean_std(v) for v in vals) + " |")
    vals = [[r[k] for r in out["teacher50"]] for k in METRICS]
    rows.append("| stage-0 flow model, 50 Euler steps (reference) | 50 | " + " | ".join(mean_std(v) for v in vals) + " |")
    swd = {arm: [r["swd_data"] for r in out[arm][1]] for arm in ARMS}
    parts = [
        beyond_spread("C's 1-NFE SWD <= 0.7 x B's, 5000 steps (0.7 B - C)", [0.7 * b - c for b, c in zip(swd["B"], swd["C"])]),
        beyond_spread("C beats B at 1 NFE, 5000 steps (SWD, B - C)", [b - c for b, c in zip(swd["B"], swd["C"])]),
        beyond_spread("C beats A at 1 NFE (SWD, A - C)", [a - c for a, c in zip(swd["A"], swd["C"])]),
        beyond_spread("C beats D at 1 NFE, 5000 steps (SWD, D - C: enhancement helps)",
                      [d - c for d, c in zip(swd["D"], swd["C"])]),
        beyond_spread("C2's 1-NFE SWD <= 0.7 x B2's, 2000 steps (0.7 B2 - C2)",
                      [0.7 * b - c for b, c in zip(swd["B2"], swd["C2"])]),
        beyond_spread("C2 beats B2 at 1 NFE, 2000 steps (SWD, B2 - C2)", [b - c for b, c in zip(swd["B2"], swd["C2"])]),
    ]
    fields = verdict_fields(parts, [parts[0].name])
    fields["analysis"] = analysis(out, parts, s)
    table = "\n".join(rows) + "\n\n" + parts_table(parts)
    return {"method": METHOD, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "claim": CLAIM,
            "setting": (f"rings (4 classes x 8 modes, std 0.05), 20k/4k points; stage 0: rf MLP 4 x 128, "
                        f"{s['teacher_steps']} AdamW steps (lr 2e-3, batch 256, cosine) per seed (spec: 10k); arms "
                        f"B/C/D: {s['steps']} steps (the spec's), B2/C2/D2: {s['short_steps']} steps, batch 256, lr 3e-4 constant, EMA 0.99, RCGM N=2, "
                        f"enhanced_ratio 0.5, dist_match_cof 0.5; {s['samples']} samples per class from the same "
                        f"noise; 2 NFE: Euler for A, the 'few' sampler (fractions 1.0, 0.6, fresh noise) for B/C/D; "
                        f"seeds {seeds}; through `stillroom run` (bench/twinflow_rings.py)."),
            "table_md": table, **fields, "seeds": seeds, "seconds": round(seconds),
            "raw": {k: v for k, v in out.items()}}


def analysis(out: dict, parts: list, s: dict) -> str:
    """The measured story in words: each part's evidence, the arms' 1-NFE precision, the caveats."""
    def m(arm: str, nfe: int, key: str) -> float:
        vals = [r[key] for r in out[arm][nfe]]
        return sum(vals) / len(vals)

    lines = [f"{p.name}: {p.evidence()} -> {'held' if p.held else 'not held'}." for p in parts]
    lines.append("1-NFE mode precision / recall: " + "; ".join(
        f"{arm} {m(arm, 1, 'mode_precision'):.3f} / {m(arm, 1, 'mode_recall'):.3f}" for arm in ARMS)
        + f"; the stage-0 model at 50 steps {sum(r['mode_precision'] for r in out['teacher50']) / len(out['teacher50']):.3f}"
        " / " + f"{sum(r['mode_recall'] for r in out['teacher50']) / len(out['teacher50']):.3f}.")
    swd1 = {arm: m(arm, 1, "swd_data") for arm in ARMS}
    swd2 = {arm: m(arm, 2, "swd_data") for arm in ARMS}
    gain = {n: 100 * (1 - swd1[f"C{n}"] / swd1[f"B{n}"]) for n in ("", "2")}
    lines.append(
        f"Reading: without any teacher at training time the one-step student C improves on the flow model at one "
        f"Euler step (A) by a factor {swd1['A'] / swd1['C']:.1f} in SWD. The fake branch and the rectification (C vs "
        f"B) lower the 1-NFE SWD by {gain['']:.0f}% at {s['steps']} steps and {gain['2']:.0f}% at "
        f"{s['short_steps']} (the spec asks for 30%); from {s['short_steps']} to {s['steps']} steps B's SWD goes "
        f"{swd1['B2']:.3f} -> {swd1['B']:.3f} and C's {swd1['C2']:.3f} -> {swd1['C']:.3f}. Target enhancement "
        f"(C vs D): SWD {swd1['C']:.3f} with it, {swd1['D']:.3f} without, mode precision "
        f"{m('C', 1, 'mode_precision'):.3f} vs {m('D', 1, 'mode_precision'):.3f}; guidance baked into the target "
        "pulls each class toward its own modes, so it is expected to move samples away from the unguided data "
        "these metrics compare with (not separately tested). The 2-NFE 'few' sampler (fresh noise to t = 0.6) "
        f"gives C {swd2['C']:.3f} against {swd1['C']:.3f} at one step. Order of work, for the record: the "
        f"{s['short_steps']}-step arms were run first (the only length of the script's first version; C2 vs B2 "
        "did not reach the 30% bar); one seed at 5000 steps then showed B degrading with longer training, and the "
        "script was extended to the spec's 5000 steps, where the required part is read.")
    cached = sum(out.get("stage0_cached", []))
    if cached:
        lines.append(f"The stage-0 models of {cached} of {len(out['stage0_cached'])} seeds were read from the cache of "
                     "an earlier run of this script, so the wall time excludes their training (about 100 s each).")
    lines.append(f"Caveats: shortened for a shared 2-core CPU ({s['teacher_steps']} stage-0 steps instead of 10k, "
                 f"the shortened arms {s['short_steps']} TwinFlow steps); lr 3e-4 instead of the released 1e-5 (a small MLP "
                 "trained for few steps); B keeps target enhancement and the RCGM target, so B vs C isolates the adv "
                 "group and the rectification.")
    return " ".join(lines)


def from_results() -> None:
    """Re-decide the verdict and the analysis from the stored per-seed numbers (no experiment is re-run)."""
    path = ROOT / "bench" / "results" / f"{METHOD}.json"
    stored = json.loads(path.read_text())
    raw = stored["raw"]
    out = {arm: {int(k): v for k, v in raw[arm].items()} for arm in ARMS} | {
        "teacher50": raw["teacher50"], "stage0_cached": raw.get("stage0_cached", [])}
    s = settings(False)
    result = summarise(out, s, stored["seeds"], stored["seconds"]) | {"finished": stored["finished"]}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(result["table_md"])
    print(result["analysis"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny steps; results not saved)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--from-results", action="store_true", help="re-decide from bench/results (no runs)")
    args = parser.parse_args()
    if args.from_results:
        from_results()
        return
    s = settings(args.quick)
    work = Path(args.work or tempfile.mkdtemp(prefix="twinflow_bench_"))
    out: dict = {arm: {1: [], 2: []} for arm in ARMS} | {"teacher50": [], "stage0_cached": []}
    t0 = time.time()
    for seed in args.seeds:
        run_seed(seed, work, s, out)
    result = summarise(out, s, args.seeds, time.time() - t0)
    if args.quick:
        print(result["table_md"])
        return
    path = ROOT / "bench" / "results" / f"{METHOD}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(result["table_md"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
