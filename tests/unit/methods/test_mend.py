"""method=mend: records through the one pipeline (both stages, malformed records by file:line), the objective
against a hand-computed CE + lambda KL, the N / M normalisation, the frozen LLM through the loop, the config."""

import json
import math

import pytest
import torch
from helpers import tiny_llama
from pydantic import ValidationError

from stillroom.config.schema import DataConfig, RunConfig
from stillroom.data.batch import Example, collate
from stillroom.data.pipeline import build_splits
from stillroom.methods.base import StepCounts
from stillroom.methods.mend import KdScale, MendForward, MendObjective
from stillroom.methods.mend_data import DEMO_LEN, MendEncoder
from stillroom.models.mend import MendDistiller, MendRows, summary_init_table
from stillroom.config.core import TrainConfig
from stillroom.train.loop import Player, forward_backward

V, PAD = 48, 0


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_finetune_records_become_full_context_sequences_and_bad_ones_are_named(tmp_path, tok):
    rows = [{"demonstrations": [f"k{i}>v{i};", "x>y;"], "prompt": f"q{i}>", "completion": f"a{i}"} for i in range(10)]
    rows[3]["demonstrations"] = "k>v;"
    rows[6]["prompt"] = ""
    path = _write(tmp_path / "m.jsonl", rows)
    cfg = DataConfig(sources=[{"path": str(path), "format": "prompt_completion"}], seq_len=64,
                     heldout_fraction=0.0, on_bad_record="skip")
    data = build_splits(cfg, tok, 0, MendEncoder("finetune", "demonstrations", "", 0.8))
    assert len(data.train) == 8 and data.stats["records_bad"] == 2
    bad = data.stats["bad_record_examples"]
    assert any("m.jsonl:4: field 'demonstrations' must be a non-empty list" in b for b in bad)
    assert any("m.jsonl:7: the query ('prompt') and the answer ('completion') must both be non-empty" in b for b in bad)
    e = data.train[0]
    d = e.meta[DEMO_LEN]
    assert tok.decode(e.input_ids[:d]) == "k0>v0;x>y;"
    assert tok.decode([t for t, f in zip(e.input_ids, e.target) if f], skip_special_tokens=True) == "a0"
    assert not any(e.target[:d])


def test_pretrain_splits_text_at_the_ratio_and_refuses_other_formats(tmp_path, tok):
    path = _write(tmp_path / "t.jsonl", [{"text": "a>1;b>2;c>3;d>4;e>5;"}] * 2)
    cfg = DataConfig(sources=[{"path": str(path), "format": "text"}], seq_len=64, heldout_fraction=0.0)
    data = build_splits(cfg, tok, 0, MendEncoder("pretrain", "demonstrations", "", 0.8))
    e = data.train[0]
    n, d = len(e.input_ids), e.meta[DEMO_LEN]
    assert d == round(0.8 * n) and e.target == [False] * (d + 1) + [True] * (n - d - 1)
    wrong = DataConfig(sources=[{"path": str(path), "format": "text"}], seq_len=64, heldout_fraction=0.0)
    with pytest.raises(Exception, match="mend.stage=finetune reads .* format 'text'"):
        build_splits(wrong, tok, 0, MendEncoder("finetune", "demonstrations", "", 0.8))


class _Fixed(torch.nn.Module):
    """A forward whose logits are given (for the hand-computed loss)."""

    def __init__(self, out):
        super().__init__()
        self.out = out


def test_loss_is_ce_on_the_answer_plus_lambda_kl_on_x_scaled_by_n_over_m():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 0.0]]])
    t = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])
    targets = torch.tensor([[-100, 1, -100]])
    x_mask = torch.tensor([[True, True, False]])
    rows = MendRows(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 3), x_mask, targets, torch.zeros(1, 3))
    scale = KdScale({})
    scale.ratio = 0.25
    objective = MendObjective(_Fixed(None), torch.nn.Module(), ce_weight=1.0, loss_lambda=0.7, loss_temperature=2.0,
                              scale=scale)
    result = objective.loss({"logits": s, "rows": rows}, None, t)

    def logp(z, j, temp):
        zs = [v / temp for v in z]
        return zs[j] - math.log(sum(math.exp(v) for v in zs))

    ce = -logp(s[0, 1].tolist(), 1, 1.0)
    def kl_at(p):
        tp, sp = t[0, p].tolist(), s[0, p].tolist()
        return sum(math.exp(logp(tp, v, 2.0)) * (logp(tp, v, 2.0) - logp(sp, v, 2.0)) for v in range(3))

    kl = kl_at(0) + kl_at(1)  # x position 2 is padding: not counted
    assert result.count == 1
    assert float(result.total) == pytest.approx(ce + 0.7 * 0.25 * kl, rel=1e-5)
    assert result.parts["ce"] == pytest.approx(ce, rel=1e-5)
    assert result.parts["kd"] == pytest.approx(0.25 * kl, rel=1e-5)
    pre = MendObjective(_Fixed(None), torch.nn.Module(), 0.0, 1.0, 2.0, scale)  # stage pretrain: KD only
    assert float(pre.loss({"logits": s, "rows": rows}, None, t).total) == pytest.approx(0.25 * kl, rel=1e-5)


