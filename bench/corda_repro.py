"""CorDA's CPU experiment (spec 14f, Appendix B "CorDA"; issue 12 item 5).

A tiny LM that knows an "old" QA task: a 2-layer Llama (d 64, character vocabulary) trained until it recalls 64
random facts ("fact abcd = wxyz"). It is then fine-tuned on a new task ("nxt abcd = bcde": each letter shifted
by one) with rank-8 adapters on every projection, in three arms from the same model, data order and steps:

* **lora**: peft's default LoRA (B = 0);
* **corda_kpm**: CorDA knowledge-preserving init (``stillroom.models.corda.apply_corda``, i.e. peft's
  ``preprocess_corda``) with the input covariance of the *old QA* sequences; the adapters take the smallest
  components, the dominant (knowledge) directions stay frozen;
* **corda_ipm** (reported, not part of the claim): instruction-previewed init, covariance of the new task.

Every 20 steps: new-task CE on 256 held-out examples and old-task CE on the 64 facts (answer tokens). Claim
(spec): KPM loses less on the old task than LoRA *at equal new-task loss*: the old-task CE of each arm is read
(linearly interpolated) at the first point where its new-task CE reaches the level that both arms reach (the
larger of their best new-task CEs), and LoRA's minus KPM's must be positive beyond the seed spread.

    .venv/bin/python bench/corda_repro.py                 # 3 seeds -> bench/results/repro_corda.json
    .venv/bin/python bench/corda_repro.py --from-results  # re-decide the verdict from the stored numbers
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.repro.common import RESULTS, char_tokenizer, fmt, markdown_table, mean_std, tiny_llama  # noqa: E402
from bench.repro.verdict import beyond_spread, paired, verdict_fields  # noqa: E402
from bench.transfer_repro import ALPHABET, evaluate, task_batch, task_example, train  # noqa: E402

CLAIM = ("CorDA (Yang et al. 2024, spec 14f): knowledge-preserving adapter initialisation (KPM: covariance of the "
         "knowledge to keep, adapters on the smallest components of W C) loses less on the old task than LoRA "
         "at equal new-task loss")
CHARS = ALPHABET + " =\n"
ARMS = ("lora", "corda_kpm", "corda_ipm")
MID_LEVEL = 1.0  # a new-task CE (nats) the arms pass on their way down (the task partly learnt); raised to the
# level both reach where one never gets this low
SETTING = {"layers": 2, "hidden": 64, "facts": 64, "pretrain_steps": 800, "pretrain_lr": 3e-3, "r": 8, "alpha": 16.0,
           "lr": 2e-3, "calib_rows": 32, "eval_every": 20}


def facts(seed: int) -> list[tuple[str, str]]:
    """``SETTING['facts']`` (prompt, answer) pairs "fact abcd = " -> "wxyz\\n" with distinct random keys."""
    rng = random.Random(10_000 + seed)
    keys: set[str] = set()
    while len(keys) < SETTING["facts"]:
        keys.add("".join(rng.choice(ALPHABET) for _ in range(4)))
    return [(f"fact {k} = ", "".join(rng.choice(ALPHABET) for _ in range(4)) + "\n") for k in sorted(keys)]


def fact_batches(tok, known: list[tuple[str, str]], seed: int, rows: int):
    def draw(step: int):
        r = random.Random(seed * 31 + step)
        return task_batch(tok, [r.choice(known) for _ in range(4 * rows)])

    return draw


def old_knowledge_model(tok, known, seed: int):
    """The base model: trained on the facts until it recalls them (full fine-tuning, AdamW)."""
    model = tiny_llama(len(tok), layers=SETTING["layers"], hidden=SETTING["hidden"], seed=3000 + seed)
    return train(model, fact_batches(tok, known, seed, 32), SETTING["pretrain_steps"], SETTING["pretrain_lr"])


def adapted(arm: str, base_state: dict, tok, calib: dict[str, list[torch.Tensor]]):
    """A fresh copy of the base with ``arm``'s adapters (stillroom's apply_lora / apply_corda)."""
    from stillroom.config.schema import LoraConfig
    from stillroom.models import apply_lora
    from stillroom.models.corda import apply_corda

    model = tiny_llama(len(tok), layers=SETTING["layers"], hidden=SETTING["hidden"], seed=0)
    model.load_state_dict(base_state)
    cfg = LoraConfig(r=SETTING["r"], alpha=SETTING["alpha"], init="default" if arm == "lora" else arm)
    if arm == "lora":
        return apply_lora(model, cfg)
    return apply_corda(model, cfg, calib["old" if arm == "corda_kpm" else "new"], log=lambda _m: None)


def run_seed(seed: int, steps: int) -> dict:
    tok = char_tokenizer(CHARS)
    known = facts(seed)
    base = old_knowledge_model(tok, known, seed)
    old_eval = task_batch(tok, known)
    rng = random.Random(seed)
    new_eval = task_batch(tok, [task_example(rng) for _ in range(256)])
    calib = {"old": [task_batch(tok, [random.Random(seed + i).choice(known) for _ in range(4)])[0]
                     for i in range(SETTING["calib_rows"])],
             "new": [task_batch(tok, [task_example(random.Random(99_991 * seed + i)) for _ in range(4)])[0]
                     for i in range(SETTING["calib_rows"])]}

    def new_batches(step: int):
        r = random.Random(seed * 7919 + step)
        return task_batch(tok, [task_example(r) for _ in range(128)])

    out = {"base_old": evaluate(base, *old_eval), "base_new": evaluate(base, *new_eval)}
    for arm in ARMS:
        model = adapted(arm, base.state_dict(), tok, calib)
        start = {"old": evaluate(model, *old_eval), "new": evaluate(model, *new_eval)}
        curve = [{"step": 0, **{k: v["ce"] for k, v in start.items()}, "new_acc": start["new"]["acc"]}]

        def measure(step: int, model=model, curve=curve) -> None:
            if step % SETTING["eval_every"] == 0:
                old, new = evaluate(model, *old_eval), evaluate(model, *new_eval)
                curve.append({"step": step, "old": old["ce"], "new": new["ce"], "new_acc": new["acc"],
                              "old_acc": old["acc"]})

        train(model, new_batches, steps, SETTING["lr"], after_step=measure)
        out[arm] = curve
    return out


def old_at_new_level(curve: list[dict], level: float) -> float:
    """Old-task CE where the new-task CE first reaches ``level`` (linear between evaluation points)."""
    for prev, cur in zip(curve, curve[1:]):
        if cur["new"] <= level:
            if prev["new"] <= level or prev["new"] == cur["new"]:
                return cur["old"]
            w = (prev["new"] - level) / (prev["new"] - cur["new"])
            return prev["old"] + w * (cur["old"] - prev["old"])
    raise ValueError(f"the curve never reaches new-task CE {level}")


def matched(per_seed: dict, seed: str, a: str, b: str, level: float | None = None) -> tuple[float, float, float]:
    """(level, old CE of a, old CE of b) at new-task CE ``level`` (default: the best level both arms reach)."""
    if level is None:
        level = max(min(p["new"] for p in per_seed[seed][a]), min(p["new"] for p in per_seed[seed][b]))
    return level, old_at_new_level(per_seed[seed][a], level), old_at_new_level(per_seed[seed][b], level)


def summarize(per_seed: dict, steps: int) -> dict:
    seeds = sorted(per_seed, key=int)
    final = {arm: {k: [per_seed[s][arm][-1][k] for s in seeds] for k in ("old", "new", "new_acc")} for arm in ARMS}
    kpm = [matched(per_seed, s, "lora", "corda_kpm") for s in seeds]
    ipm = [matched(per_seed, s, "lora", "corda_ipm") for s in seeds]
    rows = [["base (before fine-tuning)", fmt([per_seed[s]["base_old"]["ce"] for s in seeds]),
             fmt([per_seed[s]["base_new"]["ce"] for s in seeds]), "-", "-"]]
    for arm in ARMS:
        at_level = [m[2] for m in (kpm if arm != "corda_ipm" else ipm)] if arm != "lora" else [m[1] for m in kpm]
        rows.append([arm, fmt(final[arm]["old"]), fmt(final[arm]["new"]), fmt(final[arm]["new_acc"]), fmt(at_level)])
    table = markdown_table(["arm", f"old-task CE after {steps} steps", "new-task CE", "new-task token accuracy",
                            "old-task CE at the matched new-task CE (vs lora)"], rows)
    parts = [beyond_spread("KPM loses less on the old task at equal new-task CE (old CE lora - old CE kpm)",
                           [m[1] - m[2] for m in kpm]),
             beyond_spread(f"KPM loses less on the old task at equal steps ({steps})",
                           paired(final["lora"]["old"], final["corda_kpm"]["old"])),
             beyond_spread("IPM vs LoRA on the old task at equal new-task CE (old CE lora - old CE ipm)",
                           [m[1] - m[2] for m in ipm]),
             beyond_spread(f"KPM vs LoRA on the old task at new-task CE {MID_LEVEL} (task half learnt)",
                           [m[1] - m[2] for m in (matched(per_seed, s, "lora", "corda_kpm", max(MID_LEVEL, k[0]))
                                                   for s, k in zip(seeds, kpm))])]
    fields = verdict_fields(parts, required=[parts[0].name])
    return {"claim": CLAIM, "seeds": [int(s) for s in seeds], "per_seed": per_seed, "table_md": table,
            "setting": setting(steps), "analysis": analysis(per_seed, seeds, parts, kpm, final), **fields}


def setting(steps: int) -> str:
    return (f"2-layer Llama d {SETTING['hidden']}, character vocabulary; old task: {SETTING['facts']} random facts "
            f"'fact abcd = wxyz' learnt by full training ({SETTING['pretrain_steps']} steps, AdamW "
            f"{SETTING['pretrain_lr']}); new task 'nxt abcd = bcde', {steps} steps of 128 examples, adapters r "
            f"{SETTING['r']} alpha {SETTING['alpha']:g} on q/k/v/o/gate/up/down, AdamW {SETTING['lr']}; CorDA "
            f"covariance from {SETTING['calib_rows']} sequences of 4 facts (kpm) or 4 new-task examples (ipm), "
            f"through peft's preprocess_corda; evaluation every {SETTING['eval_every']} steps: CE on the answers of "
            "the 64 facts (old) and of 256 held-out new-task examples; 3 seeds (facts, initialisation, data order)")


def analysis(per_seed: dict, seeds: list, parts: list, kpm: list, final: dict) -> str:
    at_level, at_steps, ipm, mid = parts
    level = mean_std([m[0] for m in kpm])[0]
    base_old = mean_std([per_seed[s]["base_old"]["ce"] for s in seeds])[0]
    old_acc = {arm: mean_std([per_seed[s][arm][-1]["old_acc"] for s in seeds])[0] for arm in ARMS}
    forgot = max(old_acc.values()) < 0.3
    text = (f"The base's old-task CE is {base_old:.3f}. Final old-task token accuracy: lora {old_acc['lora']:.3f}, "
            f"kpm {old_acc['corda_kpm']:.3f}, ipm {old_acc['corda_ipm']:.3f} (0.2 is the newline that ends every "
            "answer")
    text += ("; every arm forgets nearly all fact letters by the end, so the end point compares models that have "
             "all lost the old task). " if forgot else "). ")
    text += (f"At new-task CE {max(MID_LEVEL, level):.3g} (the task partly learnt), old-task CE lora - kpm is "
             f"{mid.evidence()} ({'beyond' if mid.held else 'not beyond'} the spread). "
             f"At the new-task CE both reach (mean level {level:.3f}), old-task CE: lora "
            f"{mean_std([m[1] for m in kpm])[0]:.3f}, corda_kpm {mean_std([m[2] for m in kpm])[0]:.3f} "
            f"(difference {at_level.evidence()}, {'held' if at_level.held else 'not held'}). After equal steps: "
            f"old-task CE lora {mean_std(final['lora']['old'])[0]:.3f} vs kpm {mean_std(final['corda_kpm']['old'])[0]:.3f} "
            f"({at_steps.evidence()}), new-task CE lora {mean_std(final['lora']['new'])[0]:.3f} vs kpm "
            f"{mean_std(final['corda_kpm']['new'])[0]:.3f} vs ipm {mean_std(final['corda_ipm']['new'])[0]:.3f}. "
            f"IPM vs LoRA at equal new-task CE: {ipm.evidence()} (IPM adapts the dominant directions, so it is not "
            "expected to preserve the old task). ")
    early = min(2, len(per_seed[seeds[0]]["lora"]) - 1)  # the second evaluation after step 0
    step = per_seed[seeds[0]]["lora"][early]["step"]
    at = {arm: [mean_std([per_seed[s][arm][early][k] for s in seeds])[0] for k in ("old", "new")] for arm in ARMS}
    text += (f"Most of the forgetting happens early: at step {step} the old-task CE is already lora {at['lora'][0]:.2f}, "
             f"kpm {at['corda_kpm'][0]:.2f}, ipm {at['corda_ipm'][0]:.2f} while the new-task CE is still "
             f"{at['lora'][1]:.2f} / {at['corda_kpm'][1]:.2f} / {at['corda_ipm'][1]:.2f}, so the old facts collapse "
             "in every arm before the new task is learnt; KPM's later, smaller advantage at equal steps partly "
             "reflects that it also learns the new task a little more slowly. ")
    if not at_level.held:
        text += ("KPM's advantage on the old task is not beyond the seed spread at this scale. Possible reasons, "
                 "not tested here: with d 64 and rank 8 the adapters span an eighth of every input space, and the "
                 "facts and the new task share the same characters and positions, so their input covariances "
                 "overlap far more than QA and instruction data do in a 7B model. ")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="new-task fine-tuning steps per arm")
    ap.add_argument("--pretrain-steps", type=int, default=SETTING["pretrain_steps"], help="steps that learn the facts")
    ap.add_argument("--from-results", action="store_true", help="only re-decide the verdict from the stored numbers")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    SETTING["pretrain_steps"] = a.pretrain_steps
    path, t0 = RESULTS / "repro_corda.json", time.time()
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if a.from_results:
        per_seed, seconds, a.steps = stored["per_seed"], stored["seconds"], stored["steps"]
        SETTING["pretrain_steps"] = stored.get("pretrain_steps", SETTING["pretrain_steps"])
    else:
        per_seed = {}
        for seed in a.seeds:
            per_seed[str(seed)] = run_seed(seed, a.steps)
            print(seed, json.dumps({arm: per_seed[str(seed)][arm][-1] for arm in ARMS}), flush=True)
        seconds = round(time.time() - t0, 1)
    result = {"method": "corda", **summarize(per_seed, a.steps), "steps": a.steps,
              "pretrain_steps": SETTING["pretrain_steps"], "seconds": seconds,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2))
    tmp_path.replace(path)
    print(result["table_md"], "\n", result["verdict_text"], "\n", result["analysis"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
