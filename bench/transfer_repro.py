"""Fine-tuning transfer's CPU experiment (spec 14e, Appendix B "Fine-tuning transfer"; issue 12 item 4).

One tiny pretraining run (a 2-layer Llama, d 64, character vocabulary) on lower-cased Python documentation prose
(``pydoc_data.topics``), constant learning rate, with two checkpoints: m_s (early) and m_t (late). m_s is
fine-tuned on a task the prose never shows ("nxt abcd = bcde": shift each letter by one) into m'_s; the diff
vector Δ = m'_s - m_s is added to m_t with ``stillroom transfer`` (the library function on saved folders).
A second pretraining run from a *different* random initialisation (same data order, same steps) gives m_t^b,
which receives the same Δ. Measured on 256 held-out task examples (teacher-forced answer tokens): CE and
token accuracy of

* m_t, m_t + Δ (same lineage), m_t^b, m_t^b + Δ (other initialisation), m'_s;
* m_t fine-tuned on the task for the same F steps that made Δ ("fine-tuning the later base at equal steps");
* recycling: m_t + Δ and m_t each fine-tuned for F/4 steps (is m_t + Δ the better starting point?).

Claims (spec): m_t + Δ beats m_t on the task; the gain shrinks when m_s and m_t come from different
initialisations (no linear connectivity). Each is a per-seed paired difference, held beyond the seed spread.

    .venv/bin/python bench/transfer_repro.py                 # 3 seeds -> bench/results/repro_transfer.json
    .venv/bin/python bench/transfer_repro.py --from-results  # re-decide the verdict from the stored numbers
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.repro.common import RESULTS, char_tokenizer, fmt, markdown_table, mean_std, tiny_llama  # noqa: E402
from bench.repro.verdict import beyond_spread, paired, verdict_fields  # noqa: E402

CLAIM = ("Fine-tuning transfer (Lin et al. 2025, spec 14e): the diff vector of a fine-tuned model against its base, "
         "added to a newer base of the same lineage (m_t + (m'_s - m_s)), beats the newer base on the task; the gain "
         "shrinks when the two bases come from different random initialisations (no linear connectivity)")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
CHARS = ALPHABET + " .,=\n"
FT_S = "m'_s"
SETTING = {"layers": 2, "hidden": 64, "seq_len": 64, "batch": 32, "pretrain_lr": 3e-3, "finetune_lr": 1e-3}


def prose() -> str:
    """Lower-cased pydoc prose restricted to ``CHARS`` (everything else a space, runs of spaces collapsed)."""
    from pydoc_data.topics import topics

    text = " ".join(v for _, v in sorted(topics.items())).lower()
    text = re.sub(f"[^{re.escape(CHARS)}]", " ", text)
    return re.sub(r" +", " ", text)


def task_example(rng: random.Random) -> tuple[str, str]:
    """(prompt, answer): ``"nxt abcd = "`` and ``"bcde\\n"`` (each letter shifted by one, z -> a)."""
    word = "".join(rng.choice(ALPHABET) for _ in range(4))
    return f"nxt {word} = ", "".join(ALPHABET[(ALPHABET.index(c) + 1) % 26] for c in word) + "\n"


def task_batch(tok, examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids [B, T] and labels [B, T] (-100 except the answer tokens) of whole examples, 4 per row."""
    rows, labels = [], []
    for i in range(0, len(examples), 4):
        ids, lab = [], []
        for prompt, answer in examples[i:i + 4]:
            p, a = tok(prompt, add_special_tokens=False)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
            ids += p + a
            lab += [-100] * len(p) + a
        rows.append(ids)
        labels.append(lab)
    return torch.tensor(rows), torch.tensor(labels)


