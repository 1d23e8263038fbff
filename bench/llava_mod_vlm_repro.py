"""LLaVA-MoD (spec 14.1) on images: ``python bench/llava_mod_vlm_repro.py [--seeds 0 1 2] [--quick]``.

The text reproduction (``bench/llava_mod_repro.py``) on the small LLaVA-style VLM, every arm a run of the shipped
recipes ``llava_mod_vlm`` (stage 1) and ``llava_mod_vlm_dpo`` (stage 2) through ``stillroom.run``. Per seed (data,
teacher and students all depend on the seed):

1. Scene questions with 32 px images (``vqa.write_vqa_folder``): a training folder and a held-out folder of
   *other* images (the held-out split's scene stream), ``SCENES`` simplified as the text reproduction did.
   Families: colour_of, shape_at, count, exists, unanswerable (a question about an object the image lacks,
   answer "unknown"; which object is absent is visible only in the image, so a student must look to abstain).
2. Teacher: the LLaVA of ``vlm.teacher`` (scratch vision tower, 3-layer Llama decoder) trained with CE and cached
   by the first run (``TEACHER``: settings found by the sweep in docs/methods/llava_mod.md).
3. Stage 1 (``method: llava_mod``, ``stage: mimic``: forward KL + CE on the answer tokens, + 0.01 x router term),
   students with a 1-layer decoder, the teacher's widths otherwise, started as the recipe's ``vlm.student`` says
   (the teacher's tower and projector, frozen, then a CE warm-up on colour_of alone; the MoE arm continues the
   warmed-up dense pre-stage, so it is not warmed up again):
   * ``dense_pre``: a dense student with MLP width ``W`` (``pre_steps``): the dense small VLM of the paper;
   * ``moe``: ``dense_pre`` upcycled into 4 experts of width ``W``, top-2 (every expert a copy of its MLP), then
     ``moe_steps`` more mimic steps: active MLP width 2W;
   * ``dense``: a dense student with MLP width 2W (equal active parameters), ``pre_steps + moe_steps`` steps, so
     both arms get the same number of mimic steps in all (the MoE's first ``pre_steps`` at half the width).
4. Stage 2 from the MoE mimic student (``llava_mod_vlm_dpo``: pairs made on the way, chosen = the record's answer,
   rejected = the student's own sampled wrong answer with the image): DPO (sigmoid, beta 0.1) with reference =
   the teacher vs reference = the student as it starts stage 2.
Metrics on the held-out images (greedy): exact match overall and per family; hallucination rate = share of
unanswerable questions answered with anything but "unknown"; abstention = share of answerable questions answered
"unknown". Writes ``bench/results/repro_llava_mod_vlm.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.repro.common import RESULTS, fmt, markdown_table, run_stillroom  # noqa: E402
from bench.llava_mod_repro import verdict_parts  # noqa: E402
from bench.repro.verdict import verdict_fields  # noqa: E402

CLAIM = ("LLaVA-MoD on a small VLM: an MoE student (upcycled from a trained dense student, top-2 of 4 experts) "
         "beats a dense student of equal active parameters under mimic distillation; preference distillation "
         "(DPO) with the teacher as reference lowers hallucination and is at least as good as the "
         "student-as-reference ablation")
SCENES = dict(image_size=32, shapes=3, colours=3, max_objects=2)
TEACHER = dict(steps=1000, batch_size=16, lr=1e-3, warmup_steps=20, vision="scratch", arch={"patch_size": 16},
               vision_warmup={"steps": 1500, "families": ["colour_of"], "lr": 1e-3})
# patch 16 on 32 px: 4 image tokens, one per cell of the scene grid (16 px patches run about twice as fast as 8 px
# ones). Without the vision warm-up (colour_of questions alone first) no setting tried left the text prior; with it
# and the mixed stage at lr 1e-3 the teacher reads colours (docs/methods/llava_mod.md, the warm-up sweep).
FULL = dict(train_images=2000, heldout_images=200, per_image=3, pre_steps=200, moe_steps=300, dpo_steps=60,
            eval_batch=32)
QUICK = dict(train_images=40, heldout_images=10, per_image=3, pre_steps=3, moe_steps=3, dpo_steps=2, eval_batch=8,
             teacher_steps=6, teacher_warmup_steps=3, student_warmup_steps=3)
WIDTH = 96  # expert width = the dense pre-stage's MLP width; the dense arm has 2 x WIDTH
THREADS = 2
ARMS = ["teacher", "dense_pre", "dense", "moe", "dpo_teacher", "dpo_student"]


def recipe(name: str) -> dict:
    from stillroom.cli.recipe_commands import recipe_path

    return yaml.safe_load(Path(recipe_path(name)).read_text())


def make_data(seed: int, work: Path, size: dict) -> tuple[Path, Path]:
    """``(train records.jsonl, held-out records.jsonl)``: scenes of the train and the held-out stream."""
    from stillroom.config.scenes import ScenesConfig
    from stillroom.domains.vl.vqa import write_vqa_folder

    scenes = ScenesConfig(seed=seed, **SCENES)
    train = write_vqa_folder(scenes, work / "train", size["train_images"], "train", seed, size["per_image"])
    held = write_vqa_folder(scenes, work / "heldout", size["heldout_images"], "heldout", seed, size["per_image"])
    return train / "records.jsonl", held / "records.jsonl"


def teacher_section(size: dict, path: Path | None) -> dict:
    if path is not None:
        return {"path": str(path)}
    warmup = {**TEACHER["vision_warmup"], "steps": size.get("teacher_warmup_steps", TEACHER["vision_warmup"]["steps"])}
    return {**TEACHER, "steps": size.get("teacher_steps", TEACHER["steps"]), "vision_warmup": warmup}


def arm_config(name: str, stage: str, seed: int, work: Path, train: Path, teacher: Path | None, size: dict) -> dict:
    """One run of the shipped recipe of ``stage`` (mimic: llava_mod_vlm, preference: llava_mod_vlm_dpo) on the
    seed's records, its own teacher (trained by the first run, then by path), no CE baseline, a short eval."""
    cfg = recipe("llava_mod_vlm" if stage == "mimic" else "llava_mod_vlm_dpo")
    cfg.update(name=name, output_dir=str(work / "runs"), cache_dir=str(work / "cache"), seed=seed, baseline=False)
    cfg["vlm"] = {**cfg["vlm"], "data": None, "report_images": 0, "teacher": teacher_section(size, teacher),
                  "student": {**cfg["vlm"].get("student", {})}}
    warm = cfg["vlm"]["student"].get("vision_warmup")
    if warm and "student_warmup_steps" in size:
        cfg["vlm"]["student"]["vision_warmup"] = {**warm, "steps": size["student_warmup_steps"]}
    cfg["data"] = {**cfg["data"], "sources": [{"path": str(train), "format": "prompt_completion"}],
                   "heldout_fraction": 0.02, "heldout_max": 16}
    cfg["train"] = {**cfg["train"], "threads": THREADS}
    cfg["eval"] = {**cfg["eval"], "before": False, "heldout_sequences": 16, "speed_tokens": 16}
    return cfg


