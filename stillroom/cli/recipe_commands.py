"""The commands that read a recipe (YAML + ``key=value`` overrides into the typed config tree) and call
one function of :mod:`stillroom.run` or :mod:`stillroom.datagen`. Nothing else happens here."""

from __future__ import annotations

import argparse
import shlex
from importlib import resources
from pathlib import Path


def recipe_path(name: str) -> str:
    """A path as given, or the name of a recipe shipped with the package (``quickstart``)."""
    if Path(name).exists() or name.endswith((".yaml", ".yml")):
        return name
    shipped = resources.files("stillroom") / "recipes" / f"{name}.yaml"
    if shipped.is_file():
        return str(shipped)
    return name


def load(args: argparse.Namespace):
    from stillroom.config.load import load_config

    return load_config(recipe_path(args.recipe) if args.recipe else None, args.overrides)


def stages_plan(args: argparse.Namespace):
    """The multi-stage plan when the recipe has a top-level ``stages:`` list (docs/stages.md), else None."""
    from stillroom.config.stages import is_stages_recipe, load_stages

    path = recipe_path(args.recipe) if args.recipe else None
    return load_stages(path, args.overrides) if is_stages_recipe(path) else None


def cmd_validate(args) -> int:
    from stillroom.run import check_run

    plan = stages_plan(args)
    if plan is not None:
        from stillroom.run.stages import describe, precheck

        precheck(plan, print)
        print("\n".join([f"{args.recipe}: OK ({len(plan.stages)} stages, folder {plan.root})", *describe(plan)]))
        return 0
    cfg = load(args)
    cache = shlex.join(["stillroom", "cache-teacher", args.recipe, *args.overrides])
    check_run(cfg, log=print, all_commands=True, cache_command=cache)  # notes: e.g. where a store will be read
    source = f", teacher source {cfg.teacher.source}" if cfg.domain == "lm" else ""
    print(f"{args.recipe}: OK ({cfg.method}, domain {cfg.domain}{source}, {len(cfg.loss.terms)} loss term(s))")
    return 0


def cmd_run(args) -> int:
    from stillroom.run import run

    plan = stages_plan(args)
    if plan is not None:
        from stillroom.run.stages import run_stages

        root = run_stages(plan, resume=args.resume, overwrite=args.overwrite, log=lambda s: print(s, flush=True))
        print(f"stages folder: {root} (report {root / 'stages.md'})")
        return 0
    print(f"run folder: {run(load(args), resume=args.resume, overwrite=args.overwrite)}")
    return 0


def cmd_distill_data(args) -> int:
    from stillroom.domains.vision.ast.command import distill_data

    print(f"run folder: {distill_data(load(args), resume=args.resume, overwrite=args.overwrite)}")
    return 0


def cmd_codsa_data(args) -> int:
    from stillroom.datagen.codsa import codsa_data

    folder = codsa_data(load(args), log=lambda s: print(s, flush=True))
    words = ["stillroom", "run", args.recipe, *args.overrides, "codsa.add_to_training=true"]
    print(f"transfer set: {folder}\ntrain on it with: {shlex.join(words)}")
    return 0


def cmd_eval(args) -> int:
    from stillroom.run import evaluate_run

    evaluate_run(load(args), overrides=args.overrides, student_dir=args.student)
    return 0


def cmd_generate(args) -> int:
    from stillroom.datagen.generate import run_generate

    summary = run_generate(load(args), export_only=args.export_only)
    print(f"store: {summary['store']}")
    if summary["export"]:
        print(f"export: {summary['export']['path']} ({summary['export']['rows']} rows)")
    return 0


def cmd_select(args) -> int:
    from stillroom.datagen.miniplm import run_select

    result = run_select(load(args))
    print(f"selected: {result.selected}\nscores: {result.scores}\nsummary: {result.summary}")
    return 0


def cmd_prune(args) -> int:
    from stillroom.compress.prune import prune

    cfg = load(args)
    if args.overwrite:
        cfg.prune.overwrite = True
    result = prune(cfg, log=lambda s: print(s, flush=True))
    print(f"pruned model: {result.folder} (report {result.folder / 'prune_report.md'})")
    return 0


def cmd_cache_teacher(args) -> int:
    from stillroom.run import cache_teacher

    cfg = load(args)
    store_keys = STORE_KEYS[cfg.domain]
    if args.batch_size is not None:  # kept for old command lines; the setting is <store>.cache_batch_size
        args.overrides = [*args.overrides, f"{store_keys[0]}.cache_batch_size={args.batch_size}"]
        cfg = load(args)
    cache_teacher(cfg, overwrite=args.overwrite, log=lambda s: print(s, flush=True))
    words = ["stillroom", "run", args.recipe, *args.overrides, f"{store_keys[1]}=store"]
    print(f"train from it with: {shlex.join(words)}")  # quoted for the shell: the line works when pasted
    return 0


STORE_KEYS = {"lm": ("teacher.store", "teacher.source"), "classifier": ("classifier.store", "classifier.teacher_source")}
"""Per domain: the teacher store's config section and the key that makes a run read it."""


