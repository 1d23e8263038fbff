"""method=copg: the grouped encoder through the one pipeline, the group checks, the objective's loss and
gradient against the explicit form, the reference, the config."""

import copy
import json

import pytest
import torch
from helpers import tiny_llama
from pydantic import ValidationError

from stillroom.config.schema import DataConfig, RunConfig
from stillroom.data.batch import Example, collate
from stillroom.data.pipeline import build_splits
from stillroom.losses.preference import copg_group
from stillroom.methods.base import StepCounts
from stillroom.methods.copg import (
    REWARD, CompletionsEncoder, CopgObjective, GroupStepScale, check_groups, sequence_rewards,
)
from stillroom.methods.llava_mod import PolicyLogps, batch_logps
from stillroom.train.loop import Player, forward_backward

V = 64
CPU = torch.device("cpu")


def test_records_become_groups_with_rewards_through_the_one_pipeline(tmp_path, tok):
    rows = [{"prompt": f"q{i} =", "completions": [f" a{i}", f" b{i}", f" c{i}"], "rewards": [0.2, 0.9, -1]}
            for i in range(12)]
    rows[4]["completions"] = rows[4]["completions"][:2]
    rows[7]["rewards"] = [0.2, "high", 1]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(sources=[{"path": str(path), "format": "prompt_completion"}], seq_len=24,
                     heldout_fraction=0.25, on_bad_record="skip")
    data = build_splits(cfg, tok, 0, CompletionsEncoder(3, "completions", "rewards"))
    assert data.group_size == 3 and len(data.train) % 3 == 0 and data.stats["records_bad"] == 2
    assert [e.role for e in data.train[:3]] == ["c0", "c1", "c2"]
    assert [e.meta[REWARD] for e in data.train[:3]] == [0.2, 0.9, -1.0]
    bad = data.stats["bad_record_examples"]
    assert any("g.jsonl:5: field 'completions' holds 2 completions, but copg.group_size is 3" in b for b in bad)
    assert any("g.jsonl:8: field 'rewards' must be a list of 3 finite numbers" in b for b in bad)
    # evaluation and the CE baseline see the best-rewarded completion
    assert all(tok.decode([t for t, f in zip(e.input_ids, e.target) if f]).startswith(" b") for e in data.heldout)
    rewards = sequence_rewards(data.train)
    assert len(rewards) == len(data.train) and rewards[data.train[1].uid] == 0.9