def mimic(name: str, seed: int, work: Path, train: Path, teacher: Path | None, size: dict, steps: int,
          student: dict, upcycle: bool) -> Path:
    cfg = arm_config(name, "mimic", seed, work, train, teacher, size)
    cfg["student"] = student
    if "model" in student:  # a loaded student keeps its own tower (frozen as the recipe says); the MoE arm
        warm = None if upcycle else cfg["vlm"]["student"].get("vision_warmup")  # continues a warmed-up student
        cfg["vlm"]["student"] = {**cfg["vlm"]["student"], "vision_from_teacher": False, "vision_warmup": warm}
    cfg["llava_mod"] = {**cfg["llava_mod"], "moe": {**cfg["llava_mod"]["moe"], "upcycle": upcycle}}
    cfg["train"]["steps"] = steps
    return run_stillroom(cfg) / "student"


def dpo(reference: str, seed: int, work: Path, train: Path, teacher: Path, size: dict, moe_dir: Path) -> Path:
    cfg = arm_config(f"dpo_{reference}", "preference", seed, work, train, teacher, size)
    cfg["student"] = {"model": {"path": str(moe_dir)}}
    cfg["llava_mod"] = {**cfg["llava_mod"], "reference": reference}
    cfg["train"]["steps"] = size["dpo_steps"]
    return run_stillroom(cfg) / "student"


