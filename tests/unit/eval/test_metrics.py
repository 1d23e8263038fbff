import copy
import math

import pytest
import torch
import torch.nn.functional as F

from stillroom.data.batch import collate
from stillroom.eval import (
    count_params,
    evaluate_lm,
    forward_tokens_per_s,
    teacher_logits_from_model,
    trainable_params,
)


def _manual(student, teacher, batches, vocab_size=None):
    """Reference computation in fp32 from raw ids with an explicit causal shift."""
    ce = kl = agree = 0.0
    n = n_bytes = 0
    with torch.no_grad():
        for b in batches:
            s = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
            t = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
            if vocab_size is not None:
                s, t = s[..., :vocab_size], t[..., :vocab_size]
            # Shift here, independently of collate: logits[:, :-1] predict input_ids[:, 1:].
            s_prev, t_prev = s[:, :-1], t[:, :-1]
            nxt = b.input_ids[:, 1:].clone()
            keep = b.target_ids[:, :-1] != -100
            nxt[~keep] = -100
            ce += float(F.cross_entropy(s_prev.reshape(-1, s.shape[-1]), nxt.reshape(-1), ignore_index=-100, reduction="sum"))
            s_rows, t_rows = s_prev[keep], t_prev[keep]
            kl += float(
                F.kl_div(F.log_softmax(s_rows, -1), F.log_softmax(t_rows, -1), log_target=True, reduction="sum")
            )
            agree += float((s_rows.argmax(-1) == t_rows.argmax(-1)).sum())
            n += int(keep.sum())
            n_bytes += int(b.n_bytes.sum())
    return ce / n, kl / n, agree / n, n, n_bytes


