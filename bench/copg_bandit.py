"""CoPG's bandit check (spec 14d, Appendix B item 14): the fixed point of CoPG on offline data is the
KL-regularised optimum pi* = pi_ref exp(R / beta) / Z; DPO on the same pairs, labelled by the higher reward,
does not reach it when R is not binary.

Setting, per seed: 10 arms; a non-uniform reference policy pi_ref = softmax(N(0, 1) logits); graded rewards
R(a) ~ U(0, 1) (not binary); beta = 0.25; an offline data set of 2000 pairs (y, y') drawn uniformly over the
arms (the behaviour distribution mu is uniform, not pi_ref). A softmax policy pi_theta starts at pi_ref and is
trained with Adam (lr 0.05, 64 pairs a step, 3000 steps) on
* CoPG: :func:`stillroom.losses.preference.copg_pair` (the library's loss, the same code method ``copg`` uses);
* DPO: :func:`stillroom.losses.preference.dpo_sigmoid` on the same pairs, chosen = the arm with the higher reward
  (ties dropped), beta as above;
* DPO-BT (reported, not required): DPO on labels drawn from the Bradley-Terry model
  P(y > y') = sigmoid(R(y) - R(y')), whose population optimum is pi* too (DPO's implicit reward
  beta log(pi / pi_ref) then equals R up to a constant): it shows what the deterministic labels lose (the
  reward magnitudes), and how much label noise costs at this data size.
Measured: TV(pi, pi*) and KL(pi* || pi) every 100 steps. Parts: CoPG ends closer to pi* than DPO (TV); CoPG's
final TV is below 0.02 (converged).

    .venv/bin/python bench/copg_bandit.py     # 3 seeds -> bench/results/copg_bandit.json (about a minute)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.repro.common import RESULTS, fmt, markdown_table  # noqa: E402
from bench.repro.verdict import beyond_spread, verdict_fields  # noqa: E402
from stillroom.losses.preference import copg_pair, dpo_sigmoid  # noqa: E402

ARMS, BETA, PAIRS, BATCH, STEPS, LR, EVERY = 10, 0.25, 2000, 64, 3000, 0.05, 100
SEEDS = (0, 1, 2)
CONVERGED_TV = 0.02
CLAIM = ("CoPG (Flet-Berliac et al. 2024, spec 14d): on a 10-arm bandit with uniform offline pairs and graded "
         "(non-binary) rewards, the policy trained with CoPG converges to pi_ref exp(R/beta)/Z; DPO on the same "
         "pairs labelled by the higher reward does not")


def bandit(seed: int) -> dict:
    """The seed's reference logits ``[A]``, rewards ``[A]``, offline pairs ``[P, 2]`` and target pi* ``[A]``."""
    g = torch.Generator().manual_seed(seed)
    ref_logits_a = torch.randn(ARMS, generator=g, dtype=torch.float64)
    reward_a = torch.rand(ARMS, generator=g, dtype=torch.float64)
    pairs_p2 = torch.randint(0, ARMS, (PAIRS, 2), generator=g)
    pairs_p2 = pairs_p2[pairs_p2[:, 0] != pairs_p2[:, 1]]  # a pair of one arm with itself carries no signal
    target_a = torch.softmax(torch.log_softmax(ref_logits_a, 0) + reward_a / BETA, 0)
    bt_first_wins_p = torch.rand(len(pairs_p2), generator=g, dtype=torch.float64) < torch.sigmoid(
        reward_a[pairs_p2[:, 0]] - reward_a[pairs_p2[:, 1]])
    return {"ref_logits": ref_logits_a, "reward": reward_a, "pairs": pairs_p2, "target": target_a,
            "bt_first_wins": bt_first_wins_p}


def distances(logits_a: torch.Tensor, target_a: torch.Tensor) -> dict:
    """TV(pi, pi*) and KL(pi* || pi) of the policy ``softmax(logits_a)``."""
    logp_a = torch.log_softmax(logits_a.detach(), 0)
    return {"tv": float(0.5 * (logp_a.exp() - target_a).abs().sum()),
            "kl": float((target_a * (target_a.log() - logp_a)).sum())}


def arm_loss(kind: str, b: dict, logits_a: torch.Tensor, idx_n: torch.Tensor) -> torch.Tensor:
    """Mean loss of ``kind`` over the offline pairs ``idx_n`` (sequence log-prob of an arm = log pi(arm))."""
    logp_a, ref_a = torch.log_softmax(logits_a, 0), torch.log_softmax(b["ref_logits"], 0)
    y_n, y2_n = b["pairs"][idx_n, 0], b["pairs"][idx_n, 1]
    if kind == "copg":
        total, count = copg_pair(logp_a[y_n], logp_a[y2_n], ref_a[y_n], ref_a[y2_n], b["reward"][y_n],
                                 b["reward"][y2_n], BETA)
        return total / count
    first_wins_n = (b["reward"][y_n] > b["reward"][y2_n]) if kind == "dpo" else b["bt_first_wins"][idx_n]
    w_n, l_n = torch.where(first_wins_n, y_n, y2_n), torch.where(first_wins_n, y2_n, y_n)
    keep_n = b["reward"][w_n] != b["reward"][l_n]
    total, count = dpo_sigmoid(logp_a[w_n[keep_n]], logp_a[l_n[keep_n]], ref_a[w_n[keep_n]], ref_a[l_n[keep_n]],
                               beta=BETA)
    return total / max(count, 1)