def cmd_verify_store(args) -> int:
    from stillroom.teachers.store_reader import StoreReader

    reader = StoreReader(Path(args.path))
    checked = reader.verify()
    print(reader.summary())
    print(f"OK: {len(reader.shards)} shard(s), {checked} bytes match their sha256")
    return 0


def _run_folder_flags(p: argparse.ArgumentParser) -> None:
    """What a run does with a run folder that already holds a run (default: refuse it, changing nothing)."""
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder from its last complete checkpoint (only train.steps, "
                   "eval.* and other safe settings may differ from its config.resolved.yaml)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in the run folder and start again (default: refuse)")


def register(sub) -> None:
    def recipe_command(name: str, func, help_: str, *, example: str = "train.steps=20", description: str | None = None):
        p = sub.add_parser(name, help=help_, description=description or help_)
        p.add_argument("recipe", help="recipe YAML file, or the name of a shipped recipe (e.g. quickstart)")
        p.add_argument("overrides", nargs="*", help=f"key.sub=value overrides, e.g. {example}")
        p.set_defaults(func=func)
        return p

    recipe_command("validate", cmd_validate, "check a recipe without running it")
    p = recipe_command("run", cmd_run, "train (and evaluate) as the recipe says")
    _run_folder_flags(p)
    p = recipe_command("distill-data", cmd_distill_data, "AST dataset distillation: learn a few synthetic images per "
                       "class by matching expert trajectories (ast.*, domain: classifier)", example="ast.ipc=5",
                       description="Train (or load cached) expert trajectories on classifier.dataset, learn ast.ipc "
                       "synthetic images per class by trajectory matching for train.steps outer iterations, then "
                       "train fresh networks on them and on a random real subset of the same size; report and image "
                       "grids in the run folder. See docs/methods/ast.md.")
    _run_folder_flags(p)
    recipe_command("codsa-data", cmd_codsa_data, "CoDSA: synthesise images per class where the data is thin (codsa.*, "
                   "domain: classifier), labelled by the teacher, as a transfer set", example="codsa.policy=uniform",
                   description="Fit a per-class generator (PCA + Gaussian mixture) on the recipe's real training "
                   "images, split codsa.volume synthetic images over the classes by codsa.policy, label them with "
                   "the teacher and write codsa.out (transfer_set.safetensors + manifest.json); `stillroom run` "
                   "with codsa.add_to_training=true trains on real + synthetic. See docs/methods/codsa.md.")
    p = recipe_command("eval", cmd_eval, "evaluate a finished run's students with its saved config.resolved.yaml "
                       "(plus the overrides given here) and rewrite its report", example="eval.heldout_sequences=8")
    p.add_argument("--student", help="student folder (default: <run folder>/student)")
    p = sub.add_parser("quickstart", help="distill SmolLM2-135M-Instruct into a 10-layer student, with a CE baseline")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    _run_folder_flags(p)
    p.set_defaults(func=cmd_run, recipe="quickstart")  # `run` with the shipped quickstart recipe
    p = recipe_command(
        "generate", cmd_generate, "ask a teacher for completions, rationales or rewrites of a data set (resumable "
        "store + export)", example="generate.n_samples=4",
        description="Generate with the recipe's teacher (teacher.source online or remote) as `generate` says; rerun "
        "the same command to resume. See docs/GENERATE.md.")
    p.add_argument("--export-only", action="store_true",
                   help="do not generate; summarise the existing store and write generate.export.path again")
    recipe_command(
        "select", cmd_select, "MiniPLM: keep the corpus instances the teacher predicts much better than a small "
        "reference", example="select.fraction=0.3",
        description="Score every instance of the recipe's data with score = NLL_ref - NLL_teacher (per-token means), "
        "keep the top select.fraction in corpus order and write them as text JSONL, plus a scores file and a summary.")
    p = recipe_command(
        "prune", cmd_prune, "prune a model (default: the recipe's teacher) by depth, width and/or sparsity into a "
        "smaller Hugging Face folder", example="prune.depth.num_layers=16",
        description="Load prune.model (or teacher.model), draw prune.calibration batches from the data, apply "
        "prune.depth, prune.width and prune.sparsity in that order and write prune.out (default "
        "<output_dir>/<name>/pruned) with prune_report.json/.md. See docs/methods/pruning.md.")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (prune.overwrite)")
    p = recipe_command("cache-teacher", cmd_cache_teacher, "run the teacher once over the recipe's training data "
                       "and write a top-k store (teacher.store.*)", example="teacher.store.k=32")
    p.add_argument("--batch-size", type=int, help="sequences per teacher forward: teacher.store.cache_batch_size=N")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing store written for another run (default: refuse)")
    v = sub.add_parser("verify-store", help="check every shard of a teacher store against its sha256")
    v.add_argument("path", help="store folder (the one holding manifest.json)")
    v.set_defaults(func=cmd_verify_store)
