"""On-policy sources: prompts, generated-only targets, seeded/resumable sampling, the source mix, run checks."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from helpers import tiny_llama

from pydantic import ValidationError

from stillroom.config.schema import LossConfig, LossTerm, OnPolicyConfig, RunConfig
from stillroom.data.batch import IGNORE, Example, batch_prompts, collate
from stillroom.losses import LossMix, StudentOutput
from stillroom.methods.onpolicy import OnPolicySource, choose_source, generated_batch
from stillroom.teachers.signal import OnlineTeacher

PAD = 1


@pytest.fixture(scope="module")
def student(tok):
    return tiny_llama(len(tok), layers=2, seed=1)


@pytest.fixture(scope="module")
def teacher(tok):
    return tiny_llama(len(tok), layers=2, seed=2)


def _pc_example(prompt: list[int], completion: list[int], uid: str) -> Example:
    return Example(prompt + completion, [False] * len(prompt) + [True] * len(completion), uid)


def _mixed_batch():
    """Two prompt/completion rows (prompts of 5 and 3 tokens) and one plain-text row of 12 tokens."""
    return collate([
        _pc_example([10, 11, 12, 13, 14], [20, 21, 22], "a"),
        _pc_example([30, 31, 32], [40, 41, 42, 43, 44, 45], "b"),
        Example(list(range(50, 62)), [True] * 12, "c"),
    ], PAD)


def _source(student, teacher, tok, **cfg) -> OnPolicySource:
    oc = OnPolicyConfig(**{"max_new_tokens": 6, "text_prompt_tokens": 4, **cfg})
    return OnPolicySource(oc, seed=7, student=student, teacher_model=teacher, tokenizer=tok, pad_id=PAD, seq_len=16)


def test_prompts_are_the_tokens_before_the_first_target():
    prompts = batch_prompts(_mixed_batch(), text_prompt_tokens=4)
    assert prompts == [[10, 11, 12, 13, 14], [30, 31, 32], [50, 51, 52, 53]]


def test_text_prompt_is_capped_to_leave_a_target():
    batch = collate([Example([5, 6, 7], [True] * 3, "short")], PAD)
    assert batch_prompts(batch, text_prompt_tokens=16) == [[5, 6]]


def test_row_without_targets_is_an_error():
    batch = collate([Example([5, 6, 7], [True, False, False], "nothing")], PAD)
    with pytest.raises(ValueError, match="nothing.*no target"):
        batch_prompts(batch, text_prompt_tokens=4)


def test_generated_batch_targets_only_the_continuation():
    batch = generated_batch([[3, 4, 5], [6]], [[7, 8], [9, 10, 11]], pad_id=PAD, uids=["x", "y"])
    assert batch.input_ids.tolist() == [[3, 4, 5, 7, 8], [6, 9, 10, 11, PAD]]
    assert batch.target_ids.tolist() == [[IGNORE, IGNORE, 7, 8, IGNORE], [9, 10, 11, IGNORE, IGNORE]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_onpolicy_batches_only_train_on_generated_tokens(student, teacher, tok):
    src = _source(student, teacher, tok)
    original = _mixed_batch()
    prompts = batch_prompts(original, 4)
    (new,) = src([original], step=0)
    assert new is not original
    for b, prompt in enumerate(prompts):
        n_real = int(new.attention_mask[b].sum())
        ids = new.input_ids[b, :n_real].tolist()
        assert ids[: len(prompt)] == prompt  # the prompt is kept as it was
        generated = ids[len(prompt):]
        assert 1 <= len(generated) <= 6
        # every generated token, and nothing else, is a target (at the position that predicts it)
        counted = new.loss_mask[b].nonzero().flatten().tolist()
        assert counted == list(range(len(prompt) - 1, n_real - 1))
        assert new.target_ids[b, counted].tolist() == generated
    # the original completion tokens are not targets any more
    assert new.num_targets == sum(int(new.attention_mask[b].sum()) - len(p) for b, p in enumerate(prompts))


def test_sampling_is_seeded_by_step_and_micro_batch(student, teacher, tok):
    src = _source(student, teacher, tok, max_new_tokens=8, stop_at_eos=False)
    a = src([_mixed_batch(), _mixed_batch()], step=3)
    b = src([_mixed_batch(), _mixed_batch()], step=3)  # same step again: a resumed run
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    other_step = src([_mixed_batch()], step=4)[0]
    assert not torch.equal(a[0].input_ids, other_step.input_ids)
    assert not torch.equal(a[0].input_ids, a[1].input_ids)  # micro-batch index is part of the seed
    # global RNG state plays no part
    torch.manual_seed(123)
    c = src([_mixed_batch()], step=3)[0]
    assert torch.equal(c.input_ids, a[0].input_ids)


def test_continuations_respect_seq_len_and_max_new_tokens(student, teacher, tok):
    src = _source(student, teacher, tok, max_new_tokens=50, stop_at_eos=False)
    (new,) = src([_mixed_batch()], step=0)
    lengths = new.attention_mask.sum(1).tolist()
    assert lengths == [16, 16, 16]  # capped at seq_len=16 for every prompt length


def test_teacher_source_samples_with_the_teacher(student, teacher, tok):
    batch = _mixed_batch()
    s_src = _source(student, teacher, tok, student_weight=1.0, stop_at_eos=False)
    t_src = _source(student, teacher, tok, student_weight=0.0, teacher_weight=1.0, stop_at_eos=False)
    s_new, t_new = s_src([batch], 0)[0], t_src([batch], 0)[0]
    assert not torch.equal(s_new.input_ids, t_new.input_ids)
    assert t_src.stats["batches/teacher"] == 1 and t_src.stats["generated_tokens/teacher"] == t_new.num_targets


def test_fixed_source_passes_the_batch_through(student, teacher, tok):
    src = _source(student, teacher, tok, student_weight=0.0, fixed_weight=1.0)
    batch = _mixed_batch()
    assert src([batch], 0)[0] is batch


def test_source_mix_follows_the_weights_and_is_deterministic():
    cfg = OnPolicyConfig(student_weight=3.0, fixed_weight=1.0, teacher_weight=0.0)
    draws = [choose_source(cfg, 0, step, j) for step in range(1000) for j in range(2)]
    counts = Counter(draws)
    assert counts["teacher"] == 0
    assert abs(counts["student"] / len(draws) - 0.75) < 0.04
    assert draws == [choose_source(cfg, 0, step, j) for step in range(1000) for j in range(2)]
    assert draws != [choose_source(cfg, 1, step, j) for step in range(1000) for j in range(2)]


def test_all_zero_weights_are_refused():
    with pytest.raises(ValueError, match="all 0"):
        OnPolicyConfig(student_weight=0.0)


def test_divergence_on_an_onpolicy_batch_ignores_the_prompt(student, teacher, tok):
    """Changing the teacher's logits at prompt positions leaves the loss unchanged (generated tokens only)."""
    src = _source(student, teacher, tok, stop_at_eos=False)
    (new,) = src([_mixed_batch()], 0)
    vocab = len(tok)
    signal = OnlineTeacher(teacher, vocab_size=vocab).signal(new)
    with torch.no_grad():
        logits = student(input_ids=new.input_ids, attention_mask=new.attention_mask).logits[..., :vocab]
    mix = LossMix(LossConfig(terms=[LossTerm(name="forward_kl")], fused=False))
    base = mix(StudentOutput(logits_btv=logits), signal, new.target_ids, new.loss_mask)
    noisy_bt = signal.logits_btv.clone()
    noisy_bt[~new.loss_mask] += torch.randn_like(noisy_bt[~new.loss_mask]) * 5
    signal.logits_btv = noisy_bt
    again = mix(StudentOutput(logits_btv=logits), signal, new.target_ids, new.loss_mask)
    assert base.count == new.num_targets
    assert float(again.total) == pytest.approx(float(base.total), rel=1e-6)


