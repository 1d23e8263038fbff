"""The shipped on-policy and draft recipes load, validate, and say what they claim."""

import pytest

from stillroom.cli.main import _recipe_path
from stillroom.config.load import load_config
from stillroom.losses import LossMix


@pytest.mark.parametrize("name,method,term", [
    ("onpolicy", "onpolicy", "jsd"), ("draft_forward_kl", "kd", "forward_kl"),
    ("draft_tvd_pp", "kd", "tvd_pp"), ("draft_onpolicy", "onpolicy", "forward_kl"),
])
def test_recipe_validates(name, method, term):
    cfg = load_config(_recipe_path(name), [])
    assert cfg.method == method and [t.name for t in cfg.loss.terms] == [term]
    LossMix(cfg.loss)
    if name.startswith("draft_"):
        assert cfg.student.from_teacher.num_layers <= 5  # at most a sixth of SmolLM2's 30 layers
        assert cfg.baseline and cfg.data.sources[0].format == "prompt_completion"
    if method == "onpolicy":
        assert cfg.onpolicy.student_weight > 0


def test_divergence_is_a_choice_by_override():
    cfg = load_config(_recipe_path("draft_forward_kl"), ["loss.terms=[{name: jsd}]"])
    assert [t.name for t in cfg.loss.terms] == ["jsd"]
