"""The classifier section: defaults, strictness and the refusals that name the section."""

from pathlib import Path

import pytest

from stillroom.config.load import ConfigError, load_config

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "classifier_digits.yaml"


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_the_shipped_recipe_loads_with_its_section():
    cfg = load_config(RECIPE)
    assert cfg.domain == "classifier" and cfg.method == "kd" and cfg.baseline
    sec = cfg.classifier
    assert sec.dataset == "digits" and sec.teacher.path is None and sec.teacher.steps >= 100
    assert sum(sec.student.hidden) < sum(sec.teacher.arch.hidden) // 4


def test_domain_gets_its_section_defaults_and_lm_keeps_none():
    assert load_config(None, ["domain=classifier"]).classifier.student.kind == "mlp"
    assert load_config(None).classifier is None


@pytest.mark.parametrize("section", ["data", "teacher", "student"])
def test_classifier_recipe_refuses_lm_sections(tmp_path, section):
    body = {"data": "data:\n  seq_len: 64\n", "teacher": "teacher:\n  device: cpu\n",
            "student": "student:\n  dtype: float32\n"}[section]
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "domain: classifier\n" + body))
    assert f"the `{section}` section is set, but domain is 'classifier'" in str(err.value)
    with pytest.raises(ConfigError, match=f"`{section}` section"):  # by override too
        load_config(None, ["domain=classifier", {"data": "data.seq_len=64", "teacher": "teacher.device=cpu",
                                                 "student": "student.dtype=float32"}[section]])


def test_classifier_section_needs_its_domain():
    with pytest.raises(ConfigError, match="the `classifier` section is set, but domain is 'lm'"):
        load_config(None, ["classifier.dataset=digits"])


def test_section_is_strict(tmp_path):
    with pytest.raises(ConfigError, match="did you mean `classifier.heldout_fraction`"):
        load_config(None, ["domain=classifier", "classifier.heldout_fracton=0.1"])
    with pytest.raises(ConfigError, match="`channels` is set, but kind is 'mlp'"):
        load_config(None, ["domain=classifier", "classifier.student={kind: mlp, channels: [4]}"])
    with pytest.raises(ConfigError, match="give `path`"):
        load_config(None, ["domain=classifier", "classifier.teacher={path: /x, steps: 10}"])
    with pytest.raises(ConfigError, match="classifier.dataset"):
        load_config(None, ["domain=classifier", "classifier.dataset=cifar10"])
    with pytest.raises(ConfigError, match="heldout_fraction"):
        load_config(None, ["domain=classifier", "classifier.heldout_fraction=0"])


def test_a_dumped_section_loads_back():
    """A dump repeats every field at its value (the other kind's widths, a loaded teacher's training defaults)."""
    from stillroom.config.domains import ClassifierConfig

    for overrides in ([], ["classifier.teacher={path: /saved/teacher}", "classifier.student={kind: cnn, channels: [4]}"]):
        sec = load_config(None, ["domain=classifier", *overrides]).classifier
        assert ClassifierConfig.model_validate(sec.model_dump(mode="json")) == sec
