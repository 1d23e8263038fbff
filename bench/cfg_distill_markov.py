"""Diversity-rewarded CFG distillation's CPU experiment (spec 9.7) on the markov_modes toy: is the LERP curve between
a quality (beta 0) and a diversity (beta > 0) student on or above base + CFG's quality-diversity curve?

The students are real ``stillroom run cfg_distill_markov`` runs (the recipe's teacher: a LlamaForCausalLM trained
here once, teacher.seed 0, shared by all seeds; the seed changes the students' on-policy samples and the
evaluation draws). Every row samples 80 sequences per condition (eval seed = run seed) and measures Q (mean exact
log-likelihood under the true conditional generator) and D (mean pairwise 1 - cos of bag-of-bigrams, groups of 8):

* **A**: the teacher sampled without CFG; **B**: the teacher with CFG at gamma 1.5, 2, 3, 5 (2 forwards/token);
* **C**: cfg_distill at gamma 3, beta 0 (the quality model); **D**: beta 0.5 and 2 (diversity models);
* **E**: weight LERP of C and D(beta 2) at lambda 0, 0.25, 0.5, 0.75, 1 (lambda 0 is C, 1 is D(beta 2)).

Pass (spec): at matched diversity some E point has Q >= B's. Per seed: B's curve is the piecewise-linear Q(D)
through A and the B points; the margin is the best Q_E - Q_B(D_E) over E points whose D lies within the curve's
range; it holds only beyond the seed spread (``bench/repro/verdict.py``). Steps as the spec (300 updates, batch
32 conditions x 2 samples); everything fits a few minutes on 2 shared cores.

    .venv/bin/python bench/cfg_distill_markov.py       # 3 seeds -> bench/results/cfg_distill_markov.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.repro.common import RESULTS, fmt, markdown_table  # noqa: E402
from bench.repro.verdict import beyond_spread, verdict_fields  # noqa: E402

CLAIM = ("Diversity-rewarded CFG distillation (Cideron et al. 2025, spec 9): a student distilled from the CFG "
         "teacher (one forward per token) and weight-interpolated with a diversity-rewarded one lies on or above "
         "base + CFG's quality-diversity curve (at matched diversity some LERP point has Q >= CFG's)")
GAMMAS = (1.5, 2.0, 3.0, 5.0)
BETAS = (0.5, 2.0)
LAMBDAS = (0.25, 0.5, 0.75)
EVAL = ["autoregressive.eval.samples=400", "autoregressive.eval.speed_batch=64"]


def run_student(tag: str, beta: float, seed: int, out: Path, cache: Path, steps: int) -> Path:
    args = [sys.executable, "-m", "stillroom.cli.main", "run", "cfg_distill_markov", f"output_dir={out}",
            f"cache_dir={cache}", f"name={tag}-s{seed}", f"seed={seed}", f"train.steps={steps}", "baseline=false",
            f"cfg_distill.beta={beta}", *EVAL]
    subprocess.run(args, check=True, capture_output=True, text=True,
                   env={"HF_HUB_OFFLINE": "1", "PATH": "", "OMP_NUM_THREADS": "1"})
    return out / f"{tag}-s{seed}" / "student"


def seed_rows(seed: int, out: Path, cache: Path, steps: int) -> dict[str, dict]:
    """Every arm's row for one seed (see the module docstring)."""
    import torch

    from stillroom.config.load import load_config
    from stillroom.domains.autoregressive.data import build_splits
    from stillroom.domains.autoregressive.interpolate import interpolate
    from stillroom.domains.autoregressive.markov_eval import markov_row
    from stillroom.domains.autoregressive.teacher import ar_teacher, load_teacher
    from stillroom.train.distributed import Topology

    folders = {"C": run_student("C", 0.0, seed, out, cache, steps)}
    folders.update({f"D{b:g}": run_student(f"D{b:g}", b, seed, out, cache, steps) for b in BETAS})
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "stillroom" / "recipes" / "cfg_distill_markov.yaml", [f"seed={seed}", f"cache_dir={cache}",
                                             f"autoregressive.eval.seed={seed}", *EVAL])
    sec, data = cfg.autoregressive, build_splits(cfg.autoregressive)
    chains, device = data.toy, torch.device("cpu")
    teacher, _ = ar_teacher(sec.teacher, data, seed=seed, cache_dir=str(cache), device=device, topology=Topology(),
                            log=lambda m: None)
    models = {k: load_teacher(f, chains.vocab, k, chains.extra_ids) for k, f in folders.items()}
    rows = {"A": markov_row(teacher, chains, sec)}
    rows.update({f"B{g:g}": markov_row(teacher, chains, sec, g) for g in GAMMAS})
    rows.update({k: markov_row(m, chains, sec) for k, m in models.items()})
    high = f"D{BETAS[-1]:g}"
    rows.update({f"E{lam:g}": markov_row(interpolate(models["C"], models[high], lam), chains, sec)
                 for lam in LAMBDAS})
    rows["E0"], rows["E1"] = rows["C"], rows[high]
    return {k: {m: v[m] for m in ("quality", "diversity", "modes_hit", "nfe")} for k, v in rows.items()}


