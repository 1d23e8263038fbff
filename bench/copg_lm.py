"""CoPG on a small LM task with a verifiable, graded reward (issue 16; spec 14d): the student before vs after
``method: copg`` vs SFT on the best of the same completions, 3 seeds.

Per seed: a character-level tiny Llama (2 layers, d 64) is first trained (``method: sft``, 300 steps) on noisy
answers to the 100 problems ``a+b=`` (a, b in 0..9): per problem 8 answers, right with p 0.25, one too high with
p 0.35, else off by 2..5 either way. This start policy usually answers one too high (greedy) and samples the right
answer about a quarter of the time. From it, 4 completions per problem are sampled (temperature 1) and scored by
the graded verifier ``R = max(0, 1 - |answer - (a+b)| / 5)`` (0 when no number is read), giving
``{prompt, completions, rewards}`` records. Two arms start from the same student, same data, steps (80) and lr:

* **CoPG** (``method: copg``, k 4, beta 0.1, pi_ref = the frozen start);
* **SFT-best** (``method: sft`` on prompt + the best-rewarded of the 4 completions, first on ties).

Measured on all 100 problems (the training prompts: this checks that CoPG optimises the reward of its offline
data, not generalisation to unseen sums): greedy exact accuracy, greedy mean reward and the sampled mean reward
(8 samples per problem at temperature 1: the expected reward that CoPG's objective trades against KL).
Parts: CoPG raises the sampled mean reward over the start (required); CoPG vs SFT-best on sampled mean reward and
on greedy accuracy (reported).

    .venv/bin/python bench/copg_lm.py     # 3 seeds -> bench/results/copg_lm.json (a few minutes)
    .venv/bin/python bench/copg_lm.py --from-results   # re-decide the verdict and analysis from the stored numbers
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.repro.common import (  # noqa: E402
    RESULTS, char_tokenizer, fmt, markdown_table, run_stillroom, save_model, tiny_llama, write_jsonl,
)
from bench.repro.verdict import beyond_spread, paired, verdict_fields  # noqa: E402

SEEDS, K, BETA, STEPS, LONG_STEPS, LR, EVAL_SAMPLES = (0, 1, 2), 4, 0.1, 80, 250, 1e-3, 8
PROBLEMS = [(a, b) for a in range(10) for b in range(10)]
CLAIM = ("CoPG (Flet-Berliac et al. 2024, spec 14d) optimises a graded, verifiable sequence reward from offline "
         "completions: the student's expected reward rises over its start (compared with SFT on the best "
         "completion of the same data)")


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def reward(text: str, a: int, b: int) -> float:
    """Graded verifier: 1 for the right sum, 0.2 less per unit of error, 0 from 5 off or without a number."""
    found = re.match(r"\s*(-?\d+)", text)
    return 0.0 if found is None else max(0.0, 1.0 - abs(int(found.group(1)) - (a + b)) / 5)


def noisy_answer(rng: random.Random, a: int, b: int) -> int:
    u = rng.random()
    if u < 0.25:
        return a + b
    if u < 0.60:
        return a + b + 1
    return max(0, a + b + rng.choice([-5, -4, -3, -2, 2, 3, 4, 5]))


def sample(model, tok, prompts: list[str], n: int, *, seed: int, greedy: bool = False) -> list[list[str]]:
    """``n`` continuations (3 tokens at most) of each prompt, decoded."""
    torch.manual_seed(seed)
    model.eval()
    enc = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True)  # equal lengths per a, b digit
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), 25):
            ids = enc["input_ids"][i:i + 25]
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                 do_sample=not greedy, temperature=1.0 if not greedy else None, top_k=None, top_p=None,
                                 num_return_sequences=n, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
            out += [texts[j * n:(j + 1) * n] for j in range(len(ids))]
    return out


@torch.no_grad()
def offline_mass(model, tok, groups: list[dict]) -> float:
    """Mean over prompts of the probability the model gives to the distinct offline completions of the prompt
    (each with its EOS, as the data pipeline encodes them): CoPG's loss is unchanged when all of a prompt's
    completions lose log-probability together, so this shows whether mass leaks to answers outside the data."""
    total = 0.0
    for g in groups:
        head = tok(g["prompt"], add_special_tokens=False)["input_ids"]
        for text in set(g["completions"]):
            tail = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([head + tail])
            logp_tv = torch.log_softmax(model(input_ids=ids).logits[0, len(head) - 1:-1].float(), -1)
            total += float(logp_tv.gather(-1, torch.tensor(tail)[:, None]).sum().exp())
    return total / len(groups)


def measure(folder: Path, tok, seed: int, groups: list[dict]) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [prompt(a, b) for a, b in PROBLEMS]
    greedy = [g[0] for g in sample(model, tok, prompts, 1, seed=seed, greedy=True)]
    sampled = sample(model, tok, prompts, EVAL_SAMPLES, seed=seed + 77)
    g_rewards = [reward(t, a, b) for t, (a, b) in zip(greedy, PROBLEMS)]
    per_problem = [[reward(t, a, b) for t in texts] for texts, (a, b) in zip(sampled, PROBLEMS)]
    s_rewards = [r for rs in per_problem for r in rs]
    return {"greedy_accuracy": sum(r == 1.0 for r in g_rewards) / len(g_rewards),
            "greedy_reward": sum(g_rewards) / len(g_rewards), "sampled_reward": sum(s_rewards) / len(s_rewards),
            "tilted_reward": sum(map(tilted, per_problem)) / len(per_problem),
            "offline_mass": offline_mass(model, tok, groups)}


def tilted(rewards: list[float]) -> float:
    """Self-normalised estimate, from a model's samples of one prompt, of the expected reward under
    ``model * exp(R / beta) / Z``: CoPG's fixed point when the model is pi_ref (biased for few samples)."""
    weights = [math.exp(r / BETA) for r in rewards]
    return sum(w * r for w, r in zip(weights, rewards)) / sum(weights)