def score(model_dir: Path, teacher_dir: Path, held: Path, seed: int, batch: int) -> dict:
    """Greedy answers to every held-out question with its image: exact match (overall, per family),
    hallucination (unanswerable not answered "unknown") and abstention (answerable answered "unknown")."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from stillroom.config.core import DataConfig, DataSource
    from stillroom.data import build_splits
    from stillroom.domains.vl.vlm_eval import greedy_answers, is_correct
    from stillroom.domains.vl.vlm_teacher import vlm_encoder
    from stillroom.domains.vl.vqa import normalise

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    data_cfg = DataConfig(sources=[DataSource(path=str(held), format="prompt_completion")], seq_len=64,
                          heldout_fraction=0.0)
    examples = build_splits(data_cfg, tok, seed, vlm_encoder(model, teacher_dir, "image")).train
    with torch.no_grad():
        answers = greedy_answers(model, tok, examples, max_new_tokens=6, batch_size=batch)
    fam = [str(ex.meta["family"]) for ex in examples]
    right = [is_correct(ex, a) for ex, a in zip(examples, answers)]
    unknown = [normalise(a) == "unknown" for a in answers]
    by_family = {f: sum(r for r, g in zip(right, fam) if g == f) / fam.count(f) for f in sorted(set(fam))}
    unans = [u for u, g in zip(unknown, fam) if g == "unanswerable"]
    answerable = [u for u, g in zip(unknown, fam) if g != "unanswerable"]
    return {"accuracy": sum(right) / len(right), "hallucination": 1 - sum(unans) / len(unans),
            "abstention": sum(answerable) / len(answerable), "by_family": by_family, "n": len(right)}


def train_teacher(seed: int, work: Path, train: Path, size: dict) -> Path:
    """The seed's teacher, trained (and cached under ``work/cache``) as the first mimic run would train it."""
    from stillroom.config.schema import RunConfig
    from stillroom.domains.vl.vlm_teacher import load_vlm_teacher, vlm_data_config
    from stillroom.train.distributed import Topology

    cfg = RunConfig.model_validate(arm_config("teacher", "mimic", seed, work, train, None, size))
    return load_vlm_teacher(cfg, vlm_data_config(cfg), Topology(), torch.device("cpu"), lambda _m: None)[1]


