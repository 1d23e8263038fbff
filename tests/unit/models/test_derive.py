import pytest
import torch
from helpers import tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from stillroom.config.schema import LayerSelection
from stillroom.models import LayerSelectionError, angular_distances, derive_student


def hand_built(teacher: LlamaForCausalLM, keep: list[int]) -> LlamaForCausalLM:
    """The reference: a fresh model with len(keep) layers, loaded with the kept teacher weights renamed."""
    cfg = LlamaConfig.from_dict(teacher.config.to_dict())
    cfg.num_hidden_layers = len(keep)
    ref = type(teacher)(cfg).eval()
    state = {}
    for name, value in teacher.state_dict().items():
        if name.startswith("model.layers."):
            idx = int(name.split(".")[2])
            if idx not in keep:
                continue
            name = name.replace(f"model.layers.{idx}.", f"model.layers.{keep.index(idx)}.", 1)
        state[name] = value
    ref.load_state_dict(state, strict=True)
    return ref


def plant_identity(model, layer: int) -> None:
    """Make a decoder layer add nothing to the residual stream."""
    block = model.model.layers[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def test_explicit_matches_hand_built_model(llama, ids_bt):
    student, kept = derive_student(llama, LayerSelection(strategy="explicit", layers=[0, 2, 3]))
    assert kept == [0, 2, 3]
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert [l.self_attn.layer_idx for l in student.model.layers] == [0, 1, 2]
    ref = hand_built(llama, kept)
    with torch.no_grad():
        torch.testing.assert_close(student(ids_bt).logits, ref(ids_bt).logits, rtol=0, atol=0)


def test_every_n(llama):
    student, kept = derive_student(llama, LayerSelection(strategy="every_n", every_n=2))
    assert kept == [0, 2] and student.config.num_hidden_layers == 2
    _, kept3 = derive_student(tiny_llama(50, layers=7), LayerSelection(strategy="every_n", every_n=3))
    assert kept3 == [0, 3, 6]


def test_teacher_untouched_and_no_shared_storage(llama, ids_bt):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with torch.no_grad():
        logits_before = llama(ids_bt).logits
    student, _ = derive_student(llama, LayerSelection(strategy="explicit", layers=[0, 3]))
    assert llama.config.num_hidden_layers == 4 and len(llama.model.layers) == 4
    assert [l.self_attn.layer_idx for l in llama.model.layers] == [0, 1, 2, 3]
    for k, v in llama.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        torch.testing.assert_close(llama(ids_bt).logits, logits_before, rtol=0, atol=0)
    teacher_ptrs = {p.data_ptr() for p in llama.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in student.parameters()}
    # Tying survives inside the student.
    assert student.lm_head.weight is student.model.embed_tokens.weight
    with torch.no_grad():
        student.model.embed_tokens.weight.add_(1.0)
    assert torch.equal(llama.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_kv_cache_generation_after_deriving(llama, ids_bt):
    student, kept = derive_student(llama, LayerSelection(strategy="explicit", layers=[1, 3]))
    ref = hand_built(llama, kept)
    prompt = ids_bt[:1, :5]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=1, eos_token_id=None)
    cached = student.generate(prompt, use_cache=True, **kw)
    uncached = student.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref.generate(prompt, use_cache=True, **kw))


def test_bf16_teacher_gives_fp32_student(llama):
    teacher = llama.to(torch.bfloat16)
    student, _ = derive_student(teacher, LayerSelection(strategy="every_n", every_n=2))
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())


def test_layer_types_reindexed_and_cache_works():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_sliding_window=True, sliding_window=4,
        max_window_layers=2,
    )
    teacher = Qwen2ForCausalLM(cfg).eval()
    types = list(teacher.config.layer_types)
    assert len(set(types)) == 2  # mixed full / sliding attention, so reindexing matters
    student, kept = derive_student(teacher, LayerSelection(strategy="explicit", layers=[0, 3]))
    assert student.config.layer_types == [types[0], types[3]]
    prompt = torch.randint(0, 64, (1, 6))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(student.generate(prompt, use_cache=True, **kw), student.generate(prompt, use_cache=False, **kw))


def test_angular_drops_planted_identity_block(tok):
    teacher = tiny_llama(len(tok), layers=6, seed=3)
    plant_identity(teacher, 2)
    plant_identity(teacher, 3)
    calib = [torch.randint(0, len(tok), (2, 16)) for _ in range(2)]
    dist = angular_distances(teacher, calib, 2)
    assert len(dist) == 5 and all(0.0 <= d <= 1.0 for d in dist)
    assert dist[2] == pytest.approx(0.0, abs=1e-6)
    assert min(d for i, d in enumerate(dist) if i != 2) > 1e-3
    student, kept = derive_student(teacher, LayerSelection(strategy="angular", num_layers=4), calib)
    assert kept == [0, 1, 4, 5]
    with torch.no_grad():  # dropping do-nothing layers changes nothing
        x = calib[0]
        torch.testing.assert_close(student(x).logits, teacher(x).logits, rtol=1e-5, atol=1e-5)


def test_angular_never_drops_first_or_last_layer(tok):
    teacher = tiny_llama(len(tok), layers=5, seed=4)
    plant_identity(teacher, 0)
    plant_identity(teacher, 4)
    calib = [torch.randint(0, len(tok), (2, 10))]
    dist = angular_distances(teacher, calib, 1)
    assert dist[0] == pytest.approx(0.0, abs=1e-6) and dist[4] == pytest.approx(0.0, abs=1e-6)
    _, kept = derive_student(teacher, LayerSelection(strategy="angular", num_layers=4), calib)
    assert kept[0] == 0 and kept[-1] == 4 and len(kept) == 4


def test_angular_distance_by_hand(llama, ids_bt):
    """d(l, n) from output_hidden_states (pre-norm entries) against angular_distances."""
    with torch.no_grad():
        hs = llama(ids_bt, output_hidden_states=True).hidden_states  # last entry is post-norm
    h0, h2 = hs[0].reshape(-1, hs[0].shape[-1]).double(), hs[2].reshape(-1, hs[2].shape[-1]).double()
    cos = torch.nn.functional.cosine_similarity(h0, h2, dim=-1)
    expected = (torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean().item()
    assert angular_distances(llama, [ids_bt], 2)[0] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "layers, match",
    [([0, 4], "out-of-range"), ([-1, 2], "out-of-range"), ([0, 2, 2], "repeats"), ([2, 0], "ascending"), ([], "empty")],
)
def test_explicit_validation(llama, layers, match):
    with pytest.raises(LayerSelectionError, match=match):
        derive_student(llama, LayerSelection(strategy="explicit", layers=layers))


def test_angular_validation(llama, ids_bt):
    with pytest.raises(LayerSelectionError, match="calibration"):
        derive_student(llama, LayerSelection(strategy="angular", num_layers=2))
    with pytest.raises(LayerSelectionError, match="exceeds"):
        derive_student(llama, LayerSelection(strategy="angular", num_layers=5), [ids_bt])
    with pytest.raises(LayerSelectionError, match=">= 2"):
        derive_student(llama, LayerSelection(strategy="angular", num_layers=1), [ids_bt])
    student, kept = derive_student(llama, LayerSelection(strategy="angular", num_layers=4), [ids_bt])
    assert kept == [0, 1, 2, 3]