def test_matches_manual_fp32(student, teacher, batches):
    out = evaluate_lm(student, batches, teacher_logits_from_model(teacher), precision="fp32")
    ce, kl, agree, n, n_bytes = _manual(student, teacher, batches)
    assert out["tokens"] == n == sum(b.num_targets for b in batches)
    assert out["heldout_ce"] == pytest.approx(ce, abs=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert out["kl_teacher_student"] == pytest.approx(kl, abs=1e-5)
    assert out["kl_teacher_student"] > 0
    assert out["top1_agreement"] == pytest.approx(agree)
    # bits per byte = total nats / ln 2 / total bytes
    assert out["bits_per_byte"] == pytest.approx(ce * n / math.log(2) / n_bytes, rel=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_against_itself(student, batches, precision):
    out = evaluate_lm(student, batches, teacher_logits_from_model(student), precision=precision)
    assert out["kl_teacher_student"] == 0.0
    assert out["top1_agreement"] == 1.0


def test_bf16_close_to_fp32(student, teacher, batches):
    fn = teacher_logits_from_model(teacher)
    a = evaluate_lm(student, batches, fn, precision="fp32")
    b = evaluate_lm(student, batches, fn, precision="bf16")
    assert b["heldout_ce"] == pytest.approx(a["heldout_ce"], abs=0.05)
    assert b["kl_teacher_student"] == pytest.approx(a["kl_teacher_student"], abs=0.02)


def test_without_teacher(student, batches):
    out = evaluate_lm(student, batches, precision="fp32")
    assert out["kl_teacher_student"] is None and out["top1_agreement"] is None
    assert out["heldout_ce"] > 0


def test_masked_positions_are_ignored(student, teacher, batches):
    base_fn = teacher_logits_from_model(teacher)
    ref = evaluate_lm(student, batches, base_fn, precision="fp32")

    def garbage_outside_mask(b):
        t = base_fn(b).clone()
        t[~b.loss_mask] = torch.randn_like(t[~b.loss_mask]) * 100
        return t

    out = evaluate_lm(student, batches, garbage_outside_mask, precision="fp32")
    for key in ("heldout_ce", "kl_teacher_student", "top1_agreement", "tokens"):
        assert out[key] == pytest.approx(ref[key], abs=1e-6)


def test_padding_invariance(student, teacher, examples_factory):
    ex = examples_factory(4, seed=3)
    fn = teacher_logits_from_model(teacher)
    together = evaluate_lm(student, [collate(ex, pad_id=0)], fn, precision="fp32")
    apart = evaluate_lm(student, [collate([e], pad_id=0) for e in ex], fn, precision="fp32")
    for key in ("heldout_ce", "kl_teacher_student", "bits_per_byte", "tokens"):
        assert together[key] == pytest.approx(apart[key], abs=1e-5)


def test_only_target_tokens_count(student, examples_factory):
    ex = examples_factory(2, seed=4)
    full = evaluate_lm(student, [collate(ex, pad_id=0)], precision="fp32")
    # Un-flag the last token of each example: one fewer target per row.
    for e in ex:
        e.target[-1] = False
    fewer = evaluate_lm(student, [collate(ex, pad_id=0)], precision="fp32")
    assert fewer["tokens"] == full["tokens"] - 2
    assert fewer["heldout_ce"] != pytest.approx(full["heldout_ce"], abs=1e-9)


def test_vocab_slicing(llama_factory, examples_factory):
    padded_student = llama_factory(5, vocab_size=72)  # 8 padding rows
    teacher = llama_factory(6, vocab_size=64)
    batches = [collate(examples_factory(3, seed=5), pad_id=0)]
    tfn = teacher_logits_from_model(teacher)
    with pytest.raises(ValueError, match="vocab_size"):
        evaluate_lm(padded_student, batches, tfn, precision="fp32")
    out = evaluate_lm(padded_student, batches, tfn, precision="fp32", vocab_size=64)
    ce, kl, agree, _, _ = _manual(padded_student, teacher, batches, vocab_size=64)
    assert out["heldout_ce"] == pytest.approx(ce, abs=1e-5)
    assert out["kl_teacher_student"] == pytest.approx(kl, abs=1e-5)
    assert out["top1_agreement"] == pytest.approx(agree)

    # A teacher with huge padding logits equals itself once sliced.
    def padded_self(b):
        t = padded_student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[..., :64]
        return torch.cat([t, torch.full((*t.shape[:2], 8), 50.0)], dim=-1)

    same = evaluate_lm(padded_student, batches, padded_self, precision="fp32", vocab_size=64)
    assert same["kl_teacher_student"] == 0.0 and same["top1_agreement"] == 1.0
    with pytest.raises(ValueError, match="must not exceed"):
        evaluate_lm(padded_student, batches, precision="fp32", vocab_size=100)


def test_errors(student, examples_factory):
    ex = examples_factory(1)
    with pytest.raises(ValueError, match="precision"):
        evaluate_lm(student, [collate(ex, pad_id=0)], precision="fp16")
    with pytest.raises(ValueError, match="no batches"):
        evaluate_lm(student, [], precision="fp32")
    ex[0].target = [False] * len(ex[0].target)
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate_lm(student, [collate(ex, pad_id=0)], precision="fp32")
    bad = collate(examples_factory(1), pad_id=0)
    bad.target_ids[0, -2] = 64
    with pytest.raises(ValueError, match="outside the 64 logit columns"):
        evaluate_lm(student, [bad], precision="fp32")


def test_restores_training_mode(student, teacher, batches):
    student.train()
    teacher.train()
    evaluate_lm(student, batches, teacher_logits_from_model(teacher))
    assert student.training and teacher.training
    student.eval()
    evaluate_lm(student, batches)
    assert not student.training


def test_count_params_tied_and_untied(llama_factory):
    untied = llama_factory(0)
    tied = llama_factory(0, tie=True)
    emb = 64 * 32
    assert count_params(untied) == sum(p.numel() for p in untied.parameters())
    assert count_params(untied) - count_params(tied) == emb
    assert trainable_params(untied) == count_params(untied)


def test_count_params_peft(llama_factory):
    peft = pytest.importorskip("peft")
    base = llama_factory(0)
    n_base = count_params(base)
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    )
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora > 0
    assert count_params(model) == n_base
    # trainable: adapters + the trainable copy of lm_head
    assert trainable_params(model) == lora + 64 * 32
    assert count_params(model.merge_and_unload()) == n_base


def test_forward_tokens_per_s(student):
    student.train()
    rate = forward_tokens_per_s(student, seq_len=16, batch_size=2, total_tokens=64, precision="bf16")
    assert rate > 0 and math.isfinite(rate)
    assert student.training
    assert forward_tokens_per_s(student, 16, 2, 64, "fp32") > 0
    with pytest.raises(ValueError, match="max_position_embeddings"):
        forward_tokens_per_s(student, seq_len=1000, batch_size=1, total_tokens=10)


def _kl_reference_f64(logits, teacher):
    """Independent KL(teacher || model) sum in float64: entries with teacher probability 0 count 0."""
    s = torch.log_softmax(logits.double(), -1)
    t = torch.log_softmax(teacher.double(), -1)
    p = t.exp()
    return float(torch.where(p > 0, p * (t - s), torch.zeros_like(p)).sum())


def test_eval_kl_is_the_loss_library_kl_and_matches_a_float64_reference():
    from stillroom.eval.target_rows import ROW_CHUNK as _ROW_CHUNK, token_sums_many

    def _token_sums(logits, targets, teacher):
        return token_sums_many([logits], [targets], teacher)[0]

    g = torch.Generator().manual_seed(0)
    n, v = _ROW_CHUNK + 37, 50  # two chunks
    logits = torch.randn(n, v, generator=g) * 3
    teacher = torch.randn(n, v, generator=g) * 3
    teacher[:, -3:] = float("-inf")  # padded/banned entries: p = 0 ...
    logits[:, -2:] = float("-inf")  # ... the model may give them -inf too
    teacher[::7, :5] = float("-inf")
    targets = torch.randint(0, v - 3, (n,), generator=g)
    _, kl, _ = _token_sums(logits, targets, teacher)
    assert kl == pytest.approx(_kl_reference_f64(logits, teacher), rel=1e-5)
    # The same as the training loss's forward KL on these rows (sum over rows).
    from stillroom.losses.terms import forward_kl_rows as forward_kl

    t_logp, s_logp = torch.log_softmax(teacher, -1), torch.log_softmax(logits, -1)
    assert kl == pytest.approx(float(forward_kl(t_logp, s_logp).sum()), rel=1e-6)
    # A teacher probability that underflows to 0 in fp32 counts 0 even where the model has -inf
    # (p * (log p - log q) would be 0 * inf = NaN): finite, as the reference without that entry.
    t2 = torch.zeros(2, 4)
    t2[:, 0] = 200.0  # exp(-200) underflows: the other entries have p == 0 in fp32
    s2 = torch.zeros(2, 4)
    s2[:, 3] = float("-inf")
    _, kl2, _ = _token_sums(s2, torch.zeros(2, dtype=torch.long), t2)
    assert math.isfinite(kl2) and kl2 == pytest.approx(2 * math.log(3.0), rel=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_target_rows_from_hidden_states_equal_the_whole_logits(llama_factory, examples_factory, monkeypatch,
                                                                precision):
    """Held-out metrics from the target rows' hidden states through the head, a chunk of rows at a time (no
    [B, T, V] logits), equal those from the models' whole logits (an opaque teacher function, and the fallback
    forced), in fp32 and under bf16 autocast; chunking by bytes changes nothing."""
    import stillroom.eval.target_rows as tr

    student, teacher = llama_factory(5, vocab_size=72), llama_factory(6, vocab_size=72)
    batches = [collate(examples_factory(3, seed=s), pad_id=0) for s in (5, 6)]
    fast = evaluate_lm(student, batches, teacher_logits_from_model(teacher), precision=precision, vocab_size=64)

    def opaque(b):  # no .teacher attribute: its whole logits
        return teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits

    monkeypatch.setattr(tr, "output_head", lambda model: (_ for _ in ()).throw(TypeError("no plain head")))
    monkeypatch.setattr(tr, "CHUNK_BYTES", 4 * 64 * 3)  # 3 rows per chunk
    plain = evaluate_lm(student, batches, opaque, precision=precision, vocab_size=64)
    for key in ("heldout_ce", "kl_teacher_student", "top1_agreement", "tokens"):
        assert fast[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-7), key


def _count_body_forwards(model) -> list:
    """A list that grows by one per forward of ``model``'s decoder body (its first layer)."""
    calls = []
    model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_remembered_teacher_rows_match_and_run_the_teacher_once_per_batch(student, teacher, batches, precision):
    plain = evaluate_lm(student, batches, teacher_logits_from_model(teacher), precision=precision)
    calls = _count_body_forwards(teacher)
    fn = teacher_logits_from_model(teacher, remember=True)
    first = evaluate_lm(student, batches, fn, precision=precision)
    again = evaluate_lm(copy.deepcopy(student), batches, fn, precision=precision)
    assert len(calls) == len(batches)  # the second evaluation read the remembered rows
    assert first == plain and again == plain


def test_remembered_rows_follow_the_teachers_weights_and_the_precision(student, teacher, batches):
    fn = teacher_logits_from_model(teacher, remember=True)
    calls = _count_body_forwards(teacher)
    before = evaluate_lm(student, batches, fn, precision="fp32")
    evaluate_lm(student, batches, fn, precision="bf16")  # another precision: other rows
    assert len(calls) == 2 * len(batches)
    with torch.no_grad():
        teacher.model.layers[0].mlp.down_proj.weight.mul_(3.0)  # written in place: the rows are stale
    after = evaluate_lm(student, batches, fn, precision="fp32")
    assert len(calls) == 3 * len(batches)
    fresh = evaluate_lm(student, batches, teacher_logits_from_model(teacher), precision="fp32")
    assert after == fresh and after["kl_teacher_student"] != before["kl_teacher_student"]


def test_the_teacher_against_itself_runs_once_per_batch(teacher, batches):
    calls = _count_body_forwards(teacher)
    out = evaluate_lm(teacher, batches, teacher_logits_from_model(teacher, remember=True), precision="fp32")
    assert len(calls) == len(batches)
    assert out["kl_teacher_student"] == 0.0 and out["top1_agreement"] == 1.0



@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("remember", [False, True])
def test_models_evaluated_together_get_exactly_their_numbers_alone(student, teacher, batches, precision, remember):
    """evaluate_lms shares the teacher's side of each chunk; every model's numbers are its own evaluation's,
    the teacher's own row included, and the teacher's body runs once per batch for the whole group."""
    from stillroom.eval.metrics import evaluate_lms

    other = copy.deepcopy(student)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    alone = {name: evaluate_lm(m, batches, teacher_logits_from_model(teacher), precision=precision)
             for name, m in (("teacher", teacher), ("a", student), ("b", other))}
    calls = _count_body_forwards(teacher)
    group = {"teacher": teacher, "a": student, "b": other}
    together = evaluate_lms(group, batches, teacher_logits_from_model(teacher, remember=remember),
                            precision=precision)
    assert together == alone
    assert len(calls) == len(batches)
    students = evaluate_lms({"a": student, "b": other}, batches, teacher_logits_from_model(teacher),
                            precision=precision)
    assert students == {k: alone[k] for k in ("a", "b")}
    assert evaluate_lms({"a": student, "b": other}, batches, precision=precision) == {
        k: evaluate_lm(m, batches, precision=precision) for k, m in (("a", student), ("b", other))}
