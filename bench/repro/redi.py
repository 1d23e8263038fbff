"""REDI (spec section 8, Appendix B item 8) at CPU scale.

Per seed:
1. Task: 2-digit addition (``DIGITS``) with a right-to-left scratchpad, e.g. ``"82+59="`` ->
   ``"2+9=11,8+5+1=14|141"`` (char tokenizer). Train / held-out problems split by seed.
2. A noisy rule-based "teacher" writes ``N_SAMPLES`` traces per training problem; each trace of a
   problem with a carry is wrong with probability ``ERROR_RATE`` (the carry is dropped and the
   mistake propagates consistently to the answer; with ``DIGIT_ERRORS`` problems without a carry
   get an off-by-one column sum instead). The numeric
   answer after ``|`` is checked by a verifier: D_SFT = correct traces, D_Pref = one correct +
   one incorrect trace per problem that has both (``stillroom.datagen.preference.build_preference_data``).
3. Stage 1: ``method: sft`` on D_SFT for ``STAGE1_STEPS`` steps from a random 2-layer Llama.
4. Stage 2, from the same stage-1 student, the same steps and the same (high) LR, all through
   ``stillroom run`` (``run_stillroom``): SFT continuation on the chosen traces of D_Pref;
   REDI alpha=0.8; symmetric REDI alpha=1.
5. Metric: greedy exact-match accuracy on held-out problems; REDI runs also log the mean
   length-normalised log-probs of chosen and rejected traces every ``MONITOR`` steps.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from bench.repro.common import char_tokenizer, fmt, greedy_complete, markdown_table, mean_std, run_stillroom, \
    save_model, tiny_llama, write_jsonl
from bench.repro.verdict import beyond_spread, paired, verdict_fields

DIGITS = 2
N_TRAIN, N_EVAL = 1200, 300
N_SAMPLES, ERROR_RATE = 4, 0.35
DIGIT_ERRORS = False  # also off-by-one column sums on problems without a carry (see the analysis)
LAYERS, HIDDEN = 2, 64
STAGE1_STEPS, STAGE1_LR = 250, 3e-3
STAGE2_STEPS, STAGE2_LR = 120, 3e-4
PAIRS_PER_STEP = 16
MONITOR = 5
ALPHABET = "0123456789+=,|"


def trace(a: int, b: int, err_col: int | None = None, err_kind: str = "carry") -> str:
    """Scratchpad of ``a + b`` column by column (units first); ``err_col`` makes one step wrong."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, steps, digits = 0, [], []
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        parts = [str(x), str(y)] + (["1"] if carry else [])
        if i == err_col and err_kind == "carry":
            carry_out = 0  # the carry of this column is forgotten in the next one
        else:
            carry_out = s // 10
        if i == err_col and err_kind == "digit":
            s = s + 1
            carry_out = s // 10
        steps.append("+".join(parts) + f"={s}")
        digits.append(str(s % 10))
        carry = carry_out
    if carry:
        digits.append("1")
    return ",".join(steps) + "|" + ("".join(reversed(digits)).lstrip("0") or "0")


def answer_of(text: str) -> str | None:
    return text.rsplit("|", 1)[1].strip() if "|" in text else None


def noisy_teacher(a: int, b: int, rng: random.Random) -> str:
    if rng.random() >= ERROR_RATE:
        return trace(a, b)
    real = [i for i in range(DIGITS) if trace(a, b, i, "carry") != trace(a, b)]
    if real:
        return trace(a, b, rng.choice(real), "carry")
    if DIGIT_ERRORS:
        return trace(a, b, rng.randrange(DIGITS), "digit")
    return trace(a, b)  # no carry to drop: this sample is correct