def _groups(k=3, n_groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for r in range(n_groups):
        prompt = torch.randint(2, V, (4,), generator=g).tolist()
        for i in range(k):
            answer = torch.randint(2, V, (2 + i,), generator=g).tolist()
            examples.append(Example(prompt + answer, [False] * 4 + [True] * len(answer), uid=f"s:{r}:c{i}:h{i}",
                                    role=f"c{i}", meta={REWARD: float(i) / 2}))
    return examples


def test_group_checks_refuse_mixed_or_partial_groups():
    ex = _groups()
    assert check_groups(collate(ex, 0), 3) == 2
    with pytest.raises(ValueError, match="not made of whole groups of 3"):
        check_groups(collate(ex[:4], 0), 3)
    with pytest.raises(ValueError, match="not the completions of one prompt"):
        check_groups(collate([ex[0], ex[4], ex[2]], 0), 3)


def _objective(model, reference, examples, beta=0.3, k=3):
    scale = GroupStepScale(k)
    objective = CopgObjective(PolicyLogps(model, V), torch.nn.Module(), reference, sequence_rewards(examples), V,
                              beta, k, scale)
    return objective, scale


def test_the_objective_is_the_mean_copg_loss_of_the_step_and_its_gradient():
    model, beta = tiny_llama(V, layers=2, seed=0), 0.3
    reference = tiny_llama(V, layers=2, seed=1)  # a different pi_ref, so the log-ratios are not zero
    examples = _groups()
    micro = [collate(examples[:3], 0), collate(examples[3:], 0)]
    objective, scale = _objective(model, reference, examples, beta)
    n = sum(b.num_targets for b in micro)
    scale(micro, StepCounts(step=0, targets=n, all_reduce_sum=lambda x: x))
    assert scale.scale == pytest.approx(n / 2)
    player = Player("student", model, objective)
    model.train()
    loss, _, parts = forward_backward(micro, player, objective.forward, device=CPU, precision="fp32", scale=1.0 / n)
    got = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    batch = collate(examples, 0)
    logp_gk = batch_logps(model, batch, V).view(2, 3)
    with torch.no_grad():
        ref_gk = batch_logps(reference, batch, V).view(2, 3)
    reward_gk = torch.tensor([[0.0, 0.5, 1.0]] * 2)
    a_gk = reward_gk - beta * (logp_gk - ref_gk)
    explicit = sum((a_gk[:, i] - a_gk[:, j]) ** 2 for i in range(3) for j in range(i)) / 2 / (2 * beta)
    (explicit.mean()).backward()
    assert loss / n == pytest.approx(float(explicit.detach().mean()), rel=1e-5)
    assert parts["copg"] / n == pytest.approx(float(explicit.detach().mean()), rel=1e-5)
    assert float(copg_group(logp_gk.detach(), ref_gk, reward_gk, beta=beta)[0]) / 2 == pytest.approx(loss / n, rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-6, rtol=1e-4), name
    assert objective.metrics()["copg/groups"] == 1  # the last micro-batch's
    assert objective.metrics()["copg/reward_mean"] == pytest.approx(0.5)


def test_at_the_start_the_frozen_student_copy_makes_the_loss_the_reward_spread():
    model = tiny_llama(V, layers=2, seed=0)
    reference = copy.deepcopy(model).eval()
    examples = _groups(k=2, n_groups=3)
    objective, scale = _objective(model, reference, examples, beta=0.5, k=2)
    batch = collate(examples, 0)
    n = batch.num_targets
    scale([batch], StepCounts(step=0, targets=n, all_reduce_sum=lambda x: x))
    result = objective.loss(objective.forward(batch), batch, objective.signal(batch))
    # rewards 0 and 0.5 in every pair: (0.5)^2 / (2 * 0.5) = 0.25 per pair
    assert float(result.total.detach()) / n == pytest.approx(0.25, rel=1e-5)
    assert objective.metrics()["copg/log_ratio_mean"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="no reward for the training sequences"):
        bare = Example([3, 4, 5], [False, True, True], uid="x:0:c0:h", role="c0")
        other = Example([3, 4, 6], [False, True, True], uid="x:0:c1:h", role="c1")
        objective.loss(objective.forward(collate([bare, other], 0)), collate([bare, other], 0), torch.zeros(2))


def test_the_config_refuses_other_loss_terms_and_batches_that_split_groups():
    cfg = RunConfig(method="copg", loss={"terms": [{"name": "ce"}]}, train={"micro_batch_size": 6},
                    copg={"group_size": 3, "beta": 0.05, "reference": "teacher"})
    assert cfg.copg.group_size == 3 and cfg.copg.reference == "teacher"
    assert RunConfig(method="copg", loss={"terms": [{"name": "ce"}]}).copg.beta == 0.1
    with pytest.raises(ValidationError, match=r"loss.terms \(\['forward_kl'\]\)"):
        RunConfig(method="copg", loss={"terms": [{"name": "forward_kl"}]})
    with pytest.raises(ValidationError, match="micro_batch_size=4 .* multiple of copg.group_size=3"):
        RunConfig(method="copg", loss={"terms": [{"name": "ce"}]}, train={"micro_batch_size": 4}, copg={"group_size": 3})
    with pytest.raises(ValidationError, match="the `copg` section is set, but method is 'kd'"):
        RunConfig(method="kd", copg={"beta": 0.2})
    with pytest.raises(ValidationError, match="greater than 0"):
        RunConfig(method="copg", loss={"terms": [{"name": "ce"}]}, copg={"beta": 0})


def test_the_shipped_recipe_validates():
    from pathlib import Path

    from stillroom.config.load import load_config

    cfg = load_config(Path(__file__).resolve().parents[3] / "stillroom" / "recipes" / "copg.yaml")
    assert cfg.method == "copg" and cfg.copg.group_size == 4 and cfg.copg.reference == "student"
    assert cfg.train.micro_batch_size % cfg.copg.group_size == 0 and cfg.generate.n_samples == cfg.copg.group_size