def _examples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        d, q = 5 + i % 3, 2
        ids = torch.randint(3, V, (d + q + 2,), generator=g).tolist()
        out.append(Example(ids, [False] * (d + q) + [True, True], uid=f"s:{i}:h", meta={DEMO_LEN: d}))
    return out


def _player(seed=0, l=2):
    llm = tiny_llama(V, layers=2, hidden=32, seed=seed).requires_grad_(False)
    backbone = tiny_llama(V, layers=1, hidden=16, seed=seed + 1).train()
    distiller = MendDistiller(backbone, l, 32, init_table=summary_init_table(llm, backbone), seed=seed)
    lens = {e.uid: e.meta[DEMO_LEN] for e in _examples()}
    scale = KdScale(lens)
    objective = MendObjective(MendForward(distiller, llm, lens, PAD, V), torch.nn.Module(), 1.0, 1.0, 1.0, scale)
    player = Player("student", distiller, objective, weight_targets=scale)
    player.build_optimizer(TrainConfig(steps=4, lr=1e-2, warmup_steps=0))
    return player, llm


def _step(player, micro):
    n = sum(b.num_targets for b in micro)
    player.weight_targets(micro, StepCounts(step=0, targets=n, all_reduce_sum=lambda v: v))
    total, _, parts = forward_backward(micro, player, player.objective.forward, device=torch.device("cpu"),
                                       scale=1.0 / n)
    return total / n, parts, n


def test_the_step_is_ce_mean_plus_kl_mean_whatever_the_micro_batches():
    ex = _examples()
    player, _ = _player()
    one, parts, n = _step(player, [collate(ex, PAD)])
    grads = [p.grad.clone() for p in player.trainable() if p.grad is not None]
    player.optimizer.zero_grad(set_to_none=True)
    two, _, _ = _step(player, [collate(ex[:1], PAD), collate(ex[1:], PAD)])
    assert two == pytest.approx(one, rel=1e-5)
    for a, b in zip(grads, [p.grad for p in player.trainable() if p.grad is not None]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    m = sum(len(e.input_ids) - e.meta[DEMO_LEN] for e in ex)
    assert player.weight_targets.ratio == pytest.approx(n / m)
    assert one == pytest.approx((parts["ce"] + parts["kd"]) / n, rel=1e-5)


def test_only_the_distiller_learns_and_the_llm_stays_frozen():
    player, llm = _player()
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    summary = player.model.summary.detach().clone()
    for _ in range(2):
        _step(player, [collate(_examples(), PAD)])
        player.optimizer.step()
        player.optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())
    assert all(p.grad is None for p in llm.parameters())
    assert not torch.equal(summary, player.model.summary)
    assert {id(p) for p in player.trainable()}.isdisjoint({id(p) for p in llm.parameters()})


def _cfg(**over):
    base = {"method": "mend", "data": {"sources": [{"path": "x.jsonl"}]}, "loss": {"terms": [{"name": "ce"}]}}
    return {**base, **over}


def test_the_config_names_the_key_to_fix():
    assert RunConfig.model_validate(_cfg()).mend.summary_len == 100
    with pytest.raises(ValidationError, match=r"loss.terms \(\['forward_kl'\]\) must be \[\{name: ce\}\]"):
        RunConfig.model_validate(_cfg(loss={"terms": [{"name": "forward_kl"}]}))
    with pytest.raises(ValidationError, match="set baseline: false"):
        RunConfig.model_validate(_cfg(baseline=True))
    with pytest.raises(ValidationError, match="set train.eval_every: 0"):
        RunConfig.model_validate(_cfg(train={"eval_every": 5}))
    with pytest.raises(ValidationError, match="set teacher.source: online"):
        RunConfig.model_validate(_cfg(teacher={"source": "store"}))


def test_the_shipped_recipe_chains_the_llm_the_pretrain_and_the_finetune_stage():
    from pathlib import Path

    from stillroom.config.stages import load_stages

    plan = load_stages(Path(__file__).resolve().parents[3] / "stillroom" / "recipes" / "mend.yaml")
    llm, pre, fine = plan.stages
    assert (llm.config.method, pre.config.mend.stage, fine.config.mend.stage) == ("sft", "pretrain", "finetune")
    assert pre.config.teacher.model.path == str(llm.output) and fine.config.mend.summary_len == 8
    assert fine.config.mend.init == f"{pre.output}/../distiller" and fine.config.student.model.path == str(pre.output)
