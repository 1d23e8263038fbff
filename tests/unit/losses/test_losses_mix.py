"""LossMix (the interface the loop calls), the registry's errors and TAID's schedule."""

from __future__ import annotations

import math

import pytest
import torch

import stillroom.losses as L
from losses_helpers import make_inputs, topk_signal
from stillroom.config.schema import LossConfig, LossTerm
from stillroom.losses import LossMix, StudentOutput
from stillroom.teachers.signal import TeacherSignal


def cfg(*terms, **kw):
    return LossConfig(terms=[LossTerm(name=n, weight=w, params=p) for n, w, p in terms], **kw)


def test_unknown_term_and_param_name_the_nearest():
    with pytest.raises(ValueError, match="'forward_kll'.*Did you mean 'forward_kl'"):
        LossMix(cfg(("forward_kll", 1.0, {})))
    with pytest.raises(ValueError, match=r"'jsd' has no parameter 'betta'.*Did you mean 'beta'.*Valid parameters of 'jsd': beta"):
        LossMix(cfg(("jsd", 1.0, {"betta": 0.3})))
    with pytest.raises(ValueError, match="beta=2.0"):
        LossMix(cfg(("jsd", 1.0, {"beta": 2.0})))
    with pytest.raises(ValueError, match="needs the student's and teacher's layer counts"):
        LossMix(cfg(("squarehead", 1.0, {})))


def test_every_registered_term_has_docs_and_params():
    for spec in L.list_terms():
        assert spec.summary, spec.name
        LossMix(cfg((spec.name, 1.0, {})), student_layers=2, teacher_layers=4, student_hidden=4, teacher_hidden=4)


@pytest.mark.parametrize("fused", [True, False])
def test_mix_matches_sum_of_terms(fused):
    hidden, head, teacher, mask, targets = make_inputs(b=3, t=6, v=13, d=5)
    c = cfg(("ce", 0.5, {}), ("forward_kl", 1.0, {}), ("jsd", 2.0, {"beta": 0.3}), ("jsd", 1.0, {}),
            loss_temperature=2.0, scale_by_temperature_squared=True, chunk_tokens=4, fused=fused)
    mix = LossMix(c)
    assert mix.needs_teacher and mix.needs_logits and not mix.needs_attentions
    assert mix.student_hidden_layers == [] and mix.teacher_hidden_layers == []
    h = hidden.clone().requires_grad_(True)
    out = StudentOutput(logits_btv=None if fused else head(h), hidden_btd=h, head=head)
    res = mix(out, TeacherSignal(logits_btv=teacher), targets, mask)
    assert res.count == int(mask.sum())
    assert set(res.parts) == {"ce", "forward_kl", "jsd[2]", "jsd[3]"}
    logits = head(hidden)
    ce, _ = L.ce(logits, None, mask, target_ids=targets)
    fkl, _ = L.forward_kl(logits, teacher, mask, loss_temperature=2.0, scale_by_temperature_squared=True)
    j3, _ = L.jsd(logits, teacher, mask, beta=0.3, loss_temperature=2.0, scale_by_temperature_squared=True)
    j5, _ = L.jsd(logits, teacher, mask, beta=0.5, loss_temperature=2.0, scale_by_temperature_squared=True)
    want = 0.5 * ce + fkl + 2 * j3 + j5
    torch.testing.assert_close(res.total, want.detach(), rtol=1e-5, atol=1e-5)
    assert res.parts["jsd[2]"] == pytest.approx(j3.item(), rel=1e-5)
    assert res.total.dtype == torch.float32
    res.total.backward()
    assert torch.isfinite(h.grad).all()


def test_mix_with_top_k_teacher_and_no_teacher_error():
    hidden, head, teacher, mask, targets = make_inputs()
    mix = LossMix(cfg(("reverse_kl", 1.0, {})))
    res = mix(StudentOutput(hidden_btd=hidden, head=head), topk_signal(teacher, 4), targets, mask)
    assert res.total.item() >= 0
    with pytest.raises(ValueError, match="need a teacher"):
        mix(StudentOutput(hidden_btd=hidden, head=head), None, targets, mask)
    ce_only = LossMix(cfg(("ce", 1.0, {})))
    assert not ce_only.needs_teacher
    assert ce_only(StudentOutput(hidden_btd=hidden, head=head), None, targets, mask).total.item() > 0


