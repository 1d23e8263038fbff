"""REDI (spec section 8, Appendix B item 8) at CPU scale, at a high stage-2 LR and at the paper's.

Per seed:
1. Task: 2-digit addition (``DIGITS``) with a right-to-left scratchpad, e.g. ``"82+59="`` ->
   ``"2+9=11,8+5+1=14|141"`` (char tokenizer). Train / held-out problems split by seed.
2. A noisy rule-based "teacher" writes ``N_SAMPLES`` traces per training problem; each trace of a
   problem with a carry is wrong with probability ``ERROR_RATE`` (a carry is dropped and the mistake
   propagates consistently to the answer). A verifier checks the answer after ``|``: D_SFT = correct traces,
   D_Pref = one correct + one incorrect trace per problem that has both (``build_preference_data``).
3. Stage 1: ``method: sft`` on D_SFT for ``STAGE1_STEPS`` steps from a random 2-layer Llama.
4. Stage 2, every arm from the same stage-1 student with the same steps and data for its three
   variants, all through ``stillroom run`` (``run_stillroom``): SFT continuation on the chosen traces
   of D_Pref; REDI alpha=0.8; symmetric REDI alpha=1. Arms:
   * ``high``: the first version of this reproduction, ``HIGH_STEPS`` steps at a constant ``HIGH_LR``;
   * ``lr``: the paper's stage-2 optimiser (AdamW betas (0.9, 0.999), weight decay 1e-4, linear decay
     to 0 after 10% warmup) for ``PAPER_STEPS`` steps at each LR of ``SWEEP_LRS``: the paper's 1e-6 and
     up to ``PAPER_LR``, the paper's stage-2 / stage-1 LR ratio (1e-6 / 5e-5) times our stage-1 LR.
     ``PAPER_LR`` was fixed as the verdict's LR before the 3-seed run (the other LRs are reported only);
   * ``plateau``: ``PAPER_LR`` from a stage 1 of ``PLATEAU_STAGE1_STEPS`` steps (the paper's SFT start is
     near its plateau).
5. Metrics: greedy held-out exact match; the share of outputs whose scratchpad is right and of those whose
   answer is not read out of their own scratchpad (:func:`unfaithful_readout`); REDI runs log the mean
   length-normalised chosen / rejected log-probs every ``MONITOR`` steps. Seeds run in ``JOBS`` processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
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
LAYERS, HIDDEN = 2, 64
STAGE1_STEPS, STAGE1_LR = 250, 3e-3
HIGH_STEPS, HIGH_LR = 120, 3e-4  # arm "high": constant LR, stillroom's default AdamW (betas 0.9/0.95, no decay)
PAPER_LR = round(STAGE1_LR * (1e-6 / 5e-5), 12)  # 6e-5: the paper's stage-2/stage-1 LR ratio at our scale
PAPER_STEPS = STAGE1_STEPS  # the paper's stage 2 (1 epoch, 53k pairs / 32) ~ its stage 1 (3 epochs, 78k / 128)
SWEEP_LRS = (1e-6, 1e-5, PAPER_LR, 1e-4)
PLATEAU_STAGE1_STEPS = 1000
PAIRS_PER_STEP = 16
MONITOR = 5
JOBS = 2
ALPHABET = "0123456789+=,|"
VARIANTS = ("sft", "redi_0.8", "redi_1.0")


def trace(a: int, b: int, err_col: int | None = None) -> str:
    """Scratchpad of ``a + b`` column by column (units first); the carry out of column ``err_col`` is dropped."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, steps, digits = 0, [], []
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        parts = [str(x), str(y)] + (["1"] if carry else [])
        carry_out = 0 if i == err_col else s // 10  # a dropped carry is forgotten in the next column
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
    real = [i for i in range(DIGITS) if trace(a, b, i) != trace(a, b)]
    return trace(a, b, rng.choice(real)) if real else trace(a, b)  # no carry to drop: this sample is correct


def build_data(seed: int) -> dict:
    """Problems, teacher traces, D_SFT and D_Pref of one seed (rows, not files); ``stats`` adds how a pair's two
    traces relate: ``shared_prefix`` (mean share of the chosen trace's characters that open the rejected one too)
    and ``answer_only`` (share of pairs whose scratchpads agree: only the read-out after ``|`` differs)."""
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
    n = max(1, len(pref))
    stats["shared_prefix"] = sum(len(os.path.commonprefix([p["chosen"], p["rejected"]])) / len(p["chosen"])
                                 for p in pref) / n
    stats["answer_only"] = sum(p["chosen"].rsplit("|", 1)[0] == p["rejected"].rsplit("|", 1)[0] for p in pref) / n
    return {"sft": sft, "pref": pref, "held": held, "stats": stats}


