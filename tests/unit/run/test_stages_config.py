"""Multi-stage recipes: loading (placeholders, defaults, overrides, errors before anything runs) and the runner's
record (skip, refuse, redo) with merge stages, which need no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stillroom.config.load import ConfigError
from stillroom.config.stages import is_stages_recipe, load_stages
from stillroom.run.stages import RECORD, REPORT_MD, run_stages


def write(tmp_path: Path, recipe: dict, name: str = "stages.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def three_stages(tmp_path: Path, teacher: str = "/models/teacher") -> dict:
    return {
        "name": "pipe", "output_dir": str(tmp_path / "runs"),
        "defaults": {"teacher": {"model": {"path": teacher}, "dtype": "float32"},
                     "data": {"sources": [{"bundled": "pydoc", "limit": 20}], "seq_len": 32},
                     "train": {"steps": 5, "lr": 1e-3}},
        "stages": [
            {"name": "first", "kind": "run", "recipe": {"method": "kd", "train": {"steps": 3}}},
            {"name": "second", "kind": "run", "recipe": {"method": "sft", "student": {"model": {"path": "{previous}"}}},
             "overrides": ["train.lr=0.01"]},
            {"name": "merged", "kind": "merge", "merge": {"a": "{stage:first}", "b": "{stage:second}", "t": 0.25}},
        ]}


def test_placeholders_defaults_and_outputs_resolve(tmp_path):
    plan = load_stages(write(tmp_path, three_stages(tmp_path)))
    first, second, merged = plan.stages
    root = tmp_path / "runs" / "pipe"
    assert plan.root == root
    assert first.config.run_dir == root / "first" and first.output == root / "first" / "student"
    assert first.config.train.steps == 3 and first.config.train.lr == 1e-3  # the stage wins, defaults fill in
    assert second.config.student.model.path == str(root / "first" / "student") and second.uses == ["first"]
    assert second.config.train.lr == 0.01 and second.config.teacher.model.path == "/models/teacher"
    assert merged.config.a == str(first.output) and merged.config.b == str(second.output)
    assert merged.output == root / "merged" and merged.uses == ["first", "second"]


def test_fingerprints_chain_so_an_upstream_change_reaches_later_stages(tmp_path):
    before = [s.fingerprint for s in load_stages(write(tmp_path, three_stages(tmp_path))).stages]
    changed = three_stages(tmp_path)
    changed["stages"][0]["recipe"]["train"]["steps"] = 4
    after = [s.fingerprint for s in load_stages(write(tmp_path, changed)).stages]
    assert len(set(before)) == 3 and all(a != b for a, b in zip(before, after))
    overwrite_only = three_stages(tmp_path)
    overwrite_only["stages"][2]["merge"]["overwrite"] = True  # set by the command line, not a change of result
    assert [s.fingerprint for s in load_stages(write(tmp_path, overwrite_only)).stages] == before


def test_overrides_reach_defaults_run_stages_and_merge_stages(tmp_path):
    path = write(tmp_path, three_stages(tmp_path))
    plan = load_stages(path, ["defaults.train.lr=0.002", "stages.second.train.steps=7", "stages.merged.t=0.75",
                              "name=other"])
    first, second, merged = plan.stages
    assert first.config.train.lr == 0.002 and second.config.train.lr == 0.01  # the stage's own override wins
    assert second.config.train.steps == 7 and merged.config.t == 0.75
    assert plan.root == tmp_path / "runs" / "other"
    with pytest.raises(ConfigError, match=r"stages.NAME.key=value with NAME one of \['first', 'second', 'merged'\]"):
        load_stages(path, ["stages.nope.t=0.1"])


@pytest.mark.parametrize("where, ref, message", [
    (0, "{previous}", r"stages\[0\] \(first\): `\{previous\}` in the first stage"),
    (1, "{stage:merged}", r"stages\[1\] \(second\): `\{stage:merged\}` names no earlier stage \(earlier stages: first\)"),
    (1, "{stage:second}", r"stages\[1\] \(second\): `\{stage:second\}` names no earlier stage"),
])
def test_a_reference_to_an_unknown_later_or_own_stage_is_refused(tmp_path, where, ref, message):
    recipe = three_stages(tmp_path)
    recipe["stages"][where]["recipe"]["student"] = {"model": {"path": ref}}
    with pytest.raises(ConfigError, match=message):
        load_stages(write(tmp_path, recipe))


def test_a_bad_later_stage_fails_at_load_naming_the_stage_and_key(tmp_path):
    recipe = three_stages(tmp_path)
    recipe["stages"][1]["recipe"]["train"] = {"stepz": 3}
    with pytest.raises(ConfigError, match=r"stages\[1\] \(second\)(.|\n)*unknown key `train.stepz`; did you mean "
                                          r"`train.steps`"):
        load_stages(write(tmp_path, recipe))
    recipe = three_stages(tmp_path)
    recipe["stages"][2]["merge"]["t"] = 2.0
    with pytest.raises(ConfigError, match=r"stages\[2\] \(merged\): invalid merge settings\n  `merge.t`"):
        load_stages(write(tmp_path, recipe))


@pytest.mark.parametrize("change, message", [
    (lambda r: r["stages"].append({"name": "first", "kind": "merge", "merge": {"a": "x", "b": "y"}}), "used twice"),
    (lambda r: r["stages"][2].update(recipe={"method": "kd"}), "a merge stage takes `merge`, not `recipe`"),
    (lambda r: r["stages"].append({"name": "t", "kind": "transfer"}),
     r"`stages\[3\] \(t\)`: a transfer stage needs its `transfer:` settings"),
    (lambda r: r["stages"][0].update(name="../up"), r"`stages\[0\] \(../up\).name`: String should match"),
    (lambda r: r["stages"][0].update(recipe="missing.yaml"), r"recipe `missing.yaml` not found"),
])
def test_malformed_stages_are_refused_at_load(tmp_path, change, message):
    recipe = three_stages(tmp_path)
    change(recipe)
    with pytest.raises(ConfigError, match=message):
        load_stages(write(tmp_path, recipe))


def test_a_stage_recipe_file_is_read_next_to_the_stages_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", {"method": "sft", "name": "ignored", "train": {"steps": 9}}, "one.yaml")
    recipe = three_stages(tmp_path)
    recipe["stages"][0]["recipe"] = "one.yaml"
    path = write(tmp_path / "sub", recipe)
    assert is_stages_recipe(path) and not is_stages_recipe(tmp_path / "sub" / "one.yaml")
    first = load_stages(path).stages[0]
    assert first.config.method == "sft" and first.config.train.steps == 9 and first.config.name == "first"


def merge_pipeline(tmp_path: Path, a: Path, b: Path, t: float = 0.5) -> Path:
    return write(tmp_path, name=f"merges_{t}.yaml", recipe={"name": "merges", "output_dir": str(tmp_path / "runs"), "stages": [
        {"name": "m1", "kind": "merge", "merge": {"a": str(a), "b": str(b), "t": t}},
        {"name": "m2", "kind": "merge", "merge": {"a": "{previous}", "b": str(a), "t": 0.5}}]})


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from helpers import save_tiny_teacher

    root = tmp_path_factory.mktemp("models")
    return (save_tiny_teacher(root / "a", seed=0, pretrain_steps=0, layers=1),
            save_tiny_teacher(root / "b", seed=1, pretrain_steps=0, layers=1))


def test_runner_records_skips_refuses_and_redoes(tmp_path, two_models):
    a, b = two_models
    path = merge_pipeline(tmp_path, a, b)
    root = run_stages(load_stages(path), log=lambda _m: None)
    record = json.loads((root / RECORD).read_text())
    assert [e["status"] for e in record["stages"].values()] == ["complete", "complete"]
    numbers = record["stages"]["m2"]["numbers"]
    assert numbers["t"] == 0.5 and numbers["tensors"] == 11 and set(numbers) == {"t", "tensors", "lerp_fallbacks"}
    assert "| m2 | merge | complete | m1 |" in (root / REPORT_MD).read_text()
    with pytest.raises(ConfigError, match="already holds these stages"):  # a new pipeline refuses, changes nothing
        run_stages(load_stages(path), log=lambda _m: None)
    lines: list[str] = []
    run_stages(load_stages(path), resume=True, log=lines.append)
    assert [line for line in lines if "skipped" in line] == [
        f"stage m1 (merge): complete, skipped (output {root / 'm1'})",
        f"stage m2 (merge): complete, skipped (output {root / 'm2'})"]
    with pytest.raises(ConfigError, match=r"--resume: stages\[0\] \(m1\) finished with another config \(its settings changed: t\)"):
        run_stages(load_stages(merge_pipeline(tmp_path, a, b, t=0.3)), resume=True, log=lambda _m: None)
    # an interrupted second stage (record says started, no output) runs again on --resume; the first is kept
    stamp = (root / "m1" / "model.safetensors").stat().st_mtime_ns
    record["stages"]["m2"]["status"] = "started"
    (root / RECORD).write_text(json.dumps(record))
    import shutil

    shutil.rmtree(root / "m2")
    lines.clear()
    run_stages(load_stages(path), resume=True, log=lines.append)
    assert (root / "m2" / "model.safetensors").is_file() and any("skipped" in line for line in lines)
    assert (root / "m1" / "model.safetensors").stat().st_mtime_ns == stamp
    run_stages(load_stages(merge_pipeline(tmp_path, a, b, t=0.3)), overwrite=True, log=lambda _m: None)
    assert json.loads((root / "m1" / "stillroom_merge.json").read_text())["t"] == 0.3


SHIPPED = sorted((Path(__file__).resolve().parents[3] / "stillroom" / "recipes").glob("*.yaml"))
SHIPPED_STAGES = [r for r in SHIPPED if is_stages_recipe(r)]


def test_the_shipped_stages_recipes_are_found():
    assert {r.stem for r in SHIPPED_STAGES} >= {"ernie_tiny", "prune_recover_merge"}


@pytest.mark.parametrize("recipe", SHIPPED_STAGES, ids=[r.stem for r in SHIPPED_STAGES])
def test_every_shipped_stages_recipe_loads_with_its_chain(recipe):
    """Every stage validates, keeps the loss terms its file declares, and the stages chain through placeholders."""
    plan = load_stages(recipe)
    raw = yaml.safe_load(recipe.read_text())
    assert [s.name for s in plan.stages] == [s["name"] for s in raw["stages"]]
    assert any(s.uses for s in plan.stages), "a pipeline builds on its own stages"
    for stage in plan.stages:
        earlier = {s.name: s.output for s in plan.stages[:stage.index]}
        assert set(stage.uses) <= set(earlier)
        if stage.kind == "run":
            tree = {**raw.get("defaults", {}), **(raw["stages"][stage.index].get("recipe") or {})}
            declared = [t["name"] for t in (tree.get("loss") or {}).get("terms", [])]
            assert not declared or [t.name for t in stage.config.loss.terms] == declared