def make_data(seed: int, work: Path) -> dict:
    from stillroom.datagen.store import make_key
    from stillroom.datagen.preference import build_preference_data

    rng = random.Random(seed)
    seen, probs = set(), []
    while len(probs) < N_TRAIN + N_EVAL:
        a, b = rng.randrange(10 ** (DIGITS - 1), 10 ** DIGITS), rng.randrange(10 ** (DIGITS - 1), 10 ** DIGITS)
        if (a, b) not in seen:
            seen.add((a, b))
            probs.append((a, b))
    items = [{"id": f"{a}+{b}", "prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in probs]
    train, held = items[:N_TRAIN], items[N_TRAIN:]
    records = []
    for it, (a, b) in zip(train, probs[:N_TRAIN]):
        for s in range(N_SAMPLES):
            records.append({"key": make_key(it["id"], s), "prompt_id": it["id"], "sample_index": s, "teacher": "rule",
                            "settings": {"error_rate": ERROR_RATE}, "text": noisy_teacher(a, b, rng)})
    stats: dict = {}
    sft, pref = build_preference_data(records, train, lambda text, item: answer_of(text) == item["answer"],
                                      stats=stats)
    return {"sft": write_jsonl(sft, work / "sft.jsonl"), "pref": write_jsonl(pref, work / "pref.jsonl"),
            "held": held, "stats": stats}


def accuracy(folder: Path, tok, held: list[dict]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    outs = greedy_complete(model, tok, [h["prompt"] for h in held], max_new_tokens=40, batch_size=100)
    return sum(answer_of(o) == h["answer"] for o, h in zip(outs, held)) / len(held)


def config(name: str, work: Path, teacher: Path, student: Path, data: Path, method: str, steps: int, lr: float,
           mbs: int, seed: int, **extra) -> dict:
    src = {"path": str(data), "format": "prompt_completion"}
    if "pref" in data.name:
        src["completion_field"] = "chosen"
    cfg = {
        "name": name, "output_dir": str(work / "runs"), "seed": seed, "method": method,
        "teacher": {"model": {"path": str(teacher)}, "dtype": "float32"},  # only the tokenizer; no teacher loss
        "student": {"model": {"path": str(student)}},
        "data": {"sources": [src], "seq_len": 64, "heldout_fraction": 0.02, "heldout_max": 8},
        "loss": {"terms": [{"name": "ce"}], "fused": False},
        "train": {"steps": steps, "micro_batch_size": mbs, "lr": lr, "warmup_steps": steps // 10,
                  "schedule": "constant", "precision": "fp32", "clip_grad_norm": 1.0, "threads": 1,
                  "log_every": 1, "keep_checkpoints": 1},
        "eval": {"heldout_sequences": 8, "batch_size": 8, "generations": 0, "max_new_tokens": 4, "speed_tokens": 64,
                 "before": False},
    }
    cfg.update(extra)
    return cfg


def one_seed(seed: int, work: Path, quick: bool) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(seed, work)
    tok = char_tokenizer(ALPHABET)
    teacher = save_model(tiny_llama(len(tok), layers=1, hidden=16, seed=seed), tok, work / "tokenizer_holder")
    init = save_model(tiny_llama(len(tok), layers=LAYERS, hidden=HIDDEN, seed=seed), tok, work / "init")
    scale = 0.25 if quick else 1.0
    s1, s2 = max(4, int(STAGE1_STEPS * scale)), max(4, int(STAGE2_STEPS * scale))
    stage1 = run_stillroom(config("stage1", work, teacher, init, data["sft"], "sft", s1, STAGE1_LR, 32, seed))
    start = stage1 / "student"
    out = {"stats": data["stats"], "stage1": accuracy(start, tok, data["held"])}
    variants = {
        "sft": ("sft", {}),
        "redi_0.8": ("redi", {"redi": {"alpha": 0.8, "monitor_every": MONITOR}}),
        "redi_1.0": ("redi", {"redi": {"alpha": 1.0, "monitor_every": MONITOR}}),
    }
    for key, (method, extra) in variants.items():
        mbs = PAIRS_PER_STEP if method == "sft" else 2 * PAIRS_PER_STEP  # the same chosen traces per step
        run = run_stillroom(config(key, work, teacher, start, data["pref"], method, s2, STAGE2_LR, mbs, seed, **extra))
        out[key] = accuracy(run / "student", tok, data["held"])
        if method == "redi":
            rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
            mon = [r for r in rows if r["step"] == 1 or (r["step"] - 1) % MONITOR == 0]
            out[key + "_curve"] = [(int(r["redi/monitor_step"]), r["redi/logp_chosen"], r["redi/logp_rejected"])
                                   for r in mon]
    return out


def main(seeds: list[int], work: Path, quick: bool) -> dict:
    torch.set_num_threads(1)
    per_seed = []
    for seed in seeds:
        t0 = time.perf_counter()
        per_seed.append(one_seed(seed, Path(work) / f"seed{seed}", quick))
        print(f"seed {seed}: {time.perf_counter() - t0:.0f}s {json.dumps({k: v for k, v in per_seed[-1].items() if not k.endswith('curve')})}", flush=True)
    return summarise(per_seed, seeds)


def summarise(per_seed: list[dict], seeds: list[int]) -> dict:
    """Table, verdict and analysis from the per-seed numbers (also re-run on a stored result's ``per_seed``)."""

    def curve_stats(key: str) -> dict:
        first_c = [r[key + "_curve"][0][1] for r in per_seed]
        last_c = [r[key + "_curve"][-1][1] for r in per_seed]
        first_r = [r[key + "_curve"][0][2] for r in per_seed]
        last_r = [r[key + "_curve"][-1][2] for r in per_seed]
        min_c = [min(c for _, c, _ in r[key + "_curve"]) for r in per_seed]
        return {"first_c": first_c, "last_c": last_c, "first_r": first_r, "last_r": last_r, "min_c": min_c}

    acc = {k: [r[k] for r in per_seed] for k in ("stage1", "sft", "redi_0.8", "redi_1.0")}
    cs = {k: curve_stats(k) for k in ("redi_0.8", "redi_1.0")}
    labels = {"stage1": "stage 1 (SFT on D_SFT)", "sft": "stage 2: SFT continuation", "redi_0.8": "stage 2: REDI alpha=0.8",
              "redi_1.0": "stage 2: symmetric REDI alpha=1"}
    rows = []
    for k, label in labels.items():
        if k in cs:
            c = cs[k]
            rows.append([label, fmt(acc[k]), f"{fmt(c['first_c'], 2)} -> {fmt(c['last_c'], 2)}",
                         f"{fmt(c['first_r'], 2)} -> {fmt(c['last_r'], 2)}"])
        else:
            rows.append([label, fmt(acc[k]), "-", "-"])
    table = markdown_table(["model", "held-out exact match", "logp chosen (start -> end)",
                            "logp rejected (start -> end)"], rows)
    st = per_seed[0]["stats"]
    table += (f"\n\nData (seed {seeds[0]}): {st['sft_rows']} correct traces (D_SFT), {st['pref_rows']} pairs (D_Pref), "
              f"{st['correct']} correct / {st['incorrect']} incorrect teacher samples. logp = mean log pi(y|x)/|y| "
              f"(nats/token) of the step's pairs before the update, first and last monitored step.")

    m = {k: mean_std(v)[0] for k, v in acc.items()}
    drop = {k: [f - l for f, l in zip(cs[k]["first_c"], cs[k]["last_c"])] for k in cs}
    drop_r = {k: [f - l for f, l in zip(cs[k]["first_r"], cs[k]["last_r"])] for k in cs}
    collapsed = {k: [dc > 1.0 and dr > 1.0 for dc, dr in zip(drop[k], drop_r[k])] for k in cs}
    # Each part is a per-seed difference (same stage-1 checkpoint), held only beyond the seed spread;
    # "collapse" = the chosen and the rejected log-prob both fall by more than 1 nat/token.
    parts = [
        beyond_spread("REDI alpha=0.8 beats the SFT continuation (accuracy)", paired(acc["redi_0.8"], acc["sft"])),
        beyond_spread("alpha=0.8 stays stable: chosen log-prob falls by less than 1 nat/token",
                      [-x for x in drop["redi_0.8"]], margin=-1.0),
        beyond_spread("alpha=1 collapses: chosen log-prob falls by more than 1 nat/token", drop["redi_1.0"], margin=1.0),
        beyond_spread("alpha=1 collapses: rejected log-prob falls by more than 1 nat/token", drop_r["redi_1.0"],
                      margin=1.0),
        beyond_spread("alpha=1 ends below alpha=0.8 (accuracy)", paired(acc["redi_0.8"], acc["redi_1.0"])),
    ]
    verdict = verdict_fields(parts)
    held = verdict["held"]
    improves, stable = parts[0].held, parts[1].held
    sym_collapses = all(p.held for p in parts[2:])
    analysis = (
        f"Held-out exact match: stage 1 {m['stage1']:.3f}; SFT continuation {m['sft']:.3f}, REDI alpha=0.8 "
        f"{m['redi_0.8']:.3f}, symmetric REDI {m['redi_1.0']:.3f} (means over {len(seeds)} seeds). "
        f"REDI 0.8 {'beats' if improves else 'does not beat'} the SFT continuation beyond the seed spread "
        f"(paired difference {parts[0].evidence()}). "
        f"Chosen log-prob change (nats/token, start - end): alpha=0.8 {fmt(drop['redi_0.8'], 2)}, alpha=1 "
        f"{fmt(drop['redi_1.0'], 2)}; rejected: alpha=0.8 {fmt(drop_r['redi_0.8'], 2)}, alpha=1 "
        f"{fmt(drop_r['redi_1.0'], 2)}. Collapse (both chosen and rejected log-probs fall by more than 1 nat/token) "
        f"in {sum(collapsed['redi_0.8'])}/{len(seeds)} seeds at alpha=0.8 and {sum(collapsed['redi_1.0'])}/{len(seeds)} "
        f"at alpha=1. "
    )
    if m["redi_0.8"] < m["stage1"]:
        analysis += (f"REDI alpha=0.8 ends below its stage-1 starting point ({m['redi_0.8']:.3f} vs {m['stage1']:.3f}) "
                     "although its chosen log-prob barely moves. A likely cause (not isolated here): the negative term pushes down every token of the "
                     "incorrect trace, including the tokens after the dropped carry that are locally correct (the "
                     "answer read back from the scratchpad), so a 2-layer model partly unlearns shared skills "
                     "and greedy decoding breaks on a few tokens per trace; the paper's long, diverse traces and "
                     "its far smaller LR (1e-6) dilute this, a tiny model on one narrow skill does not. ")
    analysis += ("Every part of the claim holds beyond the seed spread at this scale." if held else
                 "The claim does not hold in full here; not beyond the seed spread: "
                 + "; ".join(p.name for p in parts if not p.held) + ".")
    return {
        "claim": "Asymmetric REDI (alpha=0.8) improves over SFT and stays stable; symmetric REDI (alpha=1) at the "
                 "same high LR collapses, with the chosen and rejected log-probs falling together.",
        "setting": (f"{DIGITS}-digit addition with a scratchpad, char tokenizer; noisy rule-based teacher ({N_SAMPLES} "
                    f"samples/problem; a trace drops a carry with probability {ERROR_RATE}"
                    f"{', else has an off-by-one column sum' if DIGIT_ERRORS else ''}), {N_TRAIN} train / "
                    f"{N_EVAL} held-out problems; student: random {LAYERS}-layer Llama d={HIDDEN}. Stage 1: stillroom "
                    f"run method=sft, {STAGE1_STEPS} steps x 32 sequences, lr {STAGE1_LR}. Stage 2 from the same "
                    f"checkpoint via stillroom run, {STAGE2_STEPS} steps, constant lr {STAGE2_LR} (high) after "
                    f"{STAGE2_STEPS // 10} warmup steps, {PAIRS_PER_STEP} pairs per step (SFT: their "
                    f"{PAIRS_PER_STEP} chosen traces). DPO not run (no reference-model path in the product). "
                    f"Greedy exact match on held-out problems."),
        "table_md": table,
        **verdict,
        "analysis": analysis,
        "per_seed": per_seed,
    }


def resummarize(stored: dict) -> dict:
    """The summary recomputed from a stored result's per-seed numbers (no experiment is re-run)."""
    return summarise(stored["per_seed"], stored["seeds"])