def recipe(name: str, out: Path, teacher: Path, data: Path, method: str, steps: int, lr: float, seed: int,
           **extra) -> dict:
    return {"name": name, "output_dir": str(out), "seed": seed, "method": method,
            "teacher": {"model": {"path": str(teacher)}, "dtype": "float32"},
            "student": {"model": {"path": str(teacher)}},
            "data": {"sources": [{"path": str(data), "format": "prompt_completion"}], "seq_len": 16,
                     "heldout_fraction": 0.1, "heldout_max": 8},
            "loss": {"terms": [{"name": "ce"}]},
            "train": {"steps": steps, "micro_batch_size": 32, "lr": lr, "precision": "fp32", "warmup_steps": 5,
                      "schedule": "constant", "device": "cpu", "keep_checkpoints": 1, "log_every": 20},
            "eval": {"before": False, "generations": 0, "heldout_sequences": 8, "speed_tokens": 16,
                     "max_new_tokens": 3},
            **extra}


def run_seed(seed: int, work: Path) -> dict:
    tok = char_tokenizer("0123456789+=-")
    rng = random.Random(seed)
    init = save_model(tiny_llama(len(tok), layers=2, hidden=64, seed=seed, max_positions=32), tok, work / "init")
    noisy = write_jsonl(({"prompt": prompt(a, b), "completion": str(noisy_answer(rng, a, b))}
                         for a, b in PROBLEMS for _ in range(8)), work / "noisy.jsonl")
    start = run_stillroom(recipe("start", work, init, noisy, "sft", 300, 3e-3, seed)) / "student"
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(start)
    completions = sample(model, tok, [prompt(a, b) for a, b in PROBLEMS], K, seed=seed + 1)
    groups = [{"prompt": prompt(a, b), "completions": texts, "rewards": [reward(t, a, b) for t in texts]}
              for texts, (a, b) in zip(completions, PROBLEMS)]
    copg_data = write_jsonl(groups, work / "groups.jsonl")
    best = write_jsonl(({"prompt": g["prompt"], "completion": g["completions"][g["rewards"].index(max(g["rewards"]))]}
                        for g in groups), work / "best.jsonl")
    arms = {"start": start}
    for name, steps in (("copg", STEPS), ("copg_long", LONG_STEPS)):
        arms[name] = run_stillroom(recipe(name, work, start, copg_data, "copg", steps, LR, seed,
                                          copg={"beta": BETA, "group_size": K})) / "student"
    arms["sft_best"] = run_stillroom(recipe("sft_best", work, start, best, "sft", STEPS, LR, seed)) / "student"
    data_reward = sum(r for g in groups for r in g["rewards"]) / (K * len(groups))
    return {"data_reward": data_reward, **{name: measure(folder, tok, seed, groups) for name, folder in arms.items()}}