def test_log_file_is_truncated_on_resume(student, teacher, tok, tmp_path):
    path = tmp_path / "onpolicy.jsonl"
    src = _source(student, teacher, tok)
    src.log_path = path
    for step in range(3):
        src([_mixed_batch()], step)
    resumed = _source(student, teacher, tok)
    resumed.log_path = path
    resumed([_mixed_batch()], 1)  # resume from the checkpoint after step 1
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2]


def test_run_checks_fail_when_the_recipe_loads():
    with pytest.raises(ValidationError, match="uses the teacher"):
        RunConfig(method="onpolicy", loss={"terms": [{"name": "ce"}]})
    with pytest.raises(ValidationError, match="store"):
        RunConfig(method="onpolicy", teacher={"source": "store"})
    fixed_only = RunConfig(method="onpolicy", teacher={"source": "store"},
                           onpolicy={"student_weight": 0.0, "fixed_weight": 1.0})
    assert fixed_only.onpolicy.fixed_weight == 1.0


def test_teacher_weight_needs_a_teacher_model(student, tok):
    with pytest.raises(ValueError, match="teacher model"):
        OnPolicySource(OnPolicyConfig(teacher_weight=1.0), seed=0, student=student, teacher_model=None,
                       tokenizer=tok, pad_id=PAD, seq_len=16)
