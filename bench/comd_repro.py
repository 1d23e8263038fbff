"""CoMD's CPU experiment (spec 14.2): 4 rounds of failure-driven augmentation vs one-shot distillation at an
equal number of teacher answers, on the text scene questions.

Data and teacher (built once into ``--work`` and reused): ``stillroom vqa-data``'s text questions (3,000 training
scenes x 5 questions, families cycled, levels 1-3 drawn, up to 4 objects) and a 2-layer Llama (d 128, the scene-QA
BPE tokenizer of ``stillroom vqa-lm``) trained on them with cross-entropy (recipe comd_teacher.yaml's settings).
Per seed, two ``stillroom run``s of ``method: comd`` with the same student initialisation (d 48, 2 layers), the
same steps and the same forward-KL loss on the teacher's answers:

* **rounds**: 4 rounds; pool 32 per family at first; before rounds 2-4 the student answers 24 probes per family,
  the exact-match judge (against the teacher's answer) marks failures, and 96 one-level-harder instructions of
  the failed probes' families are answered by the teacher and join the pool (448 teacher answers in all);
* **one_shot**: one round on 448 teacher answers drawn at step 0 uniformly over the families and levels.

Metric: exact match against the ground truth on 300 held-out questions (20 per family and level, the same set
for every run), above all on the hard (level 3) ones; also the student's agreement with the teacher. Claim (spec):
round-based targeting improves accuracy on hard families faster, i.e. rounds - one_shot > 0 on level-3 exact match
beyond the seed spread.

    .venv/bin/python bench/comd_repro.py                 # 3 seeds -> bench/results/repro_comd.json
    .venv/bin/python bench/comd_repro.py --from-results  # re-decide the verdict from the stored numbers
    .venv/bin/python bench/comd_repro.py --vlm           # the same on the small VLM, questions with images
                                                         # (recipe comd_vlm) -> bench/results/repro_comd_vlm.json

With ``--vlm`` the arms are the shipped ``comd_vlm`` recipe (its LLaVA-style teacher trained here and cached, a
1-layer student of its class, every instruction a new scene rendered to a PNG and asked with its image) and the
same with ``comd.one_shot: true``; only the seed, the name and the output folder change.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.repro.common import RESULTS, fmt, markdown_table, mean_std, run_stillroom  # noqa: E402
from bench.repro.verdict import beyond_spread, paired, verdict_fields  # noqa: E402

CLAIM = ("CoMD (Li et al. 2023, spec 14.2): rounds of distillation in which the student's failures on probe "
         "instructions (judged against the teacher) decide which harder instructions the teacher answers next "
         "reach a higher accuracy on the hard families than one-shot distillation on the same number of teacher "
         "answers")
SCENES = {"max_objects": 4}
COMD = {"rounds": 4, "initial_per_family": 32, "augment_per_round": 96, "probe_per_family": 24,
        "eval_per_level": 20, "scenes": SCENES}
STUDENT = {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2}
TEACHER = {"scenes": 3000, "per_image": 5, "hidden": 128, "layers": 2, "steps": 2500, "lr": 1e-3, "batch": 64}


def build_teacher(work: Path) -> Path:
    """The data and the CE-trained teacher in ``work`` (reused when its student folder exists)."""
    from stillroom.config.scenes import ScenesConfig, VqaLmConfig
    from stillroom.domains.vl.vqa import write_text_qa
    from stillroom.domains.vl.vqa_lm import write_vqa_lm

    data, init, teacher = work / "train.jsonl", work / "qa_lm", work / "runs" / "teacher" / "student"
    if teacher.is_dir():
        return teacher
    if not data.is_file():
        write_text_qa(ScenesConfig(**SCENES), data, TEACHER["scenes"], "train", 0, TEACHER["per_image"])
    if not init.is_dir():
        write_vqa_lm(VqaLmConfig(out=str(init), hidden=TEACHER["hidden"], layers=TEACHER["layers"]))
    run_stillroom({
        "name": "teacher", "output_dir": str(work / "runs"), "method": "sft", "seed": 0,
        "teacher": {"model": {"path": str(init)}, "dtype": "float32"}, "student": {"model": {"path": str(init)}},
        "data": {"sources": [{"path": str(data), "format": "prompt_completion"}], "seq_len": 128,
                 "heldout_fraction": 0.02, "heldout_max": 64},
        "train": {"steps": TEACHER["steps"], "micro_batch_size": TEACHER["batch"], "lr": TEACHER["lr"],
                  "warmup_steps": 100, "precision": "fp32", "threads": 1, "keep_checkpoints": 1, "log_every": 100},
        "eval": {"before": False, "heldout_sequences": 32, "generations": 0},
    }, quiet=False)
    return teacher


def arm_config(arm: str, seed: int, work: Path, teacher: Path, steps: int) -> dict:
    return {
        "name": f"{arm}_s{seed}", "output_dir": str(work / "runs"), "seed": seed, "method": "comd",
        "teacher": {"model": {"path": str(teacher)}, "dtype": "float32"}, "student": {"from_config": STUDENT},
        "data": {"sources": [{"path": str(work / "train.jsonl"), "format": "prompt_completion", "limit": 300}],
                 "seq_len": 128, "heldout_fraction": 0.1, "heldout_max": 32},
        "comd": {**COMD, "one_shot": arm == "one_shot"},
        "loss": {"terms": [{"name": "forward_kl"}]},
        "train": {"steps": steps, "micro_batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "precision": "fp32",
                  "threads": 1, "keep_checkpoints": 1, "log_every": 50},
        "eval": {"before": False, "heldout_sequences": 32, "generations": 0},
    }


def vlm_arm_config(arm: str, seed: int, work: Path) -> dict:
    """The shipped ``comd_vlm`` recipe as one arm (``one_shot``: ``comd.one_shot: true``)."""
    import yaml

    from stillroom.cli.recipe_commands import recipe_path

    cfg = yaml.safe_load(Path(recipe_path("comd_vlm")).read_text())
    cfg.update(name=f"vlm_{arm}_s{seed}", output_dir=str(work / "runs"), seed=seed)
    cfg["comd"] = {**cfg["comd"], "one_shot": arm == "one_shot"}
    cfg["train"] = {**cfg["train"], "threads": 1}
    return cfg


def seed_rows(seed: int, work: Path, teacher: Path | None, steps: int) -> dict:
    rows = {}
    for arm in ("rounds", "one_shot"):
        config = vlm_arm_config(arm, seed, work) if teacher is None else arm_config(arm, seed, work, teacher, steps)
        result = json.loads((run_stillroom(config) / "comd.json").read_text())
        held = result["heldout"]
        rows[arm] = {"hard": held["student"]["hard"], "overall": held["student"]["overall"],
                     "by_level": held["student"]["by_level"], "families": held["student"]["families"],
                     "agree_hard": held["agreement"]["hard"], "agree": held["agreement"]["overall"],
                     "teacher_hard": held["teacher"]["hard"], "teacher": held["teacher"]["overall"],
                     "teacher_answers": result["teacher_answers"], "judge_answers": result["judge_answers"],
                     "pool_by_family": result["pool_by_family"],
                     "failure_rate": [r["failure_rate"] for r in result["rounds"]]}
    return rows


def summarize(per_seed: dict, steps: int, vlm: bool = False) -> dict:
    seeds = sorted(per_seed, key=int)

    def col(arm: str, key: str) -> list[float]:
        return [per_seed[s][arm][key] for s in seeds]

    table = markdown_table(
        ["arm", "hard (level 3) exact match", "all levels", "agreement with teacher, hard", "teacher answers"],
        [["teacher", fmt(col("rounds", "teacher_hard")), fmt(col("rounds", "teacher")), "-", "-"]]
        + [[arm, fmt(col(arm, "hard")), fmt(col(arm, "overall")), fmt(col(arm, "agree_hard")),
            f"{per_seed[seeds[0]][arm]['teacher_answers']}"] for arm in ("rounds", "one_shot")])
    parts = [beyond_spread("rounds - one_shot, hard exact match", paired(col("rounds", "hard"), col("one_shot", "hard"))),
             beyond_spread("rounds - one_shot, all levels", paired(col("rounds", "overall"), col("one_shot", "overall"))),
             beyond_spread("rounds - one_shot, hard agreement with the teacher",
                           paired(col("rounds", "agree_hard"), col("one_shot", "agree_hard")))]
    fields = verdict_fields(parts, required=[parts[0].name])
    return {"method": "comd_vlm" if vlm else "comd", "claim": CLAIM + (" (on a small VLM, questions with images)"
                                                                       if vlm else ""),
            "seeds": [int(s) for s in seeds], "per_seed": per_seed, "setting": vlm_setting() if vlm else setting(steps),
            "table_md": table, "analysis": analysis(per_seed, seeds, parts, vlm), **fields}


def vlm_setting() -> str:
    cfg = vlm_arm_config("rounds", 0, Path("."))
    c, t = cfg["comd"], cfg["vlm"]["teacher"]
    budget = c["initial_per_family"] * 5 + (c["rounds"] - 1) * c["augment_per_round"]
    warm = t.get("vision_warmup")
    warm_text = (f"{warm['steps']} vision warm-up steps on {'+'.join(warm.get('families', ['colour_of']))} "
                 f"questions alone, then " if warm else "")
    return (f"the shipped comd_vlm recipe: scene questions with {c['scenes']['image_size']} px images (5 families x 3 "
            f"levels, up to {c['scenes']['max_objects']} objects); teacher: the LLaVA-style VLM trained here "
            f"({warm_text}{t['steps']} steps on the mix at lr {t['lr']}, cached); student: the teacher's class with a 1-layer decoder, "
            f"{cfg['train']['steps']} steps of {cfg['train']['micro_batch_size']}, forward KL on the teacher's "
            f"answers; rounds: {c['rounds']} x {cfg['train']['steps'] // c['rounds']} steps, pool "
            f"{c['initial_per_family']} per family then +{c['augment_per_round']} per round from failed probes "
            f"({c['probe_per_family']} per family, exact-match judge vs the teacher), one level harder; one_shot: "
            f"{budget} uniform teacher answers at step 0; held-out {c.get('eval_per_level', 20)} questions per family "
            "and level with images, exact match vs the ground truth; 3 seeds (pool, probes, student init)")


def setting(steps: int) -> str:
    return (f"text scene questions (5 families x 3 levels, up to 4 objects); teacher: 2-layer Llama d {TEACHER['hidden']} "
            f"trained with CE for {TEACHER['steps']} steps on {TEACHER['scenes']} x {TEACHER['per_image']} questions; "
            f"student: 2-layer Llama d 48 from scratch, {steps} steps of 32 pool sequences, forward KL on the "
            "teacher's greedy answers, AdamW 3e-3; rounds: 4 x "
            f"{steps // 4} steps, pool 160 then +96 per round from failed probes (24 per family, exact-match judge "
            "vs the teacher), one level harder; one_shot: 448 uniform teacher answers at step 0; 300 held-out "
            "questions (20 per family and level), exact match vs the ground truth; 3 seeds (pool, probes, student "
            "init)")


def analysis(per_seed: dict, seeds: list, parts: list, vlm: bool = False) -> str:
    def mean(arm: str, key: str) -> float:
        return mean_std([per_seed[s][arm][key] for s in seeds])[0]

    hard, overall, agree = parts
    first = per_seed[seeds[0]]["rounds"]
    text = (f"Teacher: hard {mean('rounds', 'teacher_hard'):.3f}, all {mean('rounds', 'teacher'):.3f}. Student hard "
            f"exact match: rounds {mean('rounds', 'hard'):.3f}, one-shot {mean('one_shot', 'hard'):.3f} "
            f"(difference {hard.evidence()}); all levels {overall.evidence()}; hard agreement with the teacher "
            f"{agree.evidence()}. ")
    text += ("The rounds beat one-shot on the hard questions beyond the seed spread: the claim holds by the rule, "
             "though the effect is small (below). " if hard.held else "The rounds do not beat one-shot on the hard questions beyond the seed spread: the "
             "claim does not hold at this scale. ")
    text += (f"Seed {seeds[0]}'s pool after the rounds: {first['pool_by_family']} (one-shot: "
             f"{per_seed[seeds[0]]['one_shot']['pool_by_family']}); the judge's failure rate per family before "
             f"rounds 2-4: {_rates(first['failure_rate'][1:])}. ")
    fams = per_seed[seeds[0]]["rounds"]["families"]
    gaps = {f: mean_std([per_seed[s]["rounds"]["families"][f]["3"] - per_seed[s]["one_shot"]["families"][f]["3"]
                         for s in seeds])[0] for f in fams}
    n_hard = (vlm_arm_config("rounds", 0, Path("."))["comd"].get("eval_per_level", 20) if vlm
              else COMD["eval_per_level"]) * len(fams)
    text += ("Per family, level-3 difference (rounds - one-shot, mean over seeds): "
             + ", ".join(f"{f} {g:+.3f}" for f, g in gaps.items())
             + f"; the hard set has {n_hard} questions, so the mean difference is "
             f"{hard.mean * n_hard:+.1f} questions. ")
    students = (mean("rounds", "hard"), mean("one_shot", "hard"))
    teacher_hard = mean("rounds", "teacher_hard")
    if max(students) < teacher_hard - 0.05:
        text += (f"Both students stay far below the teacher on the hard questions ({students[0]:.3f} and "
                 f"{students[1]:.3f} vs {teacher_hard:.3f})"
                 + ("." if vlm else ": at this budget neither learns to look objects up in the caption (colour_of "
                    "and shape_at stay near their answer priors), so the comparison is between students that learnt "
                    "the answer types and the counting and yes/no questions to different degrees.") + " ")
    else:
        text += (f"On the hard questions both students reach the teacher ({students[0]:.3f} and {students[1]:.3f} vs "
                 f"{teacher_hard:.3f}): the teacher's answers, not the student's capacity, bound this comparison. ")
    if mean("rounds", "teacher_hard") < 0.8:
        text += ("The teacher itself is weak on the hard questions: the judge compares with the teacher, so it cannot "
                 "see the questions the teacher gets wrong, and more hard answers also teach more of its errors. ")
    return text


def _rates(rounds: list[dict]) -> str:
    """``colour_of 0.38/0.25/0.00, ...``: each family's failure rate at each assessment."""
    return ", ".join(f"{f} " + "/".join(f"{r[f]:.2f}" for r in rounds) for f in rounds[0]) if rounds else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=240, help="student steps per run (both arms)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/stillroom_bench_comd"),
                    help="where the data, the teacher (reused) and the runs go")
    ap.add_argument("--from-results", action="store_true", help="only re-decide the verdict from the stored numbers")
    ap.add_argument("--vlm", action="store_true", help="the arms of the comd_vlm recipe (questions with images)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    path, t0 = RESULTS / ("repro_comd_vlm.json" if a.vlm else "repro_comd.json"), time.time()
    stored = json.loads(path.read_text()) if path.is_file() else {}
    per_seed, steps = stored.get("per_seed", {}), stored.get("steps", a.steps)
    seconds = stored.get("seconds", 0.0)
    if not a.from_results:
        steps, per_seed = a.steps, {}
        teacher = None if a.vlm else build_teacher(a.work)  # the VLM arms train (or reuse) their cached teacher
        t_teacher = time.time() - t0
        for seed in a.seeds:
            per_seed[str(seed)] = seed_rows(seed, a.work, teacher, steps)
            print(seed, json.dumps({k: {m: v[m] for m in ("hard", "overall", "agree_hard")}
                                    for k, v in per_seed[str(seed)].items()}), flush=True)
        seconds = round(time.time() - t0 - t_teacher, 1)
        print(f"teacher {t_teacher:.0f} s (once, reused), arms {seconds} s")
    result = {**summarize(per_seed, steps, a.vlm), "steps": steps, "seconds": seconds,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2))
    tmp_path.replace(path)
    print(result["table_md"], "\n", result["verdict_text"], "\n", result["analysis"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
