"""One spec per term: what is derived from it, value checks at load time, and adding a term."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import stillroom.losses as L
from losses_helpers import make_inputs
from stillroom.config.schema import LossConfig, LossTerm
from stillroom.losses import LossMix, StudentOutput, TermSpec
from stillroom.losses import terms as Fn


def test_divergences_and_public_functions_come_from_the_specs():
    assert L.DIVERGENCES == [n for n, s in L.REGISTRY.items() if s.divergence]
    assert {"forward_kl", "jsd", "taid", "tvd_pp"} <= set(L.DIVERGENCES) and "ce" not in L.DIVERGENCES
    for spec in L.list_terms():
        if spec.kind != "logit":
            assert spec.fn is spec.kernel
            continue
        fn = getattr(L, spec.name)
        assert spec.fn is fn and fn.__name__ == spec.name and fn.__doc__ == spec.doc
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["student_logits", "teacher", "mask"]
        assert {k: params[k].default for k in spec.arg_defaults} == spec.arg_defaults
        assert ("target_ids" in params) == spec.uses_targets
    sig = inspect.signature(L.jsd)
    assert str(sig) == ("(student_logits, teacher, mask, *, beta=0.5, loss_temperature=1.0, "
                        "scale_by_temperature_squared=False, chunk_tokens=None)")
    assert "target_ids" in str(inspect.signature(L.ce)) and inspect.signature(L.taid).parameters["t"].default == 0.4
    with pytest.raises(TypeError, match="unexpected keyword argument 'betta'"):
        L.jsd(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), betta=0.3)
    with pytest.raises(TypeError, match="target_ids"):
        L.ce(torch.zeros(1, 1, 2), None, torch.ones(1, 1, dtype=torch.bool))


def test_needs_are_read_from_the_specs():
    assert L.get_term("taid").needs >= {"logits", "teacher", "dense_teacher", "state"}
    assert L.get_term("forward_kl").needs == {"logits", "teacher"}
    assert L.get_term("ce").needs == {"logits", "targets"}
    assert L.get_term("hidden_mse").needs == {"hidden_states", "teacher", "projections"}
    assert L.get_term("squarehead").needs == {"hidden_states", "teacher"}
    assert L.get_term("attention_mse").needs == {"attentions", "teacher"}
    assert LossMix(LossConfig(terms=[LossTerm(name="ce"), LossTerm(name="jsd")])).accepts_token_weights
    assert not LossMix(LossConfig(terms=[LossTerm(name="ce"), LossTerm(name="hidden_mse")]),
                       student_layers=2, teacher_layers=2).accepts_token_weights


@pytest.mark.parametrize("name, params, match", [
    ("jsd", {"beta": 2.0}, "'jsd': beta=2.0 must lie in \\[0, 1\\]"),
    ("skew_kl", {"alpha": -0.1}, "alpha=-0.1"),
    ("taid", {"t_start": 0.9, "t_end": 0.5}, "t_start <= t_end"),
    ("taid", {"beta": 1.0}, "beta=1.0 must lie in \\[0, 1\\)"),
    ("taid", {"alpha": -1}, "alpha=-1.0 must be >= 0"),
    ("taid", {"adaptive": "no"}, "adaptive='no' must be true or false"),
    ("tvd_pp", {"weighting": "median"}, "weighting='median'; valid: 'expectation', 'unweighted'"),
    ("tvd_pp", {"scope": "global"}, "scope='global'"),
    ("tvd_pp", {"eps": "x"}, "'tvd_pp': eps='x' is not a number"),
    ("squarehead", {"layers": "every"}, "layers='every'"),
    ("hidden_mse", {"layers": [[1, -2]]}, "must be >= 0"),
    ("attention_mse", {"layers": [1, 2]}, "list of \\[student, teacher\\]"),
])
def test_bad_values_fail_when_the_recipe_loads(name, params, match):
    with pytest.raises(ValueError, match=match):
        L.resolve_params(name, params)  # no tensors, no model: what the config layer calls
    with pytest.raises(ValueError, match=match):
        LossConfig(terms=[LossTerm(name=name, params=params)])


def test_resolve_params_fills_defaults_and_normalises():
    assert L.resolve_params("tvd_pp", {"eps": "1e-6"}) == {"eps": 1e-6, "weighting": "expectation", "scope": "position"}
    assert L.resolve_params("jsd", {"beta": 0}) == {"beta": 0.0}
    assert L.resolve_params("squarehead", {"layers": [[1, 2]]})["layers"] == [[1, 2]]


def test_mix_names_no_term():
    source = (Path(L.__file__).parent / "mix.py").read_text()
    for name in L.REGISTRY:
        assert f'"{name}"' not in source and f"'{name}'" not in source, name


# ---------------------------------------------------------------- adding a term: one spec


class _Doubling(torch.nn.Module):
    """Toy per-run state: the kernel's factor c starts at 1 and doubles when the term's loss fell."""

    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.tensor(1.0))
        self.seen: list[float] = []

    def kernel_args(self):
        return {"c": float(self.c)}

    def update(self, per_token, step, total_steps):
        self.seen.append(per_token)
        if len(self.seen) > 1 and per_token < self.seen[-2]:
            self.c.mul_(2.0)

    def log_state(self):
        return {"toy_c": float(self.c)}


def _sq_kernel(ctx, _stats, *, c):
    p, q = ctx.pair
    return c * (p.exp() - q.exp()).pow(2).sum(-1)


@pytest.fixture
def toy_terms():
    plain = L.define(TermSpec("toy_sq", "logit", _sq_kernel, {"c": 1.0}, L.registry.non_negative("c"),
                              divergence=True, sparse_ok=True, doc="Toy: c * sum_v (p - q)^2."))
    stateful = L.define(TermSpec("toy_sq_sched", "logit", _sq_kernel, {}, L.registry.non_negative("c"),
                                 args={"c": 1.0}, state=lambda p: _Doubling(), doc="Toy with a per-run state."))
    yield plain, stateful
    del L.REGISTRY["toy_sq"], L.REGISTRY["toy_sq_sched"]


def test_a_new_term_is_one_spec(toy_terms):
    toy_sq, _ = toy_terms
    hidden, head, teacher, mask, targets = make_inputs(b=3, t=5, v=9, d=4)
    logits = head(hidden)
    want = ((torch.softmax(teacher, -1) - torch.softmax(logits, -1)).pow(2).sum(-1) * mask).sum()
    torch.testing.assert_close(toy_sq(logits, teacher, mask)[0], want)
    torch.testing.assert_close(toy_sq(logits, teacher, mask, c=3.0, chunk_tokens=2)[0], 3 * want)
    with pytest.raises(ValueError, match="'toy_sq': c=-1.0 must be >= 0"):
        LossConfig(terms=[LossTerm(name="toy_sq", params={"c": -1})])
    mix = LossMix(LossConfig(terms=[LossTerm(name="toy_sq", params={"c": 2.0}), LossTerm(name="ce")], chunk_tokens=4,
                             loss_temperature=2.0, scale_by_temperature_squared=True))
    res = mix(StudentOutput(hidden_btd=hidden, head=head), teacher, targets, mask)
    torch.testing.assert_close(torch.tensor(res.parts["toy_sq"]), 4 * 2 * toy_sq(logits / 2, teacher / 2, mask)[0].detach())


def test_a_new_stateful_term_gets_its_state_and_its_own_loss(toy_terms):
    _, toy_sched = toy_terms
    hidden, head, teacher, mask, targets = make_inputs(b=2, t=4, v=7, d=3)
    mix = LossMix(LossConfig(terms=[LossTerm(name="ce"), LossTerm(name="toy_sq_sched")]))
    out = StudentOutput(hidden_btd=hidden, head=head)
    base = mix(out, teacher, targets, mask).parts["toy_sq_sched"]
    mix.after_step({"ce": 9.0, "toy_sq_sched": 2.0}, 1, 10)
    mix.after_step({"ce": 1.0, "toy_sq_sched": 1.0}, 2, 10)
    assert mix.states["toy_sq_sched"].seen == [2.0, 1.0]
    assert mix.log_state() == {"toy_c": 2.0} and "states.toy_sq_sched.c" in mix.state_dict()
    assert mix(out, teacher, targets, mask).parts["toy_sq_sched"] == pytest.approx(2 * base, rel=1e-6)
    torch.testing.assert_close(toy_sched(head(hidden), teacher, mask, c=2.0)[0].item(), 2 * base, rtol=1e-6, atol=0)


def test_kernel_helpers_are_the_functional_ones():
    # The public divergences evaluate the per-row functions of losses.terms (one implementation).
    logp = torch.log_softmax(torch.randn(4, 6), -1)
    logq = torch.log_softmax(torch.randn(4, 6), -1)
    v, _ = L.forward_kl(logq.unsqueeze(0), logp.unsqueeze(0), torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(v, Fn.forward_kl_rows(logp, logq).sum())
