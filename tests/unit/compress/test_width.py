"""Width pruning: a sliced GQA Llama reloads with plain transformers, keeps logits when nothing is pruned,
matches a hand-made slice, and refuses impossible targets naming the key."""

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from stillroom.compress.depth import PruneTargetError
from stillroom.compress.width import WidthPlan, apply_width, check_width, importance, plan_width, prune_width
from stillroom.config.prune import WidthPrune


def _llama6(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """6 heads over 2 KV groups (3 per group), hidden 24, MLP 40, 2 layers."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def ids_bt(tok):
    torch.manual_seed(1)
    return torch.randint(0, len(tok), (2, 12))


@pytest.fixture
def calib(tok):
    torch.manual_seed(3)
    return [torch.randint(0, len(tok), (2, 10)) for _ in range(2)]


def test_nothing_pruned_gives_identical_logits(tok, calib, ids_bt):
    model = _llama6(len(tok))
    pruned, plan = prune_width(model, WidthPrune(num_attention_heads=6), calib)
    assert plan.heads[0] == list(range(6)) and len(plan.hidden) == 24
    torch.testing.assert_close(pruned(ids_bt).logits, model(ids_bt).logits, rtol=0, atol=0)


def test_gqa_groups_stay_whole_and_reload_with_transformers(tok, calib, ids_bt, tmp_path):
    model = _llama6(len(tok))
    cfg = WidthPrune(num_attention_heads=2, num_key_value_heads=1, intermediate_size=16, hidden_size=16)
    pruned, plan = prune_width(model, cfg, calib)
    for heads, groups in zip(plan.heads, plan.kv_heads):
        assert len(groups) == 1 and all(h // 3 == groups[0] for h in heads) and len(heads) == 2
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    c = again.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size, c.head_dim) == (2, 1, 16, 16, 4)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied
    torch.testing.assert_close(again(ids_bt).logits, pruned(ids_bt).logits)


def test_head_pruning_matches_a_hand_made_slice(tok, ids_bt):
    """Keep heads 1, 2 of KV group 0: the same model as one built by hand from the big one's rows
    (q rows of heads 1 and 2, k/v rows of group 0, o_proj columns of heads 1 and 2)."""
    model = _llama6(len(tok))
    keep_heads, hd = [1, 2], 4
    plan = WidthPlan(heads=[keep_heads] * 2, kv_heads=[[0]] * 2, channels=[list(range(40))] * 2, hidden=list(range(24)))
    pruned = apply_width(model, plan)
    torch.manual_seed(9)
    cfg = LlamaConfig(**{**model.config.to_dict(), "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4})
    hand = LlamaForCausalLM(cfg).eval()
    sd = model.state_dict()
    q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep_heads])
    with torch.no_grad():
        for name, p in hand.named_parameters():
            src = sd[name]
            if name.endswith("q_proj.weight"):
                src = src[q_rows]
            elif name.endswith(("k_proj.weight", "v_proj.weight")):
                src = src[:hd]
            elif name.endswith("o_proj.weight"):
                src = src[:, q_rows]
            p.copy_(src)
    torch.testing.assert_close(pruned(ids_bt).logits, hand(ids_bt).logits, rtol=0, atol=0)


def test_importance_ranks_a_silenced_head_and_channel_last(tok, calib):
    model = _llama6(len(tok))
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[4:8] = 0.0  # KV group 1's value: its heads output zeros
        model.model.layers[1].mlp.up_proj.weight[7] = 0.0
    scores = importance(model, calib)
    assert scores["heads"][0][3:].abs().max() == 0 and scores["heads"][0][:3].min() > 0
    assert int(scores["channels"][1].argmin()) == 7
    plan = plan_width(model, WidthPrune(num_attention_heads=3, num_key_value_heads=1, intermediate_size=39), scores)
    assert plan.kv_heads[0] == [0] and 7 not in plan.channels[1]


@pytest.mark.parametrize("cfg, key", [
    (WidthPrune(num_attention_heads=8), "num_attention_heads=8"),
    (WidthPrune(hidden_size=25), "hidden_size=25"),
    (WidthPrune(num_attention_heads=4, num_key_value_heads=1), "num_attention_heads=4"),  # 4 per group > 3
    (WidthPrune(num_attention_heads=5), "num_attention_heads=5"),
])
def test_impossible_targets_name_the_key(tok, cfg, key):
    with pytest.raises(PruneTargetError, match=key):
        check_width(_llama6(len(tok)), cfg)


def test_other_architectures_are_refused(tok):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(PruneTargetError, match="gpt2"):
        check_width(gpt2, WidthPrune(intermediate_size=8))


def test_qwen2_attention_bias_is_sliced(tok, calib, ids_bt, tmp_path):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=6, num_key_value_heads=2)).eval()
    same, _ = prune_width(model, WidthPrune(intermediate_size=32), calib)
    torch.testing.assert_close(same(ids_bt).logits, model(ids_bt).logits, rtol=0, atol=0)
    pruned, _ = prune_width(model, WidthPrune(num_attention_heads=3, hidden_size=12), calib)
    assert pruned.model.layers[0].self_attn.q_proj.bias.shape == (12,)
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(ids_bt).logits, pruned(ids_bt).logits)


def test_tiny_llama_helper_prunes(tok, calib):
    model = tiny_llama(len(tok), layers=2)
    pruned, _ = prune_width(model, WidthPrune(intermediate_size=32, hidden_size=16), calib)
    assert pruned.config.hidden_size == 16 and pruned.model.layers[1].mlp.down_proj.weight.shape == (16, 32)