def unfaithful_readout(text: str) -> bool:
    """True when ``text`` is malformed or its answer is not the number its own scratchpad writes (the last
    column's full sum, then the units digits of the earlier columns, most significant first): a read-out
    error, whether or not the scratchpad itself is right."""
    if "|" not in text:
        return True
    pad, ans = text.rsplit("|", 1)
    sums = [step.rsplit("=", 1)[1] if "=" in step else "" for step in pad.split(",")]
    if not all(x.isdigit() for x in sums):
        return True
    readout = sums[-1] + "".join(s[-1] for s in reversed(sums[:-1]))
    return (readout.lstrip("0") or "0") != ans.strip()


def evaluate(folder: Path, tok, held: list[dict]) -> dict:
    """Greedy held-out ``acc`` (exact answer), ``pad_ok`` (scratchpad exactly right) and ``unfaithful``
    (answer not read out of the output's own scratchpad), each a fraction of the held-out problems."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    outs = greedy_complete(model, tok, [h["prompt"] for h in held], max_new_tokens=40, batch_size=100)
    pads = [trace(*map(int, h["prompt"].rstrip("=").split("+"))).rsplit("|", 1)[0] for h in held]
    n = len(held)
    return {"acc": sum(answer_of(o) == h["answer"] for o, h in zip(outs, held)) / n,
            "pad_ok": sum("|" in o and o.rsplit("|", 1)[0] == p for o, p in zip(outs, pads)) / n,
            "unfaithful": sum(unfaithful_readout(o) for o in outs) / n}


PAPER_OPTIMISER = {"schedule": "linear", "min_lr_ratio": 0.0, "weight_decay": 1e-4, "betas": [0.9, 0.999]}


def config(name: str, work: Path, teacher: Path, student: Path, data: Path, method: str, steps: int, lr: float,
           mbs: int, seed: int, *, paper: bool = False, **extra) -> dict:
    """A ``stillroom run`` config; ``paper``: the paper's stage-2 optimiser (``PAPER_OPTIMISER``)."""
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
                  "log_every": 1, "keep_checkpoints": 1, **(PAPER_OPTIMISER if paper else {})},
        "eval": {"heldout_sequences": 8, "batch_size": 8, "generations": 0, "max_new_tokens": 4, "speed_tokens": 64,
                 "before": False},
    }
    cfg.update(extra)
    return cfg


def stage2(name: str, env: dict, start: Path, *, lr: float, steps: int, paper: bool) -> dict:
    """The three variants from ``start`` with equal steps and chosen traces per step: ``{variant: evaluate(...)}``,
    REDI variants with ``curve`` = ``[(step, logp_chosen, logp_rejected)]`` every ``MONITOR`` steps."""
    out = {}
    for key in VARIANTS:
        method = "sft" if key == "sft" else "redi"
        extra = {} if method == "sft" else {"redi": {"alpha": float(key.split("_")[1]), "monitor_every": MONITOR}}
        mbs = PAIRS_PER_STEP if method == "sft" else 2 * PAIRS_PER_STEP  # the same chosen traces per step
        run = run_stillroom(config(f"{name}_{key}", env["work"], env["teacher"], start, env["data"]["pref"], method,
                                   steps, lr, mbs, env["seed"], paper=paper, **extra))
        out[key] = evaluate(run / "student", env["tok"], env["data"]["held"])
        if method == "redi":
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            mon = [r for r in rows if r["step"] == 1 or (r["step"] - 1) % MONITOR == 0]
            out[key]["curve"] = [(int(r["redi/monitor_step"]), r["redi/logp_chosen"], r["redi/logp_rejected"])
                                 for r in mon]
    return out