def test_mix_empty_mask_gives_graph_connected_zero():
    hidden, head, teacher, _, targets = make_inputs()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    h = hidden.clone().requires_grad_(True)
    res = LossMix(cfg(("forward_kl", 1.0, {})))(StudentOutput(hidden_btd=h, head=head), teacher, targets, mask)
    assert res.count == 0 and res.total.item() == 0.0
    res.total.backward()
    assert torch.all(h.grad == 0)


def test_mix_hidden_terms_projection_and_state_dict():
    b, t, v = 2, 4, 9
    _, _, teacher_logits, mask, targets = make_inputs(b=b, t=t, v=v)
    mix = LossMix(cfg(("forward_kl", 1.0, {}), ("hidden_mse", 0.1, {}), ("attention_mse", 0.2, {"layers": "last"})),
                  student_hidden=3, teacher_hidden=5, student_layers=2, teacher_layers=4)
    assert mix.student_hidden_layers == [1, 2] and mix.teacher_hidden_layers == [2, 4]
    assert mix.needs_attentions
    assert sorted(mix.state_dict()) == ["projections.t1_s1.weight", "projections.t1_s2.weight"]
    st_hidden = {i: torch.randn(b, t, 3, requires_grad=True) for i in (1, 2)}
    te_hidden = {i: torch.randn(b, t, 5) for i in (2, 4)}
    st_att = {1: torch.softmax(torch.randn(b, 2, t, t), -1)}
    te_att = {3: torch.softmax(torch.randn(b, 2, t, t), -1)}
    signal = TeacherSignal(logits_btv=teacher_logits, hidden_states=te_hidden, attentions=te_att)
    res = mix(StudentOutput(logits_btv=torch.randn(b, t, v), hidden_states=st_hidden, attentions=st_att), signal,
              targets, mask)
    assert set(res.parts) == {"forward_kl", "hidden_mse", "attention_mse"}
    res.total.backward()
    assert mix.projections["t1_s1"].weight.grad is not None
    with pytest.raises(ValueError, match="did not return hidden_states layer 2"):
        mix(StudentOutput(logits_btv=torch.randn(b, t, v), hidden_states={1: st_hidden[1]}, attentions=st_att),
            signal, targets, mask)


def test_taid_schedule_logic():
    s = L.TaidSchedule(t_start=0.4, t_end=1.0, alpha=0.5, beta=0.9)
    s.update(2.0, step=1, total_steps=100)  # first call: only remembers the loss
    assert s.value == pytest.approx(0.4) and float(s.prev_loss) == 2.0
    s.update(1.0, step=2, total_steps=100)
    m = 0.1 * 0.5
    want = 0.4 + 0.5 * (1 / (1 + math.exp(-m))) * 0.6
    assert float(s.momentum) == pytest.approx(m)
    assert s.value == pytest.approx(want, rel=1e-6)
    # Never below the linear floor, never above t_end, monotone.
    s.update(5.0, step=90, total_steps=100)
    assert s.value == pytest.approx(0.4 + 0.6 * 0.9, rel=1e-6)
    for step in range(91, 200):
        before = s.value
        s.update(1.0, step=step, total_steps=100)
        assert before <= s.value <= 1.0
    lin = L.TaidSchedule(adaptive=False)
    lin.update(1.0, step=50, total_steps=100)
    assert lin.value == pytest.approx(0.7)