def cfg_curve_q(rows: dict, diversity: float) -> float | None:
    """B's Q at diversity ``diversity`` on the piecewise-linear curve through A and the B points (None: outside)."""
    points = sorted((rows[k]["diversity"], rows[k]["quality"]) for k in ["A", *(f"B{g:g}" for g in GAMMAS)])
    for (d0, q0), (d1, q1) in zip(points, points[1:]):
        if d0 <= diversity <= d1:
            return q0 if d1 == d0 else q0 + (q1 - q0) * (diversity - d0) / (d1 - d0)
    return None


def lerp_margin(rows: dict) -> float | None:
    """The best ``Q_E - Q_B(D_E)`` over E points within B's diversity range (None: no E point there)."""
    margins = [rows[k]["quality"] - q for k in (f"E{lam:g}" for lam in (0, *LAMBDAS, 1))
               if (q := cfg_curve_q(rows, rows[k]["diversity"])) is not None]
    return max(margins) if margins else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "stillroom"))
    ap.add_argument("--from-results", action="store_true", help="only re-decide the verdict from the stored numbers")
    a = ap.parse_args(argv)
    t0, per_seed = time.time(), {}
    path = RESULTS / "cfg_distill_markov.json"
    if a.from_results:
        stored = json.loads(path.read_text())
        per_seed = {int(k): v for k, v in stored["per_seed"].items()}
        t0 -= stored.get("seconds", 0)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in ([] if a.from_results else a.seeds):
            per_seed[seed] = seed_rows(seed, Path(tmp), Path(a.cache), a.steps)
            print(seed, json.dumps(per_seed[seed]), flush=True)
    result = summarize(per_seed, a)
    result["seconds"] = round(time.time() - t0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json.tmp").write_text(json.dumps(result, indent=2))
    path.with_suffix(".json.tmp").replace(path)
    print(result["table_md"], "\n", result["verdict_text"], "\n", result["analysis"])
    return 0


def summarize(per_seed: dict, a) -> dict:
    seeds = sorted(per_seed)
    arms = list(per_seed[seeds[0]])

    def col(arm: str, key: str) -> list[float]:
        return [per_seed[s][arm][key] for s in seeds]

    table = markdown_table(["arm", "Q (log-lik/seq)", "D (1-cos)", "modes hit/cond", "NFE/token"],
                           [[arm, fmt(col(arm, "quality")), fmt(col(arm, "diversity")), fmt(col(arm, "modes_hit"), 2),
                             per_seed[seeds[0]][arm]["nfe"]] for arm in arms])
    margins = [lerp_margin(per_seed[s]) for s in seeds]
    matched = all(m is not None for m in margins)
    lerp = beyond_spread("some E point at or above B's curve at matched D (Q_E - Q_B(D_E), best E point)",
                         [m if m is not None else float("nan") for m in margins])
    c_vs_b3 = beyond_spread("C's Q >= B(gamma 3)'s Q - 1 nat (C - B3)",
                            [x - y for x, y in zip(col("C", "quality"), col("B3", "quality"))], margin=-1.0)
    d_div = beyond_spread(f"D(beta {BETAS[-1]:g}) more diverse than C (D - C)",
                          [x - y for x, y in zip(col(f"D{BETAS[-1]:g}", "diversity"), col("C", "diversity"))])
    parts = [lerp, c_vs_b3, d_div]
    fields = verdict_fields(parts, required=[lerp.name])
    mean = {arm: {k: sum(col(arm, k)) / len(seeds) for k in ("quality", "diversity")} for arm in arms}
    helping = [g for g in GAMMAS if mean[f"B{g:g}"]["quality"] > mean["A"]["quality"]]
    e_arms = [f"E{lam:g}" for lam in (0, *LAMBDAS, 1)]
    dominating = [f"B{g:g}" for g in GAMMAS if all(mean[f"B{g:g}"]["quality"] > mean[e]["quality"]
                                                    and mean[f"B{g:g}"]["diversity"] > mean[e]["diversity"]
                                                    for e in e_arms)]
    analysis = (f"Mean (Q, D): A ({mean['A']['quality']:.2f}, {mean['A']['diversity']:.3f}), B3 "
                f"({mean['B3']['quality']:.2f}, {mean['B3']['diversity']:.3f}), B5 ({mean['B5']['quality']:.2f}, "
                f"{mean['B5']['diversity']:.3f}), C ({mean['C']['quality']:.2f}, {mean['C']['diversity']:.3f}), "
                f"D{BETAS[-1]:g} ({mean[f'D{BETAS[-1]:g}']['quality']:.2f}, {mean[f'D{BETAS[-1]:g}']['diversity']:.3f}). "
                f"CFG raises the true-likelihood quality over base sampling only at gamma {helping or 'none'} (a "
                "plausible reading: a large gamma favours tokens the other conditions avoid rather than the "
                "condition's likely paths, so Q falls as gamma grows while D falls too). "
                f"Per-seed best LERP margins over the CFG curve: {[None if m is None else round(m, 3) for m in margins]}. "
                + ("" if matched else "In some seed no E point fell within B's diversity range, so that seed has "
                   "no matched comparison and the part cannot hold. ")
                + ("By the rule the spec's pass criterion holds: some E point is above CFG's curve at matched diversity "
                   f"beyond the seed spread ({lerp.evidence()} nats, narrowly). " if lerp.held else
                   "The LERP curve is not above CFG's beyond the seed spread. ")
                + (f"But on the mean numbers {', '.join(dominating)} has both higher Q and higher D than every E "
                   "point: the matched-diversity margin comes from E points near C, which sit on the steep gamma 3-5 "
                   "part of B's curve (C reproduces B(gamma 3) with one forward per token), not from E reaching B's "
                   "Pareto front. " if dominating else "No B point has both higher Q and higher D than every E point. ")
                + ("C keeps B(gamma 3)'s quality within 1 nat with one forward per token. " if c_vs_b3.held else
                   "C does not reach B(gamma 3)'s quality within 1 nat at 300 updates. ")
                + ("The diversity reward raises D." if d_div.held else
                   "The diversity reward does not raise D beyond the seed spread."))
    return {"method": "cfg_distill_markov", "claim": CLAIM, "seeds": seeds, "per_seed": per_seed,
            "setting": (f"markov_modes: 5 conditions x 4 modes, V 16, L 12, 20k sequences (10% null); teacher "
                        f"LlamaForCausalLM (2 layers, d 64, 400 steps, seed 0, shared); students {a.steps} updates "
                        "(spec: 300), 32 conditions x 2 on-policy samples, lr 3e-4, forward KL, gamma 3; 400 "
                        "samples per row (80 per condition); E = LERP(C, D beta 2)"),
            "table_md": table, "analysis": analysis, "finished": time.strftime("%Y-%m-%d %H:%M"), **fields}


if __name__ == "__main__":
    raise SystemExit(main())
