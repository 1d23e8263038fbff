import pytest
import torch
from helpers import tiny_llama
from transformers import LlamaForCausalLM

from stillroom.config.schema import LoraConfig
from stillroom.models import apply_lora, decoder_body, merge_lora, output_head, unwrap


def fused_logits(model, ids_bt):
    hidden_bth = decoder_body(model)(input_ids=ids_bt, use_cache=False).last_hidden_state
    return output_head(model)(hidden_bth)


def perturb_adapters(peft_model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


def test_only_adapters_trainable_and_identity_at_start(llama, ids_bt):
    with torch.no_grad():
        base_logits = llama(ids_bt).logits
    model = apply_lora(llama, LoraConfig(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and any("q_proj.base_layer" in n for n in frozen)
    with torch.no_grad():
        torch.testing.assert_close(model(ids_bt).logits, base_logits, rtol=0, atol=0)


def test_merge_gives_same_logits(llama, ids_bt):
    model = apply_lora(llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb_adapters(model)
    with torch.no_grad():
        adapted = model(ids_bt).logits
    merged = merge_lora(model)
    assert type(merged) is LlamaForCausalLM
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids_bt).logits, adapted, rtol=1e-5, atol=1e-5)
    assert merge_lora(merged) is merged  # plain model: unchanged


def test_bad_target_modules_name_the_available_ones(llama):
    with pytest.raises(ValueError, match="available: .*q_proj"):
        apply_lora(llama, LoraConfig(target_modules=["c_attn"]))


def test_head_and_body_reproduce_logits_plain_and_peft(llama, ids_bt):
    with torch.no_grad():
        torch.testing.assert_close(fused_logits(llama, ids_bt), llama(ids_bt).logits, rtol=1e-6, atol=1e-6)
    assert isinstance(output_head(llama), torch.nn.Linear)
    assert decoder_body(llama) is llama.model
    model = apply_lora(llama, LoraConfig(r=4, alpha=8))
    perturb_adapters(model, seed=1)
    assert unwrap(model) is llama  # peft injects adapters in place
    with torch.no_grad():
        torch.testing.assert_close(fused_logits(model, ids_bt), model(ids_bt).logits, rtol=1e-6, atol=1e-6)


def test_head_with_lora_is_the_adapted_module(llama, ids_bt):
    with pytest.raises(ValueError, match="ties it to the input embeddings"):
        apply_lora(llama, LoraConfig(target_modules=["lm_head", "q_proj"]))
    untied = tiny_llama(llama.config.vocab_size, layers=llama.config.num_hidden_layers, seed=0, tie=False)
    model = apply_lora(untied, LoraConfig(r=2, alpha=4, target_modules=["lm_head", "q_proj"]))
    perturb_adapters(model, seed=2)
    head = output_head(model)
    assert not isinstance(head, torch.nn.Linear) and isinstance(head.base_layer, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(fused_logits(model, ids_bt), model(ids_bt).logits, rtol=1e-6, atol=1e-6)
        adapted = model(ids_bt).logits
        torch.testing.assert_close(merge_lora(model)(ids_bt).logits, adapted, rtol=1e-5, atol=1e-5)


def test_ddp_and_dataparallel_wrappers(llama, ids_bt, tmp_path):
    import torch.distributed as dist

    dp = torch.nn.DataParallel(llama)
    assert unwrap(dp) is llama and output_head(dp) is llama.lm_head and decoder_body(dp) is llama.model
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        peft = apply_lora(llama, LoraConfig(r=2, alpha=4))
        ddp = torch.nn.parallel.DistributedDataParallel(peft)
        assert unwrap(ddp) is llama
        with torch.no_grad():
            torch.testing.assert_close(fused_logits(ddp, ids_bt), ddp(input_ids=ids_bt).logits, rtol=1e-6, atol=1e-6)
        assert type(merge_lora(ddp)) is LlamaForCausalLM
    finally:
        dist.destroy_process_group()


def test_softcapped_logits_refuse_the_fused_path(llama):
    llama.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="loss.fused=false"):
        output_head(llama)
