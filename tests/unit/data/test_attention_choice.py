"""The one decision of packed inputs (stillroom.data.batch): varlen for flash-attention models only, with
document offsets over the flattened rows; on CUDA with flash_attn, packed rows give each document its lone logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from stillroom.data.batch import Example, collate
from stillroom.domains.lm.forward import StudentForward
from stillroom.data.batch import model_inputs_for, uses_varlen

V = 61


def _packed_batch():
    """Rows ``[5 | 6]`` (11 tokens) and ``[3 | 4]`` (7 tokens + 4 padding): doc starts 0, 5, 11, 14, 18."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for lens in ([5, 6], [3, 4]):
        ids = torch.randint(2, V, (sum(lens),), generator=g).tolist()
        target = [j > 0 for n in lens for j in range(n)]  # a document's first token is never a target
        rows.append(Example(ids, target, uid=str(lens), doc_lens=lens))
    return collate(rows, pad_id=1)


def _flash(model):
    """Marks ``model`` as flash-attention by hand: the choice reads the config only (no kernel runs here)."""
    model.config._attn_implementation = "flash_attention_2"
    return model


def test_eager_and_sdpa_models_get_the_document_mask():
    batch = _packed_batch()
    for impl in ("eager", "sdpa"):
        model = tiny_llama(V, layers=1)
        model.config._attn_implementation = impl
        assert not uses_varlen(model)
        inputs = model_inputs_for(model, batch)
        assert set(inputs) == {"input_ids", "attention_mask", "position_ids"}
        assert inputs["attention_mask"].shape == (2, 1, 11, 11)


def test_flash_models_get_positions_and_document_offsets_over_the_flattened_rows():
    batch = _packed_batch()
    model = _flash(tiny_llama(V, layers=1))
    assert uses_varlen(model)
    assert uses_varlen(torch.compile(model))  # through wrappers too (not run: nothing compiles)
    inputs = model_inputs_for(model, batch, "cpu")
    assert "attention_mask" not in inputs
    torch.testing.assert_close(inputs["position_ids"], batch.position_ids)
    # row 0: docs at 0 and 5; row 1 (offset 11): docs at 11 and 14, its padding (4 tokens) a document at 18
    assert inputs["cu_seq_lens_q"].tolist() == [0, 5, 11, 14, 18, 22]
    assert inputs["cu_seq_lens_q"].dtype == torch.int32 and inputs["cu_seq_lens_k"] is inputs["cu_seq_lens_q"]
    assert inputs["max_length_q"] == inputs["max_length_k"] == 6


def test_unpacked_batches_keep_the_padding_mask_even_for_flash():
    plain = collate([Example([3, 4, 5], [False, True, True], uid="a"), Example([6, 7], [False, True], uid="b")],
                    pad_id=1)
    inputs = model_inputs_for(_flash(tiny_llama(V, layers=1)), plain)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


class _Seen(Exception):
    """Raised by the spy once it has seen the forward pass's keyword arguments."""


def _inputs_seen(model, call) -> dict:
    """The keyword arguments ``model``'s forward receives when ``call()`` runs (stopped there)."""
    seen = {}

    def spy(_module, _args, kwargs):
        seen.update(kwargs)
        raise _Seen

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with pytest.raises(_Seen):
            call()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("site", ["student", "fused_student", "teacher", "metrics"])
def test_the_student_teacher_and_metrics_pass_varlen_inputs_to_a_flash_model(site):
    from stillroom.eval.metrics import row_nll
    from stillroom.teachers.signal import OnlineTeacher

    batch = _packed_batch()
    model = _flash(tiny_llama(V, layers=1))
    calls = {
        "student": (model, lambda: StudentForward(model, fused=False, hidden_layers=[], vocab=V)(batch)),
        "fused_student": (model.model, lambda: StudentForward(model, fused=True, hidden_layers=[], vocab=V)(batch)),
        "teacher": (model, lambda: OnlineTeacher(model, vocab_size=V).signal(batch)),
        "metrics": (model, lambda: row_nll(model, batch)),
    }
    target, call = calls[site]
    seen = _inputs_seen(target, call)
    assert "attention_mask" not in seen and seen["cu_seq_lens_q"].tolist() == [0, 5, 11, 14, 18, 22]


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, **_):
    """``flash_attn_varlen_func`` in plain torch (causal, grouped heads): ``[total, H, d]`` per document."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for lo, hi in zip(bounds, bounds[1:]):
        qs, ks, vs = (x[lo:hi].transpose(0, 1) for x in (q, k, v))  # [H, n, d]
        out[lo:hi] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=softmax_scale,
                                                    enable_gqa=True).transpose(0, 1)
    return out


def _no_plain_flash(*_args, **_kwargs):
    raise AssertionError("a packed batch must take the varlen path")


def test_a_flash_model_on_the_varlen_inputs_gives_each_document_its_lone_logits(monkeypatch):
    """Hugging Face's own flash-attention path (its varlen branch, every layer), only the kernel replaced by a
    torch one: proves the inputs reach the attention and keep the documents apart; not the kernel itself."""
    import transformers.modeling_flash_attention_utils as fa

    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *a, **k: (
        (_no_plain_flash, _varlen_attention, None, None, None), (lambda **kw: kw, dict)))
    sdpa = tiny_llama(V, layers=2, seed=3)
    flash = _flash(tiny_llama(V, layers=2, seed=3))
    batch = _packed_batch()
    with torch.no_grad():
        packed = flash(**model_inputs_for(flash, batch), use_cache=False).logits
        for row, lens in enumerate(([5, 6], [3, 4])):
            start = 0
            for n in lens:
                alone = sdpa(input_ids=batch.input_ids[row : row + 1, start : start + n], use_cache=False).logits[0]
                torch.testing.assert_close(packed[row, start : start + n], alone, rtol=1e-4, atol=1e-5)
                start += n


@pytest.mark.gpu
def test_flash_varlen_rows_give_each_document_its_lone_logits():
    pytest.importorskip("flash_attn", reason="needs the flash_attn package (pip install flash-attn)")
    model = tiny_llama(V, layers=2, max_positions=64, seed=0).to("cuda", torch.bfloat16)
    model.set_attn_implementation("flash_attention_2")
    batch = _packed_batch()
    with torch.no_grad():
        packed = model(**model_inputs_for(model, batch, "cuda"), use_cache=False).logits.float()
        for row, lens in enumerate(([5, 6], [3, 4])):
            start = 0
            for n in lens:
                ids = batch.input_ids[row, start : start + n].unsqueeze(0).to("cuda")
                alone = model(input_ids=ids, use_cache=False).logits[0].float()
                torch.testing.assert_close(packed[row, start : start + n], alone, rtol=0, atol=3e-2)
                start += n
