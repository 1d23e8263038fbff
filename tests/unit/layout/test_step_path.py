"""A newcomer can follow one optimizer step through at most 8 files, in one direction.

One knowledge-distillation step of a one-process language-model run (online teacher, forward
KL, the fused path: the defaults; forward KL runs in its closed form, so the kernels of ``losses/terms.py``
are not called) is traced with ``sys.setprofile``: every stillroom file whose
code runs is recorded, in the order it first runs. There must be at most 8, and reading them
must go one way: the imports among them form no circle, so a reader starting at the loop only
ever goes down. (At run time the engine hands the term kernels a context whose shared
log-softmaxes they read, and autograd calls the engine's backward from the loop: callbacks
into code the reader has already read.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

PACKAGE = str(Path(__file__).resolve().parents[3] / "stillroom")


def _stillroom_file(frame) -> str | None:
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PACKAGE):
            return os.path.relpath(name, PACKAGE)
        frame = frame.f_back
    return None


def one_process_job(tmp_path: Path, teacher_dir: Path, **sections):
    """The training job of a one-process LM run of the tiny teacher (online, forward KL, fused: the defaults);
    ``sections`` update the recipe's top-level sections."""
    from stillroom.config.load import load_config
    from stillroom.run import prepare_run

    recipe = {
        "name": "trace", "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": {"path": str(teacher_dir)}, "dtype": "float32"},
        "student": {"from_teacher": {"strategy": "every_n", "every_n": 2}},
        "data": {"sources": [{"bundled": "pydoc", "limit": 40}], "seq_len": 32, "heldout_fraction": 0.2,
                 "heldout_max": 8},
        "loss": {"terms": [{"name": "forward_kl"}], "chunk_tokens": 64},
        "train": {"steps": 3, "micro_batch_size": 4, "precision": "fp32"},
    }
    recipe = {**recipe, **{k: {**recipe.get(k, {}), **v} for k, v in sections.items()}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml", [])
    prep, method = prepare_run(cfg, log=lambda _m: None)
    job, _ = prep.job(prep.student, method, baseline=False, run_dir=cfg.run_dir, resume=False, log=lambda _m: None)
    return job


def trace_one_step(tmp_path: Path, teacher_dir: Path) -> list[str]:
    from stillroom.train.loop import update
    from stillroom.train.session import Session

    job = one_process_job(tmp_path, teacher_dir)
    session = Session.start(job)
    update(job.players[0], session, 0)  # warm-up: lazy imports and caches are not the step

    files: list[str] = []

    def profile(frame, event, _arg):
        if event != "call":
            return
        if not frame.f_code.co_filename.startswith(PACKAGE):
            return
        here = _stillroom_file(frame)
        if here not in files:
            files.append(here)

    sys.setprofile(profile)
    try:
        update(job.players[0], session, 1)
    finally:
        sys.setprofile(None)
    return files


def _import_edges(files: list[str]) -> set[tuple[str, str]]:
    """``(a, b)`` when step file ``a`` imports a name that step file ``b`` defines (a name imported from a
    package is followed through the package's ``__init__`` to the module that defines it)."""
    import ast

    sys.path.insert(0, str(Path(__file__).parent))
    from test_layout import _modules, _type_only

    mods = _modules()

    def exported(package: str, name: str) -> str | None:
        init = ast.parse(mods[package].read_text())
        for node in init.body:
            if isinstance(node, ast.ImportFrom) and node.module and any(a.name == name for a in node.names):
                return node.module
        return None

    def targets(path: Path) -> set[str]:
        out, tree = set(), ast.parse(path.read_text())
        skip = _type_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
            elif node.module in mods:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in mods:
                        out.add(sub)
                    elif mods[node.module].name == "__init__.py":
                        out.add(exported(node.module, alias.name) or node.module)
                    else:
                        out.add(node.module)
        return out

    by_file = {os.path.relpath(str(p), PACKAGE): m for m, p in mods.items()}
    step = {by_file[f]: f for f in files}
    return {(f, step[t]) for m, f in step.items() for t in targets(mods[m]) if t in step and t != m}


def _has_circle(edges: set[tuple[str, str]]) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in list(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_one_step_reads_through_at_most_eight_files_in_one_direction(tmp_path, tiny_teacher_dir):
    files = trace_one_step(tmp_path, tiny_teacher_dir)
    assert files[0] == "train/loop.py"
    assert len(files) <= 8, files
    edges = _import_edges(files)
    assert _has_circle(edges) is None, (_has_circle(edges), sorted(edges))
    # the step's path in reading order, as docs/DESIGN.md draws it
    assert files == ["train/loop.py", "data/batch.py", "train/distributed.py", "teachers/signal.py",
                     "domains/lm/forward.py", "losses/mix.py", "losses/engine.py", "losses/closed_form.py"], files


def test_the_default_step_s_teacher_hands_over_its_hidden_state_and_head(tmp_path, tiny_teacher_dir):
    """The default run (online teacher, forward KL, fused) puts its teacher in head mode: the loss makes the
    teacher's logits a chunk at a time, so no ``[B, T, V]`` teacher logits exist (docs/BENCHMARKS.md)."""
    for sections, headed in (({}, True), ({"loss": {"fused": False}}, False), ({"teacher": {"memo": True}}, False)):
        job = one_process_job(tmp_path, tiny_teacher_dir, **sections)
        assert (getattr(job.players[0].objective.teacher, "head", None) is not None) == headed, sections