def lm_loss(model, ids_bt: torch.Tensor, labels_bt: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over the labelled positions (labels aligned with ids; shifted here)."""
    logits = model(input_ids=ids_bt).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels_bt[:, 1:].reshape(-1),
                                             ignore_index=-100)


def train(model, batches, steps: int, lr: float, *, params=None, checkpoints: dict[int, dict] | None = None,
          after_step=None):
    """AdamW at a constant ``lr`` (20 warm-up steps) for ``steps`` steps of ``batches(step)``; stores a copy of
    the weights at each step named in ``checkpoints``; calls ``after_step(step)`` (e.g. an evaluation)."""
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    for step in range(1, steps + 1):
        ids_bt, labels_bt = batches(step)
        loss = lm_loss(model, ids_bt, labels_bt)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if checkpoints is not None and step in checkpoints:
            checkpoints[step] = copy.deepcopy(model.state_dict())
        if after_step is not None:
            after_step(step)
            model.train()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model, ids_bt: torch.Tensor, labels_bt: torch.Tensor) -> dict:
    """CE and token accuracy on the labelled positions."""
    model.eval()
    logits = model(input_ids=ids_bt).logits[:, :-1]
    target = labels_bt[:, 1:]
    mask = target != -100
    ce = torch.nn.functional.cross_entropy(logits[mask], target[mask]).item()
    return {"ce": ce, "acc": (logits.argmax(-1)[mask] == target[mask]).float().mean().item()}


def prose_batches(tok, text: str, seed: int, seq_len: int, batch: int):
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    held, train_ids = ids[: 16 * seq_len].view(16, seq_len), ids[16 * seq_len:]

    def draw(step: int):
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        starts = torch.randint(0, train_ids.numel() - seq_len, (batch,), generator=g)
        rows = torch.stack([train_ids[s:s + seq_len] for s in starts])
        return rows, rows

    return draw, (held, held)


def run_seed(seed: int, a) -> dict:
    tok = char_tokenizer(CHARS)
    text = prose()
    pre_batches, prose_held = prose_batches(tok, text, seed, SETTING["seq_len"], SETTING["batch"])
    rng = random.Random(seed)
    task_held = task_batch(tok, [task_example(rng) for _ in range(256)])

    def task_batches(step: int):
        r = random.Random(seed * 7919 + step)
        return task_batch(tok, [task_example(r) for _ in range(4 * SETTING["batch"])])

    def base(init_seed: int) -> tuple[dict, dict]:
        model = tiny_llama(len(tok), layers=SETTING["layers"], hidden=SETTING["hidden"], seed=init_seed)
        ckpt = {a.early: None, a.late: None}
        train(model, pre_batches, a.late, SETTING["pretrain_lr"], checkpoints=ckpt)
        return ckpt[a.early], ckpt[a.late]

    def model_of(state: dict):
        m = tiny_llama(len(tok), layers=SETTING["layers"], hidden=SETTING["hidden"], seed=0)
        m.load_state_dict(state)
        return m.eval()

    def finetune(state: dict, steps: int):
        return train(model_of(state), task_batches, steps, SETTING["finetune_lr"])

    m_s, m_t = base(1000 + seed)
    _, m_t_other = base(2000 + seed)
    ft_s = finetune(m_s, a.finetune).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        moved = {name: transfer_folders(Path(tmp), tok, model_of, ft_s, m_s, new, name)
                 for name, new in (("same", m_t), ("other", m_t_other))}
    models = {"m_t": m_t, "m_t + delta": moved["same"], "m_t^b (other init)": m_t_other,
              "m_t^b + delta": moved["other"], "m'_s": ft_s}
    rows = {name: {"task": evaluate(model_of(s), *task_held), "prose": evaluate(model_of(s), *prose_held)}
            for name, s in models.items()}
    k = max(1, a.finetune // 4)
    for name, (state, steps) in {f"FT(m_t, {a.finetune})": (m_t, a.finetune), f"FT(m_t, {k})": (m_t, k),
                                 f"FT(m_t + delta, {k})": (moved["same"], k)}.items():
        tuned = finetune(state, steps)
        rows[name] = {"task": evaluate(tuned, *task_held), "prose": evaluate(tuned, *prose_held)}
    return rows


def transfer_folders(tmp: Path, tok, model_of, ft: dict, base: dict, new: dict, name: str) -> dict:
    """new + (ft - base) through ``stillroom.compress.transfer.transfer`` on saved folders; the result's weights."""
    from safetensors.torch import load_file

    from stillroom.compress.transfer import transfer
    from stillroom.config.transfer import TransferConfig

    paths = {}
    for role, state in (("ft", ft), ("base", base), ("new", new)):
        folder = tmp / f"{name}_{role}"
        model_of(state).save_pretrained(folder)
        tok.save_pretrained(folder)
        paths[role] = str(folder)
    out = transfer(TransferConfig(fine_tuned=paths["ft"], base=paths["base"], new_base=paths["new"],
                                  out=str(tmp / f"{name}_out")), log=lambda _m: None)
    weights = load_file(str(out / "model.safetensors"))
    state = {**new, **weights}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied
    return state


def summarize(per_seed: dict, a_early: int, a_late: int, finetune: int) -> dict:
    seeds = sorted(per_seed, key=int)
    names = list(per_seed[seeds[0]])

    def col(name: str, split: str = "task", key: str = "ce") -> list[float]:
        return [per_seed[s][name][split][key] for s in seeds]

    table = markdown_table(["model", "task CE", "task token accuracy", "prose CE"],
                           [[n, fmt(col(n)), fmt(col(n, key="acc")), fmt(col(n, "prose"))] for n in names])
    gain_same = paired(col("m_t"), col("m_t + delta"))
    gain_other = paired(col("m_t^b (other init)"), col("m_t^b + delta"))
    k = max(1, finetune // 4)
    parts = [beyond_spread("m_t + delta beats m_t on the task (CE(m_t) - CE(m_t + delta))", gain_same),
             beyond_spread("the gain shrinks across initialisations (gain same lineage - gain other init)",
                           paired(gain_same, gain_other)),
             beyond_spread(f"m_t + delta vs fine-tuning m_t for {finetune} steps (CE(FT) - CE(m_t + delta))",
                           paired(col(f"FT(m_t, {finetune})"), col("m_t + delta"))),
             beyond_spread(f"recycling: FT from m_t + delta beats FT from m_t at {k} steps",
                           paired(col(f"FT(m_t, {k})"), col(f"FT(m_t + delta, {k})")))]
    fields = verdict_fields(parts, required=[parts[0].name, parts[1].name])
    return {"claim": CLAIM, "seeds": [int(s) for s in seeds], "per_seed": per_seed, "table_md": table,
            "setting": setting(a_early, a_late, finetune), "analysis": analysis(per_seed, seeds, parts), **fields}


def setting(early: int, late: int, finetune: int) -> str:
    return (f"2-layer Llama d {SETTING['hidden']} (tied embeddings), character vocabulary; pretraining on lower-cased "
            f"pydoc prose, {SETTING['batch']} x {SETTING['seq_len']} tokens per step, AdamW {SETTING['pretrain_lr']} "
            f"constant after 20 warm-up steps; m_s = step {early}, m_t = step {late} of one run; m_t^b = step {late} "
            f"of a run from another initialisation (same data order); task 'nxt abcd = bcde' (each letter +1), "
            f"fine-tuned {finetune} steps of 128 examples at AdamW {SETTING['finetune_lr']}; delta added by "
            "`stillroom transfer` (scale 1, float64); 256 held-out task examples (CE / token accuracy on the answer "
            "tokens) and 16 held-out prose blocks; 3 seeds (data order, task draws, initialisations)")


def analysis(per_seed: dict, seeds: list, parts: list) -> str:
    def m(name: str, split: str = "task", key: str = "ce") -> float:
        return mean_std([per_seed[s][name][split][key] for s in seeds])[0]

    same, shrink, vs_ft, recycle = parts
    text = (f"Task CE: m_t {m('m_t'):.3f}, m_t + delta {m('m_t + delta'):.3f} (accuracy {m('m_t', key='acc'):.3f} -> "
            f"{m('m_t + delta', key='acc'):.3f}); other initialisation: m_t^b {m('m_t^b (other init)'):.3f}, "
            f"m_t^b + delta {m('m_t^b + delta'):.3f}; m'_s itself {m(FT_S):.3f}. ")
    text += (f"The same-lineage gain is {same.evidence()} ({'held' if same.held else 'not held'}); the gain shrinks "
             f"across initialisations by {shrink.evidence()} ({'held' if shrink.held else 'not held'}). ")
    text += (f"Against fine-tuning m_t directly for the same steps, the transferred model is behind by "
             f"{-vs_ft.mean:.3f} nats on average ({vs_ft.evidence()}): the transfer is free (no training on m_t) "
             "but does not replace fine-tuning at this scale. " if vs_ft.mean < 0 else
             f"It even matches or beats fine-tuning m_t directly for the same steps ({vs_ft.evidence()}). ")
    text += (f"As a starting point for further fine-tuning, m_t + delta {'is' if recycle.held else 'is not'} better "
             f"beyond the spread ({recycle.evidence()}). Prose CE: m_t {m('m_t', 'prose'):.3f}, m_t + delta "
             f"{m('m_t + delta', 'prose'):.3f}, m_t^b + delta {m('m_t^b + delta', 'prose'):.3f}, m'_s "
             f"{m(FT_S, 'prose'):.3f}, m_t fine-tuned {m(f'FT(m_t, {_ft_steps(per_seed, seeds)})', 'prose'):.3f}: the "
             "narrow task fine-tune (full weights, no prose replay) forgets the prose in every fine-tuned model, and "
             "the transferred diff carries that forgetting with the skill; across initialisations the diff neither "
             "teaches the task nor costs much prose, i.e. it is close to noise for an unrelated basin. The per-seed "
             "spread of the fine-tuned models (e.g. m'_s) comes from the fine-tune itself (AdamW 1e-3, 200 steps "
             "is at the edge of learning the task for some seeds).")
    return text


def _ft_steps(per_seed: dict, seeds: list) -> int:
    """F, the fine-tuning steps of the run (from the stored row names ``FT(m_t, F)``)."""
    names = [n for n in per_seed[seeds[0]] if n.startswith("FT(m_t, ")]
    return max(int(n[len("FT(m_t, "):-1]) for n in names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--early", type=int, default=300, help="pretraining step of m_s")
    ap.add_argument("--late", type=int, default=600, help="pretraining step of m_t (and m_t^b)")
    ap.add_argument("--finetune", type=int, default=200, help="task fine-tuning steps that make delta")
    ap.add_argument("--from-results", action="store_true", help="only re-decide the verdict from the stored numbers")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    path, t0 = RESULTS / "repro_transfer.json", time.time()
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if a.from_results:
        per_seed, seconds = stored["per_seed"], stored["seconds"]
        a.early, a.late, a.finetune = stored["early"], stored["late"], stored["finetune"]
    else:
        per_seed = {}
        for seed in a.seeds:
            per_seed[str(seed)] = run_seed(seed, a)
            print(seed, json.dumps({n: round(r["task"]["ce"], 4) for n, r in per_seed[str(seed)].items()}), flush=True)
        seconds = round(time.time() - t0, 1)
    result = {"method": "transfer", **summarize(per_seed, a.early, a.late, a.finetune), "early": a.early,
              "late": a.late, "finetune": a.finetune, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2))
    tmp_path.replace(path)
    print(result["table_md"], "\n", result["verdict_text"], "\n", result["analysis"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
