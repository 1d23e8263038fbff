"""Upcycling a dense Llama into a Mixtral MoE: parity at init, the saved folder, routing terms, capacity."""

import math

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoModelForCausalLM, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from stillroom.models.moe import (
    MoeShape, RouterTap, UpcycleError, apply_capacity, load_balancing_loss, parameter_counts, upcycle_to_moe,
)


def test_upcycled_logits_equal_the_dense_model_and_save_as_plain_mixtral(tmp_path):
    dense = tiny_llama(64, layers=2, hidden=32, seed=0)
    moe = upcycle_to_moe(dense, MoeShape(experts=4, top_k=2)).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = dense(ids).logits, moe(ids).logits
    assert type(moe).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    moe.save_pretrained(tmp_path / "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, got)
    # the dense model is untouched and shares no storage
    assert all(p.data_ptr() not in {q.data_ptr() for q in moe.parameters()} for p in dense.parameters())


def test_noise_breaks_the_parity_and_the_experts_differ():
    dense = tiny_llama(64, layers=1, hidden=32, seed=0)
    moe = upcycle_to_moe(dense, MoeShape(experts=4, top_k=2, noise_std=0.05))
    experts = moe.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(dense(ids).logits, moe.eval()(ids).logits, atol=1e-4)


def test_parameter_counts_active_is_top_k_of_the_experts():
    dense = tiny_llama(64, layers=2, hidden=32, seed=0)  # MLP 3 * 32 * 64 per layer
    moe = upcycle_to_moe(dense, MoeShape(experts=4, top_k=2))
    mlp, router = 3 * 32 * 64, 4 * 32
    d, m = parameter_counts(dense), parameter_counts(moe)
    assert d["active"] == d["total"]
    assert m["total"] == d["total"] + 2 * (3 * mlp + router)
    assert m["active"] == d["total"] + 2 * (mlp + router)


def test_llava_with_a_llama_text_model_upcycles_its_language_model():
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    vision = {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 8, "patch_size": 4}
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text.to_dict(),
                                                      image_token_id=63)).eval()
    moe = upcycle_to_moe(llava, MoeShape()).eval()
    assert type(moe).__name__ == "LlavaForConditionalGeneration"
    assert moe.config.text_config.model_type == "mixtral"
    ids = torch.randint(0, 60, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, llava(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_refuses_a_model_that_is_not_llama_with_a_fix():
    dense = tiny_llama(64, layers=1, hidden=32)
    moe = upcycle_to_moe(dense, MoeShape())
    with pytest.raises(UpcycleError, match="Llama-family"):
        upcycle_to_moe(moe, MoeShape())
    dense.config.attention_bias = True
    with pytest.raises(UpcycleError, match="attention_bias"):
        upcycle_to_moe(dense, MoeShape())


def test_load_balancing_loss_by_hand():
    # two tokens, two experts, top-1: token 0 -> expert 0 (p=0.8), token 1 -> expert 0 (p=0.6)
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.6, 0.4]]))
    f = torch.tensor([1.0, 0.0])
    p = torch.tensor([0.7, 0.3])
    assert math.isclose(float(load_balancing_loss([logits], 1)), float(2 * (f * p).sum()), rel_tol=1e-6)
    uniform = torch.zeros(8, 4)  # equal probabilities: the loss is 1 whatever the tie-breaking
    assert math.isclose(float(load_balancing_loss([uniform], 2)), 1.0, rel_tol=1e-6)


def test_capacity_drops_assignments_past_capacity_first_choices_first():
    # 4 tokens, 2 experts, top-1, capacity factor 1: C = ceil(1 * 1 * 4 / 2) = 2 per expert
    index = torch.tensor([[0], [0], [0], [1]])
    scores = torch.ones(4, 1)
    kept = apply_capacity(scores, index, experts=2, capacity_factor=1.0)
    assert kept[:, 0].tolist() == [1.0, 1.0, 0.0, 1.0]
    # top-2: a token whose second choice is dropped keeps its first with weight 1
    index2 = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    w = torch.tensor([[0.6, 0.4]] * 4)
    kept2 = apply_capacity(w, index2, experts=2, capacity_factor=0.5)  # C = ceil(0.5*2*4/2) = 2
    # first choices: expert 0 takes tokens 0 and 1 (full: token 2's is dropped), expert 1 token 3;
    # second choices in token order: expert 1 takes token 0's (its 2nd place), then is full
    torch.testing.assert_close(kept2, torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))


def test_router_tap_records_in_training_only_and_leaves_no_hooks():
    moe = upcycle_to_moe(tiny_llama(64, layers=2, hidden=32), MoeShape())
    ids = torch.randint(0, 64, (2, 6))
    tap = RouterTap(moe, capacity_factor=1.5)
    with tap:
        moe.train()(ids)
    assert len(tap.logits) == 2 and tap.logits[0].shape == (12, 4)
    with tap:
        moe.eval()(ids)
    assert tap.logits == []
    assert all(not r._forward_hooks for r in tap.routers)
    with pytest.raises(UpcycleError, match="no routed experts"):
        RouterTap(tiny_llama(64, layers=1, hidden=32), None)
