"""Parity of ``data.attention: within_documents`` on real (tiny, random) HF models: a packed batch gives each
document the logits, per-token CE, gradients and KD loss (through the loop's objective) it gets alone."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama
from transformers import Qwen2Config, Qwen2ForCausalLM

from stillroom.config.schema import LossConfig, LossTerm
from stillroom.data import IGNORE, collate
from stillroom.data.batch import Example
from stillroom.data.packing import check_document_attention
from stillroom.domains.lm.forward import StudentForward
from stillroom.losses import LossMix
from stillroom.teachers.signal import OnlineTeacher
from stillroom.train.loop import DistillObjective

V = 61


def _qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


MODELS = {"llama": lambda seed=0: tiny_llama(V, layers=2, max_positions=64, seed=seed), "qwen2": _qwen2}


def _docs(seed: int = 0) -> list[Example]:
    """Five documents with prompt-like untargeted heads (flag 0 is never learned)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate((7, 4, 9, 3, 6)):
        ids = torch.randint(2, V, (n,), generator=g).tolist()
        out.append(Example(ids, [False] + [j > i % 3 for j in range(1, n)], uid=f"d{i}"))
    return out


def _packed(docs: list[Example]) -> list[Example]:
    """Rows ``[d0 d1 d2]`` (20 tokens) and ``[d3 d4]`` (9 tokens, padded): two blocks of documents."""
    rows = []
    for group in (docs[:3], docs[3:]):
        ids = [t for d in group for t in d.input_ids]
        target = [t for d in group for t in [False] + d.target[1:]]
        lens = [len(d.input_ids) for d in group]
        rows.append(Example(ids, target, uid="+".join(d.uid for d in group), doc_lens=lens))
    return rows


def _spans() -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of each document of :func:`_packed`."""
    return [(0, 0, 7), (0, 7, 4), (0, 11, 9), (1, 0, 3), (1, 3, 6)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_packed_logits_ce_and_gradients_equal_each_document_alone(arch, attn):
    model = MODELS[arch]()
    model.set_attn_implementation(attn)
    docs = _docs()
    batch = collate(_packed(docs), pad_id=0)
    logits = model(**batch.model_inputs(), use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.target_ids.flatten(), reduction="none",
                                           ignore_index=IGNORE).view(batch.target_ids.shape)
    ce.sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone_sum = 0.0
    for (row, lo, n), doc in zip(_spans(), docs):
        one = collate([doc], pad_id=0)
        got = model(**one.model_inputs(), use_cache=False).logits[0]
        torch.testing.assert_close(logits[row, lo : lo + n], got, rtol=0, atol=2e-5)
        one_ce = torch.nn.functional.cross_entropy(got, one.target_ids[0], reduction="none", ignore_index=IGNORE)
        torch.testing.assert_close(ce[row, lo : lo + n], one_ce, rtol=0, atol=2e-5)
        alone_sum = alone_sum + one_ce.sum()
    alone_sum.backward()
    for p, g in zip(model.parameters(), packed_grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(logits).all()  # the padding tail attends to itself: no empty softmax row


@pytest.mark.parametrize("fused", [True, False])
def test_kd_loss_through_the_loop_objective_equals_the_sum_over_documents(fused):
    student = tiny_llama(V, layers=2, max_positions=64, seed=0)
    teacher = tiny_llama(V, layers=2, max_positions=64, seed=1)
    mix = LossMix(LossConfig(terms=[LossTerm(name="forward_kl"), LossTerm(name="ce", weight=0.5)], chunk_tokens=5))
    objective = DistillObjective(StudentForward(student, fused=fused, hidden_layers=[], vocab=V), mix,
                                 OnlineTeacher(teacher, vocab_size=V))

    def loss(batch):
        return objective.loss(objective.forward(batch), batch, objective.signal(batch))

    docs = _docs(seed=3)
    packed = loss(collate(_packed(docs), pad_id=0))
    packed.total.backward()
    packed_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    alone = [loss(collate([d], pad_id=0)) for d in docs]
    total = sum(r.total for r in alone)
    total.backward()
    assert packed.count == sum(r.count for r in alone) > 0
    torch.testing.assert_close(packed.total, total, rtol=1e-5, atol=1e-5)
    for name in packed.parts:
        assert packed.parts[name] == pytest.approx(sum(r.parts[name] for r in alone), rel=1e-5, abs=1e-5)
    for p, g in zip(student.parameters(), packed_grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


class _IgnoresMasks(torch.nn.Module):
    """A causal LM that drops the mask and positions it is given (plain causal attention over the row)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)


def test_the_probe_passes_real_models_and_refuses_one_that_ignores_the_boundaries():
    for arch in sorted(MODELS):
        check_document_attention(MODELS[arch](), "student")
    with pytest.raises(ValueError, match="the teacher .*does not keep packed documents apart.*across_documents"):
        check_document_attention(_IgnoresMasks(MODELS["llama"]()), "teacher")


@pytest.mark.gpu
def test_flash_attention_finds_the_documents_from_the_positions_alone():
    pytest.importorskip("flash_attn")
    model = tiny_llama(V, layers=2, max_positions=64, seed=0).to("cuda", torch.bfloat16)
    model.set_attn_implementation("flash_attention_2")
    check_document_attention(model, "student")
    docs = _docs()
    batch = collate(_packed(docs)[:1], pad_id=0).to("cuda")  # one full row: flash varlen needs no padding mask
    logits = model(**batch.model_inputs(varlen=True), use_cache=False).logits.float()
    for (row, lo, n), doc in zip(_spans()[:3], docs):
        got = model(input_ids=torch.tensor([doc.input_ids], device="cuda"), use_cache=False).logits[0].float()
        torch.testing.assert_close(logits[0, lo : lo + n], got, rtol=0, atol=3e-2)