def student_init(teacher_dir: Path, out: Path, width: int, seed: int) -> Path:
    """A 1-layer student of MLP ``width`` whose vision tower and projector are copies of the teacher's (LLaVA-MoD's
    students share the teacher's vision encoder; the decoder is new, seeded), saved as a LLaVA folder."""
    import shutil

    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig.from_pretrained(teacher_dir)
    cfg.text_config.num_hidden_layers, cfg.text_config.intermediate_size = 1, width
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    teacher = LlavaForConditionalGeneration.from_pretrained(teacher_dir, dtype=torch.float32)
    for part in ("vision_tower", "multi_modal_projector"):
        getattr(model.model, part).load_state_dict(getattr(teacher.model, part).state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    shutil.copy(teacher_dir / "preprocessor_config.json", out / "preprocessor_config.json")
    return out


def seed_rows(seed: int, work: Path, size: dict, shared_tower: bool = False) -> dict:
    train, held = make_data(seed, work, size)
    text = lambda width: {"text_config": {"num_hidden_layers": 1, "intermediate_size": width}}  # noqa: E731
    times, t0, teacher_dir = {}, time.time(), None
    student = lambda width: {"from_config": text(width)}  # noqa: E731
    if shared_tower:  # the teacher first, then students starting from its tower and projector
        teacher_dir = train_teacher(seed, work, train, size)
        student = lambda width: {"model": {"path": str(  # noqa: E731
            student_init(teacher_dir, work / f"init_{width}", width, seed))}}
    pre_dir = mimic("dense_pre", seed, work, train, teacher_dir, size, size["pre_steps"], student(WIDTH),
                    False)  # without shared_tower its run trains (and caches) the seed's teacher first
    times["teacher_and_dense_pre"] = round(time.time() - t0)
    teacher_dir = next((work / "cache" / "vlms").glob("*/teacher.json")).parent
    teacher_record = json.loads((teacher_dir / "teacher.json").read_text())
    t0 = time.time()
    moe_dir = mimic("moe", seed, work, train, teacher_dir, size, size["moe_steps"], {"model": {"path": str(pre_dir)}},
                    True)
    times["moe"], t0 = round(time.time() - t0), time.time()
    dense_dir = mimic("dense", seed, work, train, teacher_dir, size, size["pre_steps"] + size["moe_steps"],
                      student(2 * WIDTH), False)
    times["dense"], t0 = round(time.time() - t0), time.time()
    dirs = {"teacher": teacher_dir, "dense_pre": pre_dir, "dense": dense_dir, "moe": moe_dir}
    for reference in ("teacher", "student"):
        dirs[f"dpo_{reference}"] = dpo(reference, seed, work, train, teacher_dir, size, moe_dir)
    times["dpo"], t0 = round(time.time() - t0), time.time()
    out = {arm: score(dirs[arm], teacher_dir, held, seed, size["eval_batch"]) for arm in ARMS}
    times["eval"] = round(time.time() - t0)
    out["teacher_train"] = {"seconds": teacher_record["train_seconds"], "steps": teacher_record["settings"]["steps"],
                            "train_sequences": teacher_record["train_sequences"], "stages": teacher_record.get("stages")}
    out["params"] = {arm: params(dirs[arm]) for arm in ("dense_pre", "dense", "moe")}
    out["seconds"] = times
    return out


def params(folder: Path) -> dict:
    """Total parameters and the decoder MLP's active width of a saved student (from its config)."""
    cfg = json.loads((folder / "config.json").read_text())["text_config"]
    total = sum(t.numel() for t in _tensors(folder).values())
    experts, top_k = cfg.get("num_local_experts", 1), cfg.get("num_experts_per_tok", 1)
    return {"total": total, "mlp_width": cfg["intermediate_size"], "experts": experts, "top_k": top_k,
            "active_mlp_width": cfg["intermediate_size"] * min(top_k, experts)}


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def summarize(per_seed: dict, size: dict, quick: bool) -> dict:
    seeds = sorted(per_seed)

    def col(arm: str, key: str) -> list[float]:
        return [per_seed[s][arm][key] for s in seeds]

    families = sorted(per_seed[seeds[0]]["teacher"]["by_family"])
    fam = {a: {f: sum(per_seed[s][a]["by_family"][f] for s in seeds) / len(seeds) for f in families} for a in ARMS}
    table = markdown_table(
        ["arm", "exact match", "hallucination (unanswerable)", "abstention (answerable)", *families],
        [[a, fmt(col(a, "accuracy")), fmt(col(a, "hallucination")), fmt(col(a, "abstention")),
          *[f"{fam[a][f]:.3f}" for f in families]] for a in ARMS])
    parts = verdict_parts(col)
    moe, dpo, ref, acc = parts
    fields = verdict_fields(parts, required=[moe.name, dpo.name, ref.name])
    mean = {a: {k: sum(col(a, k)) / len(seeds) for k in ("accuracy", "hallucination", "abstention")} for a in ARMS}
    return {"method": "llava_mod_vlm", "claim": CLAIM, "seeds": seeds, "per_seed": per_seed, "quick": quick,
            "setting": setting(size), "table_md": table, "analysis": analysis(parts, mean, fam, per_seed, seeds),
            "finished": time.strftime("%Y-%m-%d %H:%M"), **fields}


def setting(size: dict) -> str:
    dpo = recipe("llava_mod_vlm_dpo")
    return (f"scene questions with images (vqa.write_vqa_folder, scenes {SCENES}, {size['train_images']} training "
            f"images x {size['per_image']} questions, {size['heldout_images']} held-out images of the held-out "
            f"stream); teacher: LLaVA trained here {TEACHER}; students: the teacher's class with a 1-layer decoder "
            f"(vlm.student {recipe('llava_mod_vlm')['vlm'].get('student')}, train lr "
            f"{recipe('llava_mod_vlm')['train']['lr']}), recipe llava_mod_vlm (forward_kl + ce, aux 0.01, capacity 1.5): dense "
            f"pre-stage MLP {WIDTH} for {size['pre_steps']} steps -> upcycled MoE 4 x {WIDTH} top-2 for "
            f"{size['moe_steps']} steps, vs dense MLP {2 * WIDTH} for {size['pre_steps'] + size['moe_steps']} "
            f"steps (equal active MLP width, equal mimic steps in all); stage 2 recipe llava_mod_vlm_dpo (pairs "
            f"sampled on the way: chosen = record, rejected = the student's wrong sample with the image, "
            f"{dpo['llava_mod']['loss_type']} beta {dpo['llava_mod']['beta']}, lr {dpo['train']['lr']}, "
            f"{size['dpo_steps']} steps x {dpo['train']['micro_batch_size']} prompts)")


def analysis(parts: list, mean: dict, fam: dict, per_seed: dict, seeds: list) -> str:
    moe, dpo, ref, acc = parts
    t = [per_seed[s]["teacher_train"] for s in seeds]
    r2 = lambda d: {k: round(v, 2) for k, v in d.items()}  # noqa: E731
    return " ".join([
        f"Held parts: {[p.name for p in parts if p.held] or 'none'}; not held: "
        f"{[p.name for p in parts if not p.held] or 'none'}.",
        f"Teacher: {mean['teacher']['accuracy']:.1%} held-out exact match (per family {r2(fam['teacher'])}), "
        f"trained in {[x['seconds'] for x in t]} s ({t[0]['steps']} mixed steps"
        + (f" after {t[0]['stages']['vision_warmup']['steps']} warm-up steps on colour_of" if (t[0].get("stages") or {})
           .get("vision_warmup") else "") + ").",
        f"(1) MoE vs dense at equal active parameters: {mean['moe']['accuracy']:.3f} vs {mean['dense']['accuracy']:.3f}"
        f" (the dense pre-stage the MoE was upcycled from: {mean['dense_pre']['accuracy']:.3f}), paired "
        f"{moe.evidence()}: " + ("held." if moe.held else "not beyond the seed spread."),
        f"(2) Hallucination on unanswerable questions (objects the image lacks): MoE mimic "
        f"{mean['moe']['hallucination']:.1%}, dense mimic {mean['dense']['hallucination']:.1%}, teacher "
        f"{mean['teacher']['hallucination']:.1%}; after DPO with the teacher reference "
        f"{mean['dpo_teacher']['hallucination']:.1%} (student reference {mean['dpo_student']['hallucination']:.1%}), "
        f"paired {dpo.evidence()}: " + ("held." if dpo.held else "not beyond the seed spread.")
        + f" Abstention on answerable questions (answered 'unknown'): MoE mimic {mean['moe']['abstention']:.1%}, "
        f"DPO teacher-ref {mean['dpo_teacher']['abstention']:.1%}.",
        f"(3) Accuracy after DPO: {mean['moe']['accuracy']:.3f} -> {mean['dpo_teacher']['accuracy']:.3f} (teacher "
        f"reference), {mean['dpo_student']['accuracy']:.3f} (student reference); teacher-ref vs student-ref paired "
        f"{ref.evidence()} (1 pt tolerance): " + ("held." if ref.held else "not held."),
        f"Diagnosis: with {SCENES['colours']} colours, chance on colour_of is {1 / SCENES['colours']:.0%}; the teacher "
        f"reaches {fam['teacher']['colour_of']:.0%} there, " + (
            "so it does not read the image: it answers from the question's wording (the text prior), and so do "
            "the students distilled from it. Hallucination is then decided by wording too: a teacher that answers "
            "'unknown' to every 'what colour is the <shape>?' scores 0 hallucination and pays with abstention on "
            "answerable questions of that form (docs/methods/llava_mod.md: the teacher sweep and this check)."
            if fam["teacher"]["colour_of"] < 1 / SCENES["colours"] + 0.1 else
            "well above chance, so it reads the image's colours (the vision warm-up on colour_of questions before "
            f"the mix); shape_at stays at {fam['teacher']['shape_at']:.0%}, near its prior answer, so questions that "
            "need the shape (colour_of 'what colour is the <shape>?', unanswerable) are still answered by wording."),
        f"Seeds {len(seeds)}: " + ("with fewer than 2 seeds no part can hold (no spread to exceed). " if len(seeds) < 2
                                   else "") + "CPU scale (1-layer students, 32 px scenes, short runs); "
        f"{len(seeds)} seeds make the bar a paired t above {len(seeds) ** 0.5:.2f}, not significance.",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (numbers meaningless, nothing written)")
    ap.add_argument("--from-results", action="store_true", help="only re-decide the verdict from the stored numbers")
    ap.add_argument("--partial", type=Path, default=Path(tempfile.gettempdir(), "repro_llava_mod_vlm.partial.json"),
                    help="where each finished seed's numbers are kept (seeds can run as parallel processes)")
    ap.add_argument("--merge", type=Path, nargs="+", help="summarize the seeds of these --partial files, run nothing")
    ap.add_argument("--shared-tower", action="store_true",
                    help="students start from the teacher's vision tower and projector (LLaVA-MoD's shared vision "
                         "encoder) -> bench/results/repro_llava_mod_vlm_shared_tower.json")
    a = ap.parse_args(argv)
    size = QUICK if a.quick else FULL
    torch.set_num_threads(THREADS)
    t0, per_seed = time.time(), {}
    path = RESULTS / ("repro_llava_mod_vlm_shared_tower.json" if a.shared_tower else "repro_llava_mod_vlm.json")
    if a.from_results:
        stored = json.loads(path.read_text())
        per_seed, t0 = {int(k): v for k, v in stored["per_seed"].items()}, t0 - stored.get("seconds", 0)
    for part in a.merge or []:  # seeds run as separate processes: the wall time is the seeds' summed time
        per_seed.update({int(k): v for k, v in json.loads(part.read_text()).items()})
    if a.merge:
        t0 -= sum(sum(row["seconds"].values()) for row in per_seed.values())
    with tempfile.TemporaryDirectory() as tmp:
        for seed in ([] if a.from_results or a.merge else a.seeds):
            per_seed[seed] = seed_rows(seed, Path(tmp) / f"s{seed}", size, a.shared_tower)
            print(seed, json.dumps(per_seed[seed]), f"{time.time() - t0:.0f}s", flush=True)
            if not a.quick:  # partial results survive an interrupted run
                a.partial.write_text(json.dumps(per_seed))
    result = summarize(per_seed, size, a.quick)
    if a.shared_tower:
        result.update(method="llava_mod_vlm_shared_tower", setting=result["setting"] + "; students (dense_pre and "
                      "dense) start from the teacher's vision tower and projector, their decoder new")
    result["seconds"] = round(time.time() - t0)
    print(result["table_md"], "\n", result["verdict_text"], "\n", result["analysis"])
    if not a.quick:
        path.with_suffix(".json.tmp").write_text(json.dumps(result, indent=2))
        path.with_suffix(".json.tmp").replace(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