def train(kind: str, b: dict, seed: int) -> list[dict]:
    """Adam on the policy's logits from pi_ref; the distance curve every ``EVERY`` steps."""
    logits_a = b["ref_logits"].clone().requires_grad_(True)
    opt = torch.optim.Adam([logits_a], lr=LR)
    g = torch.Generator().manual_seed(1000 + seed)
    curve = [{"step": 0, **distances(logits_a, b["target"])}]
    for step in range(1, STEPS + 1):
        idx_n = torch.randint(0, len(b["pairs"]), (BATCH,), generator=g)
        loss = arm_loss(kind, b, logits_a, idx_n)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % EVERY == 0:
            curve.append({"step": step, **distances(logits_a, b["target"])})
    return curve


def run_seed(seed: int) -> dict:
    b = bandit(seed)
    out = {kind: train(kind, b, seed) for kind in ("copg", "dpo", "dpo_bt")}
    out["ref"] = distances(b["ref_logits"], b["target"])
    return out


def summarize(per_seed: dict[int, dict]) -> dict:
    seeds = sorted(per_seed)
    final = {k: [per_seed[s][k][-1]["tv"] for s in seeds] for k in ("copg", "dpo", "dpo_bt")}
    final_kl = {k: [per_seed[s][k][-1]["kl"] for s in seeds] for k in ("copg", "dpo", "dpo_bt")}
    parts = [beyond_spread("TV(DPO, pi*) - TV(CoPG, pi*) at the end", [d - c for d, c in zip(final["dpo"], final["copg"])]),
             beyond_spread(f"CoPG converged: {CONVERGED_TV} - TV(CoPG, pi*)", [CONVERGED_TV - c for c in final["copg"]]),
             beyond_spread("TV(DPO-BT, pi*) - TV(CoPG, pi*) at the end", [d - c for d, c in zip(final["dpo_bt"], final["copg"])])]
    fields = verdict_fields(parts, required=[parts[0].name, parts[1].name])
    checkpoints = [0, 300, 1000, STEPS]
    rows = [[f"{name} TV at step {c}", fmt([per_seed[s][kind][c // EVERY]["tv"] for s in seeds])]
            for kind, name in (("copg", "CoPG"), ("dpo", "DPO"), ("dpo_bt", "DPO-BT")) for c in checkpoints]
    rows += [[f"{name} KL(pi* || pi) at the end", fmt(final_kl[kind])]
             for kind, name in (("copg", "CoPG"), ("dpo", "DPO"), ("dpo_bt", "DPO-BT"))]
    rows.append(["pi_ref's TV to pi*", fmt([per_seed[s]["ref"]["tv"] for s in seeds])])
    return {**fields, "table_md": markdown_table(["measure", "mean ± std over seeds"], rows),
            "analysis": analysis(final, fields["held"])}


def analysis(final: dict, held: bool) -> str:
    m = {k: sum(v) / len(v) for k, v in final.items()}
    return (f"CoPG's squared loss is zero exactly when log pi - log pi_ref - R/beta is the same for every arm, so "
            f"with every pair of arms in the offline data its only minimiser is pi*; it ends at TV {m['copg']:.1e} "
            f"(mean). DPO with labels from the higher reward sees only the order of the rewards: its optimum is "
            f"the arm with the highest reward at probability 1, whatever the gaps, so it moves away from pi* "
            f"(TV {m['dpo']:.3f} at the end; its KL to pi* keeps growing as the logits diverge). DPO with Bradley-Terry labels "
            f"P(y > y') = sigmoid(R(y) - R(y')) has pi* as its population optimum, but learns the gaps only through "
            f"label frequencies (TV {m['dpo_bt']:.3f} from {PAIRS} pairs, one label each): CoPG reads the reward "
            f"magnitudes directly. "
            + ("Both required parts held beyond the seed spread." if held else "The claim did not hold beyond the seed spread."))


def main() -> int:
    torch.set_num_threads(1)
    t0 = time.time()
    per_seed = {}
    for seed in SEEDS:
        per_seed[seed] = run_seed(seed)
        print(seed, {k: per_seed[seed][k][-1] for k in ("copg", "dpo", "dpo_bt")}, flush=True)
    result = {"method": "copg_bandit", "claim": CLAIM,
              "setting": (f"{ARMS} arms, pi_ref = softmax(N(0,1) logits), R ~ U(0,1), beta {BETA}, {PAIRS} uniform "
                          f"offline pairs, softmax policy from pi_ref, Adam lr {LR}, {BATCH} pairs/step, {STEPS} "
                          "steps; losses from stillroom.losses.preference (copg_pair, dpo_sigmoid)"),
              **summarize(per_seed), "seeds": list(SEEDS),
              "curves": {str(s): per_seed[s] for s in SEEDS},
              "seconds": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "copg_bandit.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    print(f"held={result['held']}: {result['verdict_text']}\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
