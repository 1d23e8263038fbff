"""SpecVLM's CPU check (spec 15): a draft VLM trained online from the target's logits and features; does longer
online training increase the accepted length?

Target: the small LLaVA of ``vlm.teacher`` (CLIP vision tower 64 x 2, projector, 3-layer Llama decoder 96 wide,
a byte-level BPE tokenizer trained here) trained here once with cross-entropy to caption procedural scenes
(``a red circle at the top left and a blue star at the bottom right``), cached and shared by every run. Draft:
the target's class with a 1-layer, 64-wide decoder and its own vision tower, random init from the run's seed.
Every arm is a ``stillroom run`` of ``method: specvlm`` on the same captions (image tokens in the prompt, the
caption learned), 16 sequences per step, AdamW 3e-3; before the first step and every ``EVAL_EVERY`` steps,
lossless speculative decoding of 12 held-out images' captions measures tau, the tokens emitted per target forward
(EAGLE's acceptance length):

* **A** SpecVLM / EAGLE loss: 0.1 x soft cross-entropy to the target + 1.0 x Smooth-L1 between the draft's last
  hidden state (through a learned linear projector) and the target's; acceptance sampled (temperature 1), gamma 5;
* **B** the logit term alone (1.0 x soft cross-entropy), measured as A: is the feature term worth having?
* **G** A's loss, acceptance greedy with gamma 3 (reported: greedy tau hits its ceiling early).

Required parts: tau(final) > tau(before training) and tau(final) > tau(half-way), beyond the seed spread.

    .venv/bin/python bench/specvlm_repro.py                  # 3 seeds -> bench/results/repro_specvlm.json
    .venv/bin/python bench/specvlm_repro.py --from-results   # re-decide the verdict from the stored numbers
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

from bench.repro.common import RESULTS, fmt, markdown_table, mean_std, run_stillroom, save_result  # noqa: E402
from bench.repro.verdict import beyond_spread, paired, verdict_fields  # noqa: E402

CLAIM = ("SpecVLM (Huang et al. 2025, spec 15): a draft trained online from the target VLM's logits and penultimate "
         "features (soft CE + Smooth-L1) accepts more tokens per target forward the longer it trains")
STEPS, EVAL_EVERY = 150, 15
SPEC_TERMS = [{"name": "soft_ce", "weight": 0.1}, {"name": "hidden_smooth_l1", "weight": 1.0,
                                                   "params": {"layers": "last"}}]
ARMS = {"A": (SPEC_TERMS, "sampling", 5), "B": ([{"name": "soft_ce", "weight": 1.0}], "sampling", 5),
        "G": (SPEC_TERMS, "greedy", 3)}
"""arm: (loss terms, how acceptance is measured, gamma)."""
LABELS = {"A": "A 0.1 soft CE + 1.0 Smooth-L1 (SpecVLM/EAGLE), sampled, gamma 5",
          "B": "B 1.0 soft CE only, sampled, gamma 5", "G": "G = A's loss, greedy, gamma 3"}
TEACHER = {"seed": 0, "steps": 600, "batch_size": 16, "lr": 3e-3}


def write_captions(work: Path) -> Path:
    """600 scenes (32 px, 1-3 objects) with one caption record each; the same folder for every run."""
    from stillroom.config.scenes import ScenesConfig
    from stillroom.domains.vl.vqa import write_vqa_folder

    folder = work / "captions"
    if not (folder / "records.jsonl").is_file():
        write_vqa_folder(ScenesConfig(image_size=32), folder, n_images=600, split="train", seed=0, per_image=0)
    return folder / "records.jsonl"


def arm_config(arm: str, seed: int, work: Path, records: Path) -> dict:
    return {
        "name": f"specvlm_{arm}_{seed}", "output_dir": str(work / "runs"), "cache_dir": str(work / "cache"),
        "seed": seed, "method": "specvlm",
        "specvlm": {"eval_every": EVAL_EVERY, "gamma": ARMS[arm][2], "prompts": 12, "max_new_tokens": 24,
                    "mode": ARMS[arm][1]},
        "vlm": {"teacher": TEACHER, "report_images": 0},
        "teacher": {"dtype": "float32"},
        "student": {"from_config": {"text_config": {"num_hidden_layers": 1, "hidden_size": 64,
                                                    "intermediate_size": 192}}},
        "data": {"sources": [{"path": str(records), "format": "text", "text_field": "caption"}], "seq_len": 64,
                 "heldout_fraction": 0.05, "heldout_max": 24},
        "loss": {"terms": ARMS[arm][0]},
        "train": {"steps": STEPS, "micro_batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "precision": "fp32",
                  "keep_checkpoints": 1, "threads": 1},
        "eval": {"heldout_sequences": 16, "batch_size": 16, "generations": 0, "speed_tokens": 64, "before": False},
    }


def seed_rows(seed: int, work: Path) -> dict:
    records = write_captions(work)
    rows = {}
    for arm in ARMS:
        t0 = time.time()
        run_dir = run_stillroom(arm_config(arm, seed, work, records))
        curve = json.loads((run_dir / "specvlm_curve.json").read_text())["points"]
        report = json.loads((run_dir / "report.json").read_text())["models"]
        rows[arm] = {"steps": [p["step"] for p in curve], "tau": [p["spec_accept_len"] for p in curve],
                     "alpha": [p["spec_alpha"] for p in curve],
                     "kl": report["student_after"].get("kl_teacher_student"), "seconds": round(time.time() - t0, 1)}
        print(f"seed {seed} arm {arm}: tau {[round(t, 3) for t in rows[arm]['tau']]} ({rows[arm]['seconds']} s)",
              flush=True)
    return rows


def summarize(per_seed: dict) -> dict:
    seeds = sorted(per_seed, key=int)

    def tau_at(arm: str, index: int) -> list[float]:
        return [per_seed[s][arm]["tau"][index] for s in seeds]

    steps = per_seed[seeds[0]]["A"]["steps"]
    half = steps.index(min(steps, key=lambda x: abs(x - STEPS // 2)))
    rows = [[f"{LABELS[a]}, step {steps[i]}", fmt(tau_at(a, i)),
             fmt([per_seed[s][a]["alpha"][i] for s in seeds])] for a in ARMS
            for i in sorted({0, 1, 2, half, len(steps) - 1})]
    table = markdown_table(["arm, training step", "acceptance length tau", "alpha"], rows)
    parts = [beyond_spread("A: tau(final) - tau(before training)", paired(tau_at("A", -1), tau_at("A", 0))),
             beyond_spread(f"A: tau(final) - tau(step {steps[half]})", paired(tau_at("A", -1), tau_at("A", half))),
             beyond_spread("A - B at the final step (the feature term)", paired(tau_at("A", -1), tau_at("B", -1))),
             beyond_spread("G (greedy): tau(final) - tau(before training)", paired(tau_at("G", -1), tau_at("G", 0))),
             beyond_spread(f"G (greedy): tau(final) - tau(step {steps[half]})",
                           paired(tau_at("G", -1), tau_at("G", half)))]
    fields = verdict_fields(parts, required=[parts[0].name, parts[1].name])
    text = analysis(per_seed, seeds, steps, half, parts)
    setting = (f"target: LLaVA (CLIP vision 64 x 2, patch 8 on 32 px = 16 image tokens, 3-layer Llama decoder 96 "
               f"wide, BPE tokenizer ~390 tokens) trained here {TEACHER['steps']} steps with CE on captions of 600 "
               f"procedural scenes (seed 0, shared by all runs); draft: the same class with a 1-layer 64-wide decoder, "
               f"random init per seed; {STEPS} steps of 16 captions, AdamW 3e-3, cosine; tau measured before training "
               f"and every {EVAL_EVERY} steps by lossless speculative decoding (up to 24 tokens, stop at EOS) of 12 "
               f"held-out images: sampled at temperature 1 with gamma 5 (A, B) or greedy with gamma 3 (G); seeds "
               f"{[int(s) for s in seeds]} (draft init and sampling order); the wall time leaves out the target's training (cached by "
               f"an earlier run; 2-5 minutes on this shared machine)")
    return {"method": "specvlm", "claim": CLAIM, "seeds": [int(s) for s in seeds], "per_seed": per_seed,
            "setting": setting, "table_md": table, "analysis": text, "steps": STEPS, **fields}


def analysis(per_seed: dict, seeds: list, steps: list, half: int, parts: list) -> str:
    def tau(arm: str, index: int) -> str:
        return fmt([per_seed[s][arm]["tau"][index] for s in seeds], 2)

    first, later, feature, g_first, g_later = parts
    rises = [sum(b >= a for a, b in zip(per_seed[s]["A"]["tau"], per_seed[s]["A"]["tau"][1:])) for s in seeds]
    target = per_seed[seeds[0]].get("target", {})
    text = (f"Sampled (gamma 5), arm A's acceptance length goes from {tau('A', 0)} before training to {tau('A', half)} "
            f"at step {steps[half]} and {tau('A', -1)} at step {steps[-1]} ({rises} of {len(steps) - 1} consecutive "
            f"measurements per seed do not fall). Final minus initial {first.evidence(3)} "
            f"({'beyond' if first.held else 'not beyond'} the spread); final minus half-way {later.evidence(3)} "
            f"({'beyond' if later.held else 'not beyond'} the spread): "
            + ("longer online training kept increasing the accepted length. " if later.held else
               "the second half of training did not add acceptance beyond the spread. ")
            + f"Greedy (G, gamma 3): {tau('G', 0)} -> {tau('G', half)} -> {tau('G', -1)}; final minus half-way "
            f"{g_later.evidence(3)}: greedy acceptance reaches its ceiling (gamma + 1 = 4) early, which is why the "
            f"sampled measure (acceptance min(1, p/q): how closely the whole distribution matches) carries the claim. "
            f"The logit term alone (B, soft CE at weight 1) ends at {tau('B', -1)}; A - B {feature.evidence(3)}: "
            + feature_sentence(feature)
            + f"The target itself: {target.get('exact', '?')} of {target.get('n', '?')} held-out captions exact, "
            f"{target.get('distinct', '?')} distinct greedy captions: trained from scratch for "
            f"{TEACHER['steps']} steps, it has barely learnt to read the scenes, so the draft mostly has to match the "
            "target's language model (the vision tower learns slowly at this scale: 32 scenes need ~300 steps to be "
            "memorised). Caveats: tau counts the target's own token per round (1 = nothing accepted, at most "
            "gamma + 1); the draft is a plain 1-layer VLM, not EAGLE's feature-autoregressive head, so the features "
            "are a training signal, never an input of the draft.")
    return text


def feature_sentence(feature) -> str:
    """What the A - B part says about the Smooth-L1 feature term (reported, not required)."""
    if feature.held:
        return "the Smooth-L1 feature term helped beyond the spread. "
    if feature.mean < 0 and -feature.mean > feature.sd:
        return ("the logit term alone did better, beyond the spread: with EAGLE's weights the soft CE is 0.1 of the "
                "loss, and matching the target's distribution is what sampled acceptance rewards; the feature "
                "regression did not make up for it at this scale. ")
    return "the feature term's effect is not beyond the spread at this scale. "


def target_captions(work: Path, n: int = 30) -> dict:
    """The cached target's greedy captions of ``n`` held-out images: exact matches and distinct captions."""
    from stillroom.config.core import DataConfig, DataSource, ModelSource
    from stillroom.data import build_splits
    from stillroom.domains.vl.vlm_eval import prompt_and_pixels
    from stillroom.domains.vl.vlm_teacher import vlm_encoder
    from stillroom.generate.speculative import autoregressive_generate
    from stillroom.models import load_model

    folder = next((work / "cache" / "vlms").iterdir())
    loaded = load_model(ModelSource(path=str(folder)))
    model, tok = loaded.model.eval(), loaded.tokenizer
    src = DataSource(path=str(write_captions(work)), format="text", text_field="caption")
    data = build_splits(DataConfig(sources=[src], seq_len=64, heldout_fraction=0.05, heldout_max=n), tok, 0,
                        vlm_encoder(model, folder, "image"))
    captions = []
    for ex in data.heldout[:n]:
        ids, pixels = prompt_and_pixels(ex)
        out = autoregressive_generate(model, ids, max_new_tokens=32, eos_token_id=[tok.eos_token_id],
                                      pixel_values=pixels)
        captions.append((tok.decode(out.tokens, skip_special_tokens=True).strip(), ex.meta["caption"]))
    return {"n": len(captions), "exact": sum(a == b for a, b in captions), "distinct": len({a for a, _ in captions})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--from-results", action="store_true", help="re-decide from bench/results/repro_specvlm.json")
    args = parser.parse_args()
    if args.from_results:
        stored = json.loads((RESULTS / "repro_specvlm.json").read_text())
        result = summarize(stored["per_seed"])
        result["seconds"] = stored.get("seconds")
        print(save_result("specvlm", {k: v for k, v in result.items() if k != "method"}))
        return
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        per_seed = {str(s): seed_rows(s, work) for s in args.seeds}
        per_seed[str(args.seeds[0])]["target"] = target_captions(work)
    result = summarize(per_seed)
    result["seconds"] = round(time.time() - t0, 1)
    print(result["table_md"], "\n", result["analysis"], sep="")
    print(save_result("specvlm", {k: v for k, v in result.items() if k != "method"}))


if __name__ == "__main__":
    main()
