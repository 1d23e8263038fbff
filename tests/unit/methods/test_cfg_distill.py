"""cfg_distill's pure pieces: the CFG distribution, both KL directions, the diversity reward and REINFORCE's sign;
and its forward on a tiny conditional Llama (on-policy pairs, teacher == student gives zero loss at gamma 1)."""

import math

import pytest
import torch

from stillroom.config.autoregressive import ArTeacherConfig, MarkovModesConfig
from stillroom.domains.autoregressive.markov import build_markov
from stillroom.domains.autoregressive.markov_eval import decode, markov_student
from stillroom.domains.autoregressive.teacher import build_llama
from stillroom.methods.cfg_distill import (
    CfgDistillForward, cfg_distill_loss, cfg_log_probs, diversity_reward, position_kl, sequence_log_prob,
)


def test_cfg_distribution_matches_a_hand_computation():
    cond = torch.tensor([[[1.0, 0.0, -1.0]]])
    null = torch.tensor([[[0.0, 0.5, 0.0]]])
    mixed = [3 * 1.0 - 2 * 0.0, 3 * 0.0 - 2 * 0.5, 3 * -1.0 - 2 * 0.0]  # gamma 3: [3, -1, -3]
    norm = math.log(sum(math.exp(v) for v in mixed))
    expected = torch.tensor([v - norm for v in mixed])
    assert torch.allclose(cfg_log_probs(cond, null, 3.0)[0, 0], expected, atol=1e-6)
    assert torch.allclose(cfg_log_probs(cond, null, 1.0), torch.log_softmax(cond, -1))


def test_kl_directions_against_hand_values():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.5, 0.25, 0.25])
    student_logits = q.log().reshape(1, 1, 3)
    forward = float(position_kl(student_logits, p.log().reshape(1, 1, 3), "forward"))
    reverse = float(position_kl(student_logits, p.log().reshape(1, 1, 3), "reverse"))
    assert forward == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    assert reverse == pytest.approx(float((q * (q / p).log()).sum()), rel=1e-5)
    assert forward != pytest.approx(reverse)
    with pytest.raises(ValueError, match="kl_direction"):
        position_kl(student_logits, p.log().reshape(1, 1, 3), "both")


def test_reward_is_one_minus_cosine_of_bigrams():
    tokens = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 1, 2], [2, 2, 2]])
    reward = diversity_reward(tokens, 3)
    assert torch.allclose(reward, torch.tensor([0.0, 1.0]), atol=1e-6)


def test_reinforce_raises_the_log_prob_of_the_rewarded_pair():
    torch.manual_seed(0)
    logits = torch.zeros(4, 3, 5, requires_grad=True)  # 2 pairs, L = 3, V = 5
    tokens = torch.randint(5, (4, 3))
    reward = torch.tensor([1.0, 0.0])  # pair 0 above the batch mean, pair 1 below
    target = torch.log_softmax(logits.detach(), -1)  # KL zero at the start: only REINFORCE moves the logits
    total, parts = cfg_distill_loss(logits, target, tokens, reward, beta=1.0, direction="forward")
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6)
    total.backward()
    with torch.no_grad():
        stepped = logits - 0.1 * logits.grad
        before, after = sequence_log_prob(logits, tokens), sequence_log_prob(stepped, tokens)
    assert (after[:2] > before[:2]).all() and (after[2:] < before[2:]).all()
    no_reward, _ = cfg_distill_loss(logits, target, tokens, reward, beta=0.0, direction="forward")
    assert float(no_reward.detach()) == pytest.approx(0.0, abs=1e-6)


def tiny_models():
    chains = build_markov(MarkovModesConfig(conditions=2, mode_weights=[0.5, 0.5], vocab=4, length=3))
    teacher = build_llama(ArTeacherConfig(hidden_size=8, layers=1, heads=2, intermediate_size=16), 4, seed=0,
                          extra_ids=chains.extra_ids).eval().requires_grad_(False)
    return chains, teacher


def test_forward_samples_pairs_on_policy_and_matches_itself_at_gamma_one():
    from stillroom.domains.autoregressive.data import SeqBatch

    chains, teacher = tiny_models()
    student = markov_student(teacher)
    forward = CfgDistillForward(student, teacher, chains, gamma=1.0)
    torch.manual_seed(0)
    out = forward(SeqBatch(torch.zeros(3, 3, dtype=torch.long)))
    assert out["tokens"].shape == (6, 3) and out["student_logits"].shape == (6, 3, 4)
    assert out["student_logits"].requires_grad and not out["target_logp"].requires_grad
    kl = position_kl(out["student_logits"], out["target_logp"], "forward")
    assert float(kl.detach().abs().max()) < 1e-5  # the student is the teacher's copy and gamma 1 is the plain teacher
    forward.gamma = 3.0
    torch.manual_seed(0)
    guided = forward(SeqBatch(torch.zeros(3, 3, dtype=torch.long)))
    assert torch.equal(guided["tokens"], out["tokens"])  # same RNG state, same student: same on-policy samples
    assert float(position_kl(guided["student_logits"], guided["target_logp"], "forward").detach().sum()) > 1e-4


def test_decode_with_a_generator_is_reproducible():
    chains, teacher = tiny_models()
    cond = torch.tensor([0, 1, 2])
    a = decode(teacher, cond, 4, 3, chains.null_index, 2.0, torch.Generator().manual_seed(1))
    b = decode(teacher, cond, 4, 3, chains.null_index, 2.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 3) and int(a.max()) < 4


def test_config_refuses_the_codebook_dataset():
    from stillroom.config.schema import RunConfig

    with pytest.raises(ValueError, match="markov_modes"):
        RunConfig(name="x", domain="autoregressive", method="cfg_distill")
