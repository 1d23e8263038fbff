"""Strict config: unknown keys name the nearest valid one; overrides; every shipped recipe loads."""

from pathlib import Path

import pytest

from stillroom.config.load import ConfigError, load_config
from stillroom.config.stages import is_stages_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
STAGES_RECIPES = [r for r in RECIPES if is_stages_recipe(r)]
"""Multi-stage recipes (a top-level `stages:` list): validated by tests/unit/run/test_stages_config.py."""
RUN_RECIPES = [r for r in RECIPES if r not in STAGES_RECIPES]


def test_defaults_load():
    cfg = load_config(None)
    assert cfg.loss.terms[0].name == "forward_kl"


def test_unknown_nested_key_suggests(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lerning_rate: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "train.lerning_rate" in msg


def test_override_typo_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.setps=3"])
    assert "did you mean `train.steps`" in str(err.value)


def test_overrides_apply_and_parse_yaml():
    cfg = load_config(None, ["train.steps=7", "loss.terms=[{name: jsd, params: {beta: 0.5}}]", "data.sources.0.limit=3"])
    assert cfg.train.steps == 7
    assert cfg.loss.terms[0].params == {"beta": 0.5}
    assert cfg.data.sources[0].limit == 3


def test_bad_yaml_names_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert f"{p}:" in str(err.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.steps=many"])
    assert "train.steps" in str(err.value)


def test_the_shipped_recipes_are_found():
    """Guards the parametrised test below: an empty glob would turn it into a silent skip."""
    packaged = sorted((Path(__file__).resolve().parents[2] / "stillroom" / "recipes").glob("*.yaml"))
    assert len(RECIPES) >= 10
    assert [r.name for r in RECIPES] == [r.name for r in packaged]


@pytest.mark.parametrize("recipe", RUN_RECIPES, ids=[r.stem for r in RUN_RECIPES])
def test_every_shipped_recipe_loads(recipe):
    """Each recipe validates, keeps what its file says, and its loss mix builds with one term per entry."""
    import yaml

    from stillroom.losses import LossMix

    raw = yaml.safe_load(recipe.read_text())
    cfg = load_config(recipe)
    assert cfg.name == raw.get("name", cfg.name) and cfg.name
    assert cfg.method == raw.get("method", cfg.method)
    for section in ("train", "data", "teacher"):
        for key, value in (raw.get(section) or {}).items():
            if isinstance(value, (int, float, str, bool)):
                assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    declared = [t["name"] for t in (raw.get("loss") or {}).get("terms", [])]
    if declared:
        assert [t.name for t in cfg.loss.terms] == declared
    mix = LossMix(cfg.loss)
    assert len(mix.keys) == len(mix.specs) == len(cfg.loss.terms) >= 1
    assert [s.name for s in mix.specs] == [t.name for t in cfg.loss.terms]


@pytest.mark.parametrize("recipe", RUN_RECIPES, ids=[r.stem for r in RUN_RECIPES])
def test_every_shipped_recipes_resolved_config_reloads_to_itself(recipe, tmp_path):
    """`stillroom eval` and `--resume` read a run's config.resolved.yaml, which names every field: it must load
    again (rules written on the fields a recipe named would refuse it) and give the same config."""
    from stillroom.config.load import dump_config

    resolved = dump_config(load_config(recipe))
    (tmp_path / "config.resolved.yaml").write_text(resolved)
    assert dump_config(load_config(tmp_path / "config.resolved.yaml")) == resolved


def test_lora_initialisation_without_lora_is_refused_when_the_recipe_loads():
    from stillroom.config.core import StudentConfig

    with pytest.raises(ValueError, match="student.trainable=lora"):
        StudentConfig(lora={"init": "corda_kpm"})
    assert StudentConfig(trainable="lora", lora={"init": "corda_kpm"}).lora.init == "corda_kpm"
