"""The KV cache reaches the model under the keyword its transformers version reads, and is really used.

Which keyword carries the cache (read from the wheels' ``models/llama/modeling_llama.py``):

* transformers 5.0-5.23 (the oldest allowed by ``pyproject.toml``): ``forward(..., past_key_values=None,
  ..., **kwargs)``; any other keyword, ``cache=`` included, goes into ``**kwargs`` down to the attention
  functions, which ignore it. The model then starts a fresh cache: no error, wrong logits.
* transformers 5.24 and later: ``forward(..., cache=None, ...)``; ``past_key_values`` is still mapped to
  ``cache`` by ``@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")``, with a FutureWarning.

:class:`OldLlama` puts the 5.0 signature in front of the installed Llama, so these tests check the
oldest allowed version's behaviour whatever version is installed.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from generate_models import drop_layers, make_llama
from packaging.version import Version

from stillroom.generate.sampling import cache_keyword, sample_continuations
from stillroom.generate.speculative import _Decoder, autoregressive_generate, speculative_generate


class OldLlama(torch.nn.Module):
    """A Llama behind the exact forward signature of transformers 5.0's ``LlamaForCausalLM``.

    Like 5.0 it reads the cache only from ``past_key_values``, lets any other keyword fall into
    ``**kwargs`` unused (recorded in ``swallowed``) and returns the cache as ``past_key_values``
    (5.0's ``CausalLMOutputWithPast`` has no ``cache`` field).
    """

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.inner_keyword = cache_keyword(inner)  # the installed version's own name
        self.swallowed: list[str] = []

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None, logits_to_keep=0, **kwargs):
        self.swallowed += sorted(kwargs)
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, logits_to_keep=logits_to_keep, **{self.inner_keyword: past_key_values})
        cache = getattr(out, "cache", None) if self.inner_keyword == "cache" else out.past_key_values
        return SimpleNamespace(logits=out.logits, past_key_values=cache)


class ForgetfulLM(OldLlama):
    """A broken custom model: it names ``past_key_values`` but never passes it on (always a fresh cache)."""

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0, **kwargs):
        return super().forward(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep,
                               position_ids=kwargs.get("position_ids"), attention_mask=None)


@torch.no_grad()
def greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    """The reference: every step a full forward over the whole sequence, no cache anywhere."""
    seq = list(prompt)
    for _ in range(n):
        ids = torch.tensor([seq], device=next(model.parameters()).device)
        seq.append(int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def target():
    return make_llama(48, layers=3, seed=11)


def test_installed_llama_takes_the_keyword_of_its_version(target):
    import transformers

    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    assert cache_keyword(target) == expected
    assert cache_keyword(OldLlama(target)) == "past_key_values"


def test_sampling_on_the_oldest_allowed_signature_uses_the_cache(target):
    old = OldLlama(target)
    prompts = [[3, 7, 9, 2], [5, 1]]  # different lengths: left padding, positions from the mask
    out = sample_continuations(old, None, prompts, max_new_tokens=8, greedy=True, eos_token_id=None, pad_token_id=0)
    assert old.swallowed == [], f"keywords the model ignored: {old.swallowed}"
    assert out == [greedy_without_cache(target, p, 8) for p in prompts]
    assert out == sample_continuations(target, None, prompts, max_new_tokens=8, greedy=True, eos_token_id=None,
                                       pad_token_id=0)


def test_speculative_decoding_on_the_oldest_allowed_signature_uses_the_cache(target):
    old_target, old_draft = OldLlama(target), OldLlama(drop_layers(target, 1))
    prompt = [4, 8, 15, 16, 23]
    result = speculative_generate(old_target, old_draft, prompt, gamma=3, max_new_tokens=12)
    assert old_target.swallowed == [] and old_draft.swallowed == []
    assert result.tokens == greedy_without_cache(target, prompt, 12)
    assert result.stats.target_calls < 12  # proposals were accepted: the cache was rolled back and reused
    assert autoregressive_generate(old_target, prompt, max_new_tokens=12).tokens == result.tokens


@pytest.mark.parametrize("wrap", [False, True], ids=["installed", "oldest-signature"])
def test_cached_forward_matches_the_full_forward_and_grows_the_cache(target, wrap):
    model = OldLlama(target) if wrap else target
    seq = [2, 9, 4, 4, 7, 1, 8, 3, 6]
    decoder = _Decoder(model)
    with torch.inference_mode():
        decoder.logits(seq[:5], keep=1)
        first = decoder.cache
        assert first.get_seq_length() == 5
        cached = decoder.logits(seq, keep=4)  # feeds only seq[5:], attends to the cached 5 positions
        full = target(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -4:]
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert decoder.cache is first and first.get_seq_length() == len(seq)


def test_a_model_that_ignores_its_cache_is_refused(target):
    bad = ForgetfulLM(target)
    with pytest.raises(RuntimeError, match="did not use the cache passed as `past_key_values=`"):
        sample_continuations(bad, None, [[1, 2, 3]], max_new_tokens=3, greedy=True, eos_token_id=None)
    with pytest.raises(RuntimeError, match="a KV cache of 1 positions where 5 were expected"):
        autoregressive_generate(bad, [1, 2, 3, 4], max_new_tokens=3)


def test_a_forward_without_a_named_cache_argument_is_refused(target):
    class KwargsOnly(torch.nn.Module):
        def forward(self, **kwargs):
            return target(**kwargs)

    with pytest.raises(TypeError, match="neither `cache`.*nor `past_key_values`"):
        cache_keyword(KwargsOnly())


def test_peft_wrapper_is_looked_through(target):
    peft = pytest.importorskip("peft")  # optional third-party package
    import copy

    lora = peft.get_peft_model(copy.deepcopy(target), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert cache_keyword(lora) == cache_keyword(target)
    prompt = [[6, 2, 9]]
    out = sample_continuations(lora, None, prompt, max_new_tokens=5, greedy=True, eos_token_id=None)
    assert out == [greedy_without_cache(target, prompt[0], 5)]  # fresh LoRA (B = 0) computes the base function


@pytest.mark.gpu
def test_cuda_cached_decoding_on_both_signatures_matches_full_forwards(target):
    import copy

    gpu = copy.deepcopy(target).to("cuda")
    prompt = [4, 8, 15, 16, 23]
    want = greedy_without_cache(gpu, prompt, 10)  # on the GPU too: no CPU/GPU rounding in the comparison
    for model in (gpu, OldLlama(gpu)):
        assert speculative_generate(model, drop_layers(gpu, 1), prompt, gamma=3, max_new_tokens=10).tokens == want
        assert sample_continuations(model, None, [prompt], max_new_tokens=10, greedy=True, eos_token_id=None) == [want]