def summarize(per_seed: dict[int, dict]) -> dict:
    seeds = sorted(per_seed)
    col = lambda arm, key: [per_seed[s][arm][key] for s in seeds]  # noqa: E731
    parts = [
        beyond_spread("CoPG sampled reward - start", paired(col("copg", "sampled_reward"), col("start", "sampled_reward"))),
        beyond_spread("CoPG sampled reward - SFT-best", paired(col("copg", "sampled_reward"), col("sft_best", "sampled_reward"))),
        beyond_spread("CoPG greedy accuracy - SFT-best", paired(col("copg", "greedy_accuracy"), col("sft_best", "greedy_accuracy"))),
        beyond_spread("CoPG greedy accuracy - start", paired(col("copg", "greedy_accuracy"), col("start", "greedy_accuracy"))),
        beyond_spread(f"CoPG {LONG_STEPS} steps sampled reward - start",
                      paired(col("copg_long", "sampled_reward"), col("start", "sampled_reward"))),
        beyond_spread(f"probability of the offline completions, start - CoPG {LONG_STEPS} steps",
                      paired(col("start", "offline_mass"), col("copg_long", "offline_mass"))),
    ]
    fields = verdict_fields(parts, required=[parts[0].name])
    rows = [[name, fmt(col(arm, "greedy_accuracy")), fmt(col(arm, "greedy_reward")), fmt(col(arm, "sampled_reward")),
             fmt(col(arm, "offline_mass"))]
            for arm, name in (("start", "start (noisy SFT)"), ("copg", f"CoPG, {STEPS} steps"),
                              ("copg_long", f"CoPG, {LONG_STEPS} steps"), ("sft_best", f"SFT on the best of 4, {STEPS} steps"))]
    table = markdown_table(["student", "greedy accuracy", "greedy mean reward", "sampled mean reward",
                            "probability of the offline completions"], rows)
    table += (f"\n\nMean reward of the 4 offline completions: {fmt([per_seed[s]['data_reward'] for s in seeds])}. "
              f"CoPG's target, the expected reward under start * exp(R / beta) / Z, estimated from the start's "
              f"{EVAL_SAMPLES} samples per problem (self-normalised, biased low for few samples): "
              f"{fmt(col('start', 'tilted_reward'))}.")
    mean = lambda arm, key: sum(col(arm, key)) / len(seeds)  # noqa: E731
    return {**fields, "table_md": table,
            "analysis": analysis(parts, fields["held"], mean("start", "tilted_reward"), mean("copg", "sampled_reward"),
                                 {arm: mean(arm, "offline_mass") for arm in ("start", "copg", "copg_long", "sft_best")})}


def analysis(parts, held: bool, target: float, reached: float, mass: dict[str, float]) -> str:
    up, vs_sft, acc_sft, acc_up, long_up, leak = parts
    return (f"CoPG {'raised' if up.held else 'did not raise'} the expected (sampled) reward over its start beyond "
            f"the seed spread ({up.evidence()}), and its greedy accuracy by {acc_up.evidence()}. Against SFT on the "
            f"best of the same 4 completions, its sampled reward differs by {vs_sft.evidence()} and its greedy "
            f"accuracy by {acc_sft.evidence()} ({'beyond' if vs_sft.held else 'not beyond'} / "
            f"{'beyond' if acc_sft.held else 'not beyond'} the spread). "
            f"CoPG's target, the KL-regularised optimum start * exp(R / beta) / Z, has an expected reward we estimate "
            f"at {target:.3f} from the start's samples; CoPG reached {reached:.3f} in {STEPS} steps, and "
            f"{LONG_STEPS} steps give {long_up.evidence()} over the start. Why it stops short: the loss only fixes "
            "differences of log pi - log pi_ref - R / beta *within* a prompt's offline completions, so CoPG moves "
            "probability among them and leaves the rest of the distribution where it was. The 4 samples per prompt "
            f"hold {mass['start']:.2f} of the start's probability; after CoPG they hold "
            f"{mass['copg']:.2f} ({STEPS} steps) and {mass['copg_long']:.2f} ({LONG_STEPS} steps; the change is "
            f"{-leak.mean:+.3f} ± {leak.sd:.3f}, {'beyond' if leak.held else 'within'} the spread): the mass "
            "outside the data, which the reward never scored, is untouched rather than tilted. SFT on the best "
            f"completion instead pulls mass onto the data ({mass['sft_best']:.2f}). The fixed-point guarantee "
            "needs a behaviour distribution with full support (the bandit, where every pair of arms is in the data, "
            "reaches pi* exactly); with a few samples per prompt it holds on their support only. More completions "
            "per prompt, or fresh samples from the current policy (on-policy CoPG), are the remedies to test. "
            + ("The required part held." if held else "The required part did not hold."))


def main(argv: list[str] | None = None) -> int:
    path = RESULTS / "copg_lm.json"
    if "--from-results" in (sys.argv[1:] if argv is None else argv):  # re-decide the verdict and analysis
        stored = json.loads(path.read_text())
        per_seed = {int(s): v for s, v in stored["per_seed"].items()}
        result = {**stored, **summarize(per_seed), "verdict_recomputed": time.strftime("%Y-%m-%d %H:%M:%S")}
        return write(path, result)
    torch.set_num_threads(1)
    t0, per_seed = time.time(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            per_seed[seed] = run_seed(seed, Path(tmp) / f"seed{seed}")
            print(seed, json.dumps(per_seed[seed]), flush=True)
    result = {"method": "copg_lm", "claim": CLAIM,
              "setting": (f"char-level 2-layer d64 Llama; 100 sums a+b (a, b < 10); start = 300 SFT steps on noisy "
                          f"answers; {K} sampled completions per problem, graded reward max(0, 1 - |error|/5); CoPG "
                          f"(k {K}, beta {BETA}, pi_ref = start) vs SFT on the best completion, {STEPS} steps each, "
                          f"lr {LR}, 32 sequences a step; measured on the 100 training problems"),
              **summarize(per_seed), "seeds": list(SEEDS), "per_seed": {str(s): per_seed[s] for s in SEEDS},
              "seconds": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    return write(path, result)


def write(path: Path, result: dict) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2))
    tmp_path.replace(path)
    print(f"held={result['held']}: {result['verdict_text']}\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
