"""CrossTeacher: the teacher's distributions at the student's positions, equal to a full forward on its own
tokens; chunked head projection equals one pass; the run checks of a cross-tokenizer recipe."""

import copy

import pytest
import torch
from helpers import cross_recipe, cross_setup, tiny_llama

from stillroom.teachers.cross import CrossTeacher


@pytest.fixture(scope="module")
def setup():
    vocab, batch = cross_setup()
    return vocab, tiny_llama(vocab.teacher_vocab, layers=2, seed=3), batch


def test_targets_equal_the_full_forward_at_aligned_positions(setup):
    vocab, teacher, batch = setup
    ct = CrossTeacher(teacher, vocab, temperature=2.0, supports={"all", "unmatched"}, chunk_rows=5)
    cross = ct.signal(batch).cross
    matched_t = vocab.matched_teacher
    for b, row in enumerate(ct.alignments(batch)):
        with torch.no_grad():
            full = teacher(torch.tensor([row.teacher_ids])).logits[0]  # [m, V_t]
        assert cross.aligned_bt[b].nonzero().squeeze(1).tolist() == row.student_pos
        for i, j in zip(row.student_pos, row.teacher_pos):
            assert torch.allclose(cross.matched_logits_btm[b, i], full[j, matched_t], atol=1e-5)
            probs = torch.softmax(full[j] / 2.0, -1)
            top, tail = cross.ranked["all"][0][b, i], cross.ranked["all"][1][b, i]
            assert torch.allclose(top, probs.topk(top.numel()).values, atol=1e-6)
            assert tail.item() == pytest.approx(1 - top.sum().item(), abs=1e-5)
    assert cross.ranked["all"][0].shape[-1] == min(len(vocab.student_tok), len(vocab.teacher_tok))
    aligned_targets = (cross.aligned_bt & batch.loss_mask).sum() / batch.loss_mask.sum()
    assert 0.5 < aligned_targets <= 1.0


def test_chunk_size_changes_nothing(setup):
    vocab, teacher, batch = setup
    one = CrossTeacher(teacher, vocab, temperature=1.0, supports={"unmatched"}, chunk_rows=1).signal(batch).cross
    many = CrossTeacher(teacher, vocab, temperature=1.0, supports={"unmatched"}, chunk_rows=4096).signal(batch).cross
    assert torch.equal(one.aligned_bt, many.aligned_bt)
    assert torch.allclose(one.matched_logits_btm, many.matched_logits_btm, atol=1e-6)
    assert torch.allclose(one.ranked["unmatched"][0], many.ranked["unmatched"][0], atol=1e-7)


def test_cross_recipes_are_checked_when_loaded():
    assert cross_recipe().teacher.tokenizer_mode == "cross"
    assert cross_recipe(teacher={"source": "store"}, loss={"loss_temperature": 1.0}).teacher.source == "store"
    with pytest.raises(ValueError, match="loss.loss_temperature: 1"):  # ranked top-k at T=1 cannot be re-tempered
        cross_recipe(teacher={"source": "remote"}, loss={"loss_temperature": 2.0})
    assert cross_recipe(teacher={"source": "online"}, loss={"loss_temperature": 2.0}).loss.loss_temperature == 2.0
    with pytest.raises(ValueError, match="student's own tokenizer"):
        cross_recipe(student={"from_config": None, "tokenizer": None, "from_teacher": {"strategy": "every_n", "every_n": 2}})
    with pytest.raises(ValueError, match="positions differ"):
        cross_recipe(loss={"terms": [{"name": "hidden_mse"}]})
    with pytest.raises(ValueError, match="set teacher.tokenizer_mode: cross"):
        cross_recipe(teacher={"tokenizer_mode": "same"})


@pytest.mark.gpu
def test_on_cuda_the_targets_match_the_cpu_ones(setup):
    vocab, teacher, batch = setup
    cpu = CrossTeacher(teacher, vocab, temperature=1.0, supports={"all"}).signal(batch).cross
    on_gpu = CrossTeacher(copy.deepcopy(teacher).cuda(), vocab, temperature=1.0, supports={"all"},
                          output_device="cuda").signal(batch.to("cuda")).cross
    assert on_gpu.matched_logits_btm.device.type == "cuda" and on_gpu.aligned_bt.device.type == "cuda"
    assert torch.equal(on_gpu.aligned_bt.cpu(), cpu.aligned_bt)
    assert torch.allclose(on_gpu.matched_logits_btm.cpu(), cpu.matched_logits_btm, atol=1e-4)
    assert torch.allclose(on_gpu.ranked["all"][0].cpu(), cpu.ranked["all"][0], atol=1e-5)