def one_seed(seed: int, work: Path, quick: bool) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    built = build_data(seed)
    data = {"held": built["held"], "stats": built["stats"], **{k: write_jsonl(built[k], work / f"{k}.jsonl")
                                                                for k in ("sft", "pref")}}
    tok = char_tokenizer(ALPHABET)
    teacher = save_model(tiny_llama(len(tok), layers=1, hidden=16, seed=seed), tok, work / "tokenizer_holder")
    init = save_model(tiny_llama(len(tok), layers=LAYERS, hidden=HIDDEN, seed=seed), tok, work / "init")
    env = {"work": work, "teacher": teacher, "data": data, "tok": tok, "seed": seed}
    n = (lambda s: max(4, s // 4)) if quick else (lambda s: s)
    start = run_stillroom(config("stage1", work, teacher, init, data["sft"], "sft", n(STAGE1_STEPS), STAGE1_LR, 32,
                                 seed)) / "student"
    out = {"stats": data["stats"], "stage1": evaluate(start, tok, data["held"])}
    out["high"] = stage2("high", env, start, lr=HIGH_LR, steps=n(HIGH_STEPS), paper=False)
    out["lr"] = {f"{lr:g}": stage2(f"lr{lr:g}", env, start, lr=lr, steps=n(PAPER_STEPS), paper=True)
                 for lr in ((PAPER_LR,) if quick else SWEEP_LRS)}
    long = run_stillroom(config("stage1_long", work, teacher, init, data["sft"], "sft", n(PLATEAU_STAGE1_STEPS),
                                STAGE1_LR, 32, seed)) / "student"
    out["plateau"] = {"stage1": evaluate(long, tok, data["held"]),
                      **stage2("plateau", env, long, lr=PAPER_LR, steps=n(PAPER_STEPS), paper=True)}
    brief = {k: round(v["acc"], 3) for k, v in out["lr"][f"{PAPER_LR:g}"].items()}
    print(f"seed {seed}: {time.perf_counter() - t0:.0f}s stage1 {out['stage1']['acc']:.3f}, lr {PAPER_LR:g}: {brief}",
          flush=True)
    return out


def previous_run() -> dict | None:
    """The first run of this reproduction (high LR only, stored before the LR arms existed), carried along."""
    from bench.repro.common import RESULTS

    path = RESULTS / "repro_redi.json"
    stored = json.loads(path.read_text()) if path.is_file() else {"per_seed": [{"high": None}]}
    keep = ("finished", "setting", "table_md", "verdict_text", "seconds", "seeds")
    first = {k: stored.get(k) for k in keep} if "high" not in stored["per_seed"][0] else None
    return stored.get("previous_run", first)


def main(seeds: list[int], work: Path, quick: bool) -> dict:
    torch.set_num_threads(1)
    previous = previous_run()
    tasks = [(seed, Path(work) / f"seed{seed}", quick) for seed in seeds]
    with multiprocessing.get_context("spawn").Pool(min(JOBS, len(seeds))) as pool:
        per_seed = pool.starmap(one_seed, tasks)
    return summarise(per_seed, seeds, previous)


def _first_last(arm_rows: list[dict], key: str) -> dict:
    """Per seed: chosen / rejected log-prob at the first and last monitored step (nats/token)."""
    curves = [r[key]["curve"] for r in arm_rows]
    return {"first_c": [c[0][1] for c in curves], "last_c": [c[-1][1] for c in curves],
            "first_r": [c[0][2] for c in curves], "last_r": [c[-1][2] for c in curves]}


def claim_parts(arm_rows: list[dict], tag: str) -> list:
    """The claim's five parts on one arm (``arm_rows``: per seed ``{variant: evaluate(...)}``)."""
    acc = {k: [r[k]["acc"] for r in arm_rows] for k in VARIANTS}
    c8, c1 = _first_last(arm_rows, "redi_0.8"), _first_last(arm_rows, "redi_1.0")
    drop = lambda c, s: [f - l for f, l in zip(c["first_" + s], c["last_" + s])]  # noqa: E731
    # "collapse" = the chosen and the rejected log-prob both fall by more than 1 nat/token
    return [
        beyond_spread(f"REDI alpha=0.8 beats the SFT continuation (accuracy) {tag}",
                      paired(acc["redi_0.8"], acc["sft"])),
        beyond_spread(f"alpha=0.8 stays stable: chosen log-prob falls by less than 1 nat/token {tag}",
                      [-x for x in drop(c8, "c")], margin=-1.0),
        beyond_spread(f"alpha=1 collapses: chosen log-prob falls by more than 1 nat/token {tag}", drop(c1, "c"),
                      margin=1.0),
        beyond_spread(f"alpha=1 collapses: rejected log-prob falls by more than 1 nat/token {tag}", drop(c1, "r"),
                      margin=1.0),
        beyond_spread(f"alpha=1 ends below alpha=0.8 (accuracy) {tag}", paired(acc["redi_0.8"], acc["redi_1.0"])),
    ]


def sweep_row(label: str, arm_rows: list[dict]) -> list[str]:
    acc = {k: [r[k]["acc"] for r in arm_rows] for k in VARIANTS}
    c8, c1 = _first_last(arm_rows, "redi_0.8"), _first_last(arm_rows, "redi_1.0")
    return [label, *(fmt(acc[k]) for k in VARIANTS), fmt(paired(acc["redi_0.8"], acc["sft"])),
            f"{fmt(c8['last_c'], 2)} / {fmt(c1['last_c'], 2)}", f"{fmt(c8['last_r'], 2)} / {fmt(c1['last_r'], 2)}"]


def tables(per_seed: list[dict], lrs: list[str]) -> str:
    arm = lambda name: [r[name] for r in per_seed]  # noqa: E731
    rows = [sweep_row(f"{HIGH_LR:g} constant, {HIGH_STEPS} steps (arm high)", arm("high"))]
    rows += [sweep_row(f"{lr} linear, {PAPER_STEPS} steps" + (" (verdict)" if lr == f"{PAPER_LR:g}" else ""),
                       [r["lr"][lr] for r in per_seed]) for lr in lrs]
    rows.append(sweep_row(f"{PAPER_LR:g} linear, {PAPER_STEPS} steps, from the {PLATEAU_STAGE1_STEPS}-step stage 1",
                          arm("plateau")))
    sweep = markdown_table(["stage-2 LR", "SFT continuation", "REDI alpha=0.8", "REDI alpha=1",
                            "REDI 0.8 - SFT (paired)", "logp chosen at end (0.8 / 1)",
                            "logp rejected at end (0.8 / 1)"], rows)
    paper = [r["lr"][f"{PAPER_LR:g}"] for r in per_seed]
    where = [("stage 1", [r["stage1"] for r in per_seed])]
    where += [(f"{k} at lr {PAPER_LR:g}", [p[k] for p in paper]) for k in VARIANTS]
    where += [(f"redi_0.8 at lr {HIGH_LR:g} (arm high)", [r["high"]["redi_0.8"] for r in per_seed]),
              (f"stage 1, {PLATEAU_STAGE1_STEPS} steps", [r["plateau"]["stage1"] for r in per_seed])]
    errors = markdown_table(["model", "exact match", "scratchpad right", "answer not read out of its own scratchpad"],
                            [[n, fmt([e["acc"] for e in ev]), fmt([e["pad_ok"] for e in ev]),
                              fmt([e["unfaithful"] for e in ev])] for n, ev in where])
    st = per_seed[0]["stats"]
    return (f"Held-out exact match by stage-2 LR (stage 1: {fmt([r['stage1']['acc'] for r in per_seed])}; "
            f"{PLATEAU_STAGE1_STEPS}-step stage 1: {fmt([r['plateau']['stage1']['acc'] for r in per_seed])}):\n\n"
            f"{sweep}\n\nWhere the errors are (fractions of the {N_EVAL} held-out problems, greedy):\n\n{errors}\n\n"
            f"Data (seed 0 of the list): {st['sft_rows']} correct traces (D_SFT), {st['pref_rows']} pairs (D_Pref), "
            f"{st['correct']} correct / {st['incorrect']} incorrect teacher samples. logp = mean log pi(y|x)/|y| "
            "(nats/token) of the step's pairs before the update at the last monitored step; at the first it is "
            f"{fmt(_first_last(arm('high'), 'redi_0.8')['first_c'], 2)} (chosen) and "
            f"{fmt(_first_last(arm('high'), 'redi_0.8')['first_r'], 2)} (rejected).")


def summarise(per_seed: list[dict], seeds: list[int], previous: dict | None = None) -> dict:
    """Tables, verdict and analysis from the per-seed numbers (also re-run on a stored result's ``per_seed``).

    The verdict's required parts are the claim at ``PAPER_LR``; every other arm's parts are reported only."""
    lrs, key = list(per_seed[0]["lr"]), f"{PAPER_LR:g}"
    acc = lambda rows, k: [r[k]["acc"] for r in rows]  # noqa: E731
    beats = lambda tag, rows, base: beyond_spread(  # noqa: E731
        f"REDI alpha=0.8 beats {'the SFT continuation' if base == 'sft' else 'its stage-1 start'} (accuracy) [{tag}]",
        paired(acc(rows, "redi_0.8"), acc(rows, base)))
    paper = [dict(r["lr"][key], stage1=r["stage1"]) for r in per_seed]
    required = claim_parts(paper, f"[lr {key}]")
    others = claim_parts([r["high"] for r in per_seed], f"[lr {HIGH_LR:g} constant]")
    others.append(beats(f"lr {key}", paper, "stage1"))
    others += [beats(f"lr {lr}", [r["lr"][lr] for r in per_seed], "sft") for lr in lrs if lr != key]
    plateau, tag = [r["plateau"] for r in per_seed], f"{PLATEAU_STAGE1_STEPS}-step stage 1"
    others += [beats(tag, plateau, "sft"), beats(tag, plateau, "stage1")]
    verdict = verdict_fields(required + others, [p.name for p in required])
    table = tables(per_seed, lrs)
    if previous:
        table += (f"\n\nFirst run of this reproduction ({previous['finished']}, high LR only; its stage 1 came from "
                  f"the code of that date):\n\n{previous['table_md']}")
    return {
        "claim": "Asymmetric REDI (alpha=0.8) improves over SFT and stays stable; symmetric REDI (alpha=1) at the "
                 "same LR collapses, with the chosen and rejected log-probs falling together. Issue 16 asks for "
                 "the check at the paper's stage-2 learning rate.",
        "setting": setting(lrs, per_seed[0]["stats"]["pref_rows"]),
        "table_md": table,
        **verdict,
        "analysis": analysis(per_seed, required, others, lrs),
        "per_seed": per_seed,
        **({"previous_run": previous} if previous else {}),
    }


def setting(lrs: list[str], pairs: int) -> str:
    return (f"{DIGITS}-digit addition with a scratchpad, char tokenizer; noisy rule-based teacher ({N_SAMPLES} "
            f"samples/problem; a trace drops a carry with probability {ERROR_RATE}), {N_TRAIN} train / {N_EVAL} "
            f"held-out problems; student: random {LAYERS}-layer Llama d={HIDDEN}. Stage 1: stillroom run method=sft, "
            f"{STAGE1_STEPS} steps x 32 sequences, lr {STAGE1_LR}. Stage 2 from the same checkpoint via stillroom run, "
            f"{PAIRS_PER_STEP} pairs per step (SFT continuation: their {PAIRS_PER_STEP} chosen traces), the same steps "
            f"and data for the three variants of an arm. Arm high (the first version): {HIGH_STEPS} steps, constant lr "
            f"{HIGH_LR:g} after {HIGH_STEPS // 10} warmup steps, AdamW betas (0.9, 0.95), no weight decay. LR arms: "
            f"the paper's stage-2 optimiser (AdamW betas (0.9, 0.999), weight decay 1e-4, 10% warmup, linear decay "
            f"to 0), {PAPER_STEPS} steps (the paper's stage 2 takes about as many steps as its stage 1), lr in "
            f"{', '.join(lrs)}. The verdict's LR {PAPER_LR:g} is the paper's stage-2/stage-1 LR ratio (1e-6 / 5e-5) "
            f"times our stage-1 LR, fixed before the 3-seed run; 1e-6 is the paper's absolute value. Arm plateau: "
            f"lr {PAPER_LR:g} from a stage 1 of {PLATEAU_STAGE1_STEPS} steps. Batch {PAIRS_PER_STEP} pairs, not the "
            f"paper's 32; {PAPER_STEPS * PAIRS_PER_STEP / pairs:.1f} epochs of D_Pref, not 1; lr 3e-5 left out of the "
            f"sweep to fit the shared CPU. DPO "
            f"not run (no reference-model path in the product). Greedy exact match on held-out problems.")


def analysis(per_seed: list[dict], required: list, others: list, lrs: list[str]) -> str:
    key, n = f"{PAPER_LR:g}", len(per_seed)
    m = lambda rows, k, field="acc": mean_std([r[k][field] for r in rows])[0]  # noqa: E731
    paper = [r["lr"][key] for r in per_seed]
    high, plateau = [r["high"] for r in per_seed], [r["plateau"] for r in per_seed]
    beats = [p for p in required + others if p.name.startswith("REDI alpha=0.8 beats the SFT")]
    drop_c1 = {lr: mean_std([c[0][1] - c[-1][1] for c in (r["lr"][lr]["redi_1.0"]["curve"] for r in per_seed)])[0]
               for lr in lrs}
    st = build_data(0)["stats"]  # how a pair's traces relate (seed 0's data, rebuilt; no training)
    text = (
        f"At the verdict LR {key} (the paper's LR ratio at our scale, its schedule and optimiser), held-out exact "
        f"match (means over {n} seeds): stage 1 {m(per_seed, 'stage1'):.3f}, "
        f"SFT continuation {m(paper, 'sft'):.3f}, REDI alpha=0.8 {m(paper, 'redi_0.8'):.3f}, alpha=1 "
        f"{m(paper, 'redi_1.0'):.3f}. REDI 0.8 minus SFT continuation, paired: "
        + "; ".join(f"{p.name.rsplit('[', 1)[1].rstrip(']')}: {p.evidence()}" for p in beats)
        + ". alpha=1's chosen log-prob falls by " + ", ".join(f"{drop_c1[lr]:.2f} at {lr}" for lr in lrs)
        + f" nats/token: more than 1 at {', '.join(x for x in lrs if drop_c1[x] > 1) or 'no LR'} (the paper: alpha=1 "
        "stable at 2e-7, collapsing at 1e-6). ")
    if not any(p.held for p in beats) and all(p.mean < 0 for p in beats):
        text += ("So the accuracy deficit is not an LR artefact: at every LR where the student moves, alpha=0.8 ends "
                 "below the SFT continuation with equal steps and chosen traces. ")
    text += (f"Answers not read out of their own scratchpad (lr {key}): REDI 0.8 "
             f"{m(paper, 'redi_0.8', 'unfaithful'):.3f}, SFT {m(paper, 'sft', 'unfaithful'):.3f}; scratchpads right: "
             f"REDI 0.8 {m(paper, 'redi_0.8', 'pad_ok'):.3f}, SFT {m(paper, 'sft', 'pad_ok'):.3f}. ")
    if m(paper, "redi_0.8", "unfaithful") > m(paper, "sft", "unfaithful"):
        text += (
            f"This points at the data, not the LR. A rejected trace here is its chosen trace with one carry dropped "
            f"(common prefix: {st['shared_prefix']:.2f} of the chosen characters). In {st['answer_only']:.2f} of the "
            f"pairs only the answer's leading 1 is missing; in the rest a column lacks its carry and the answer "
            f"faithfully reads out that wrong scratchpad, so the negative term also pushes down copying the scratchpad "
            f"into the answer, which every correct answer needs. On the shared prefix the two terms nearly cancel "
            f"(net weight 1/|y_w| - alpha/|y_l| with |y_l| < |y_w|: below 0.2/|y_w| at alpha=0.8, negative at alpha=1, "
            f"hence alpha=1's falling chosen log-prob), so REDI learns the shared steps far more slowly than SFT. The "
            f"paper's traces are independent samples of thousands of tokens that presumably diverge early, so both "
            f"effects should be much smaller there (not measured). ")
    text += (f"From a {PLATEAU_STAGE1_STEPS}-step stage 1 ({m(plateau, 'stage1'):.3f}): SFT {m(plateau, 'sft'):.3f}, "
             f"REDI 0.8 {m(plateau, 'redi_0.8'):.3f}, REDI 1 {m(plateau, 'redi_1.0'):.3f}. At the constant LR "
             f"{HIGH_LR:g} (arm high, rerun): SFT {m(high, 'sft'):.3f}, REDI 0.8 {m(high, 'redi_0.8'):.3f}, REDI 1 "
             f"{m(high, 'redi_1.0'):.3f}. ")
    return text + ("Every required part holds beyond the seed spread at this scale." if all(p.held for p in required)
                   else "The claim does not hold in full here; not beyond the seed spread: "
                   + "; ".join(p.name for p in required if not p.held) + ".")


def resummarize(stored: dict) -> dict:
    """The summary recomputed from a stored result's per-seed numbers (no experiment is re-run)."""
    return summarise(stored["per_seed"], stored["seeds"], stored.get("previous_run"))