def test_mix_taid_uses_schedule_and_checkpoints_it():
    hidden, head, teacher, mask, targets = make_inputs()
    c = cfg(("taid", 1.0, {"t_start": 0.2, "alpha": 0.01}))
    mix = LossMix(c)
    out = StudentOutput(hidden_btd=hidden, head=head)
    r0 = mix(out, teacher, targets, mask)
    torch.testing.assert_close(r0.total, L.taid(head(hidden), teacher, mask, t=0.2)[0].detach(), rtol=1e-5, atol=1e-6)
    mix.after_step({"taid": 3.0}, 1, 10)
    mix.after_step({"taid": 2.0}, 2, 10)
    t_now = mix.log_state()["taid_t"]
    assert t_now > 0.2
    state = mix.state_dict()
    assert {"states.taid.t", "states.taid.momentum", "states.taid.prev_loss"} <= set(state)
    fresh = LossMix(c)
    fresh.load_state_dict(state)
    assert fresh.log_state()["taid_t"] == t_now and float(fresh.states["taid"].prev_loss) == 2.0
    r1 = fresh(out, teacher, targets, mask)
    torch.testing.assert_close(r1.total, L.taid(head(hidden), teacher, mask, t=t_now)[0].detach(), rtol=1e-5, atol=1e-6)
    # A checkpoint written before the mix kept term state under `states` (keys "taid.t", ...) still loads.
    old_format = LossMix(c)
    old_format.load_state_dict({k.removeprefix("states."): v for k, v in state.items()})
    assert old_format.log_state()["taid_t"] == t_now
    with pytest.raises(ValueError, match="at most one 'taid'"):
        LossMix(cfg(("taid", 1.0, {}), ("taid", 1.0, {})))


def test_taid_schedule_is_fed_the_taid_loss_not_the_mix_total():
    """Official TAID updates t from the TAID loss: with ce beside it, t must move exactly as a
    taid-alone schedule fed the same TAID values (feeding the mix's total gives another t)."""
    hidden, head, teacher, mask, targets = make_inputs(b=3, t=6, v=13, d=5)
    mix = LossMix(cfg(("taid", 1.0, {"alpha": 0.5}), ("ce", 3.0, {}), chunk_tokens=4))
    alone = L.TaidSchedule(alpha=0.5)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        h = hidden + 0.5 * step * torch.randn(hidden.shape, generator=g)  # the student moves
        res = mix(StudentOutput(hidden_btd=h, head=head), teacher, targets, mask)
        taid_now, _ = L.taid(head(h), teacher, mask, t=alone.value)
        assert res.parts["taid"] == pytest.approx(taid_now.item(), rel=1e-6)  # the kernel runs at the state's t
        per_target = {k: v / res.count for k, v in res.parts.items()}
        mix.after_step(per_target, step, 10)
        alone.update(per_target["taid"], step, 10)
        assert mix.log_state()["taid_t"] == alone.value
    assert alone.value > alone.t_linear(5, 10)  # the adaptive update (not the linear floor) set t


def test_after_step_takes_per_term_values():
    mix = LossMix(cfg(("taid", 1.0, {}), ("ce", 1.0, {})))
    with pytest.raises(TypeError, match="per_target must map each term key"):
        mix.after_step(2.0, 1, 10)
    with pytest.raises(KeyError, match="no value for term 'taid'"):
        mix.after_step({"ce": 2.0}, 1, 10)
    plain = LossMix(cfg(("forward_kl", 1.0, {})))
    plain.after_step({"forward_kl": 1.0}, 1, 10)  # no state: nothing to advance
    assert plain.log_state() == {}


def test_fused_accepts_bf16_hidden_with_fp32_head():
    hidden, head, teacher, mask, targets = make_inputs(b=2, t=6, v=13, d=8)
    h16 = hidden.bfloat16().requires_grad_(True)
    mix = LossMix(cfg(("forward_kl", 1.0, {}), chunk_tokens=4))
    res = mix(StudentOutput(hidden_btd=h16, head=head), teacher, targets, mask)
    ref, _ = L.forward_kl(head(h16.detach().float()), teacher, mask)
    torch.testing.assert_close(res.total, ref.detach(), rtol=1e-5, atol=1e-5)
    res.total.backward()
    assert h16.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.float32
