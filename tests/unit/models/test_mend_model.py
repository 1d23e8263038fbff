"""MEND's model pieces: the distiller's S_D (shape, projector, padding), the split of full rows into D and x,
the LLM on [prefix ; x] aligned with the full context position by position, saving and loading the distiller."""

import json

import pytest
import torch
from helpers import tiny_llama

from stillroom.models.mend import (
    CONFIG, MendDistiller, gather_positions, load_distiller, prefix_logits, save_distiller, split_rows,
    summary_init_table,
)

V, PAD = 40, 0


def _distiller(llm, backbone, l=3, seed=0):
    return MendDistiller(backbone, l, llm.config.hidden_size, init_table=summary_init_table(llm, backbone), seed=seed)


def test_summary_vectors_have_the_llm_width_through_a_projector_when_widths_differ():
    llm, small = tiny_llama(V, layers=2, hidden=32, seed=0), tiny_llama(V, layers=1, hidden=16, seed=1)
    distiller = _distiller(llm, small, l=5)
    ids = torch.randint(3, V, (2, 7))
    s_bld = distiller(ids, torch.ones_like(ids))
    assert s_bld.shape == (2, 5, 32) and distiller.projector is not None
    assert s_bld.abs().max() <= 1.0  # dense + tanh, as the released MyPooler
    same = _distiller(llm, tiny_llama(V, layers=1, hidden=32, seed=2), l=4)
    assert same.projector is None and same(ids, torch.ones_like(ids)).shape == (2, 4, 32)


def test_summary_embeddings_start_as_seeded_rows_of_the_llm_vocabulary():
    llm = tiny_llama(V, layers=1, hidden=32, seed=0)
    a, b = _distiller(llm, tiny_llama(V, 1, 32, seed=3), seed=7), _distiller(llm, tiny_llama(V, 1, 32, seed=4), seed=7)
    table = llm.get_input_embeddings().weight
    assert torch.equal(a.summary, b.summary)
    assert all(any(torch.equal(row, t) for t in table) for row in a.summary)
    assert not torch.equal(a.summary, _distiller(llm, tiny_llama(V, 1, 32, seed=3), seed=8).summary)


def test_left_padding_of_the_demonstrations_does_not_change_s_d():
    llm = tiny_llama(V, layers=1, hidden=32, seed=0)
    distiller = _distiller(llm, tiny_llama(V, 2, 32, seed=5))
    short = torch.tensor([[5, 6, 7]])
    alone = distiller(short, torch.ones_like(short))
    padded = torch.tensor([[PAD, PAD, 5, 6, 7], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(distiller(padded, mask)[:1], alone, atol=1e-5, rtol=1e-5)


def test_split_rows_cuts_demonstrations_and_x_with_their_shifted_targets():
    ids = torch.tensor([[11, 12, 13, 21, 22, 23], [14, 15, 24, 25, PAD, PAD]])
    att = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    targets = torch.tensor([[-100, -100, -100, -100, 23, -100], [-100, -100, 25, -100, -100, -100]])
    rows = split_rows(ids, att, targets, [3, 2], PAD)
    assert rows.demo_ids.tolist() == [[11, 12, 13], [PAD, 14, 15]]
    assert rows.demo_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert rows.x_ids.tolist() == [[21, 22, 23], [24, 25, PAD]]
    assert rows.x_mask.tolist() == [[True, True, True], [True, True, False]]
    assert rows.x_targets.tolist() == [[-100, 23, -100], [25, -100, -100]]
    assert rows.full_index.tolist() == [[3, 4, 5], [2, 3, 0]]
    with pytest.raises(ValueError, match="row 1 has 4 demonstration tokens of 4"):
        split_rows(ids, att, targets, [3, 4], PAD)


def test_student_and_teacher_logits_are_compared_on_the_same_x_tokens():
    """With the demonstrations' own embeddings as the prefix, LLM(prefix ; x) at the x positions is exactly the
    full-context teacher's logits gathered at those positions: the alignment the KD term relies on."""
    llm = tiny_llama(V, layers=2, hidden=32, seed=0)
    ids = torch.tensor([[11, 12, 13, 21, 22, 23], [14, 15, 16, 24, 25, PAD]])
    att = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    rows = split_rows(ids, att, torch.full_like(ids, -100), [3, 3], PAD)
    with torch.no_grad():
        teacher = gather_positions(llm(input_ids=ids, attention_mask=att).logits, rows.full_index)
        prefix = llm.get_input_embeddings()(ids[:, :3])
        student = prefix_logits(llm, prefix, rows.x_ids, rows.x_mask, V)
    mask = rows.x_mask
    torch.testing.assert_close(student[mask], teacher[mask], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no prefix: the LLM on x alone
        alone = llm(input_ids=rows.x_ids, attention_mask=rows.x_mask.long()).logits
        empty = prefix_logits(llm, prefix[:, :0], rows.x_ids, rows.x_mask, V)
    torch.testing.assert_close(empty[mask], alone[mask], atol=1e-5, rtol=1e-5)


def test_the_distiller_saves_and_loads_atomically_and_refuses_another_shape(tmp_path):
    llm = tiny_llama(V, layers=1, hidden=32, seed=0)
    a = _distiller(llm, tiny_llama(V, 1, 16, seed=1), l=4)
    with torch.no_grad():
        a.summary.add_(1.0)
    save_distiller(a, tmp_path / "d")
    assert not list((tmp_path / "d").glob(".*tmp"))
    assert json.loads((tmp_path / "d" / CONFIG).read_text())["summary_len"] == 4
    b = _distiller(llm, tiny_llama(V, 1, 16, seed=9), l=4)
    load_distiller(b, tmp_path / "d")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="summary_len=4, this run's distiller 5"):
        load_distiller(_distiller(llm, tiny_llama(V, 1, 16, seed=1), l=5), tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="holds no mend_distiller"):
        load_distiller(b, tmp_path / "nothing")
