"""The teacher's memo: the teacher runs once per sequence, later visits read the kept rows, and the rows are the
store's (the same row functions), whatever mix of seen and new sequences a batch holds."""

import pytest
import torch

from helpers import tiny_llama
from stillroom.data.batch import Example, collate
from stillroom.teachers.memo import MemoTeacher
from stillroom.teachers.signal import OnlineTeacher
from stillroom.teachers.store_reader import batch_signal
from stillroom.teachers.store_sampled import loss_rows, row_signal

VOCAB = 64


def examples(n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + i % 4  # rows of different lengths: padding in every batch
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        out.append(Example(input_ids=ids, target=[True] * length, uid=f"seq{i}"))
    return out


class Counting(OnlineTeacher):
    """An online teacher that counts the rows it ran on."""

    rows_run = 0

    def signal(self, batch):
        self.rows_run += len(batch.uids)
        return super().signal(batch)


def memo(signal: str = "topk", k: int = 8, tail_draws: int = 4, draw: str = "multinomial") -> MemoTeacher:
    inner = Counting(tiny_llama(VOCAB, layers=2, hidden=16), vocab_size=VOCAB)
    return MemoTeacher(inner, signal=signal, k=k, tail_draws=tail_draws, loss_temperature=1.5, draw=draw)


@pytest.mark.parametrize("signal,draw", [("topk", "multinomial"), ("sampled", "multinomial"),
                                         ("topk_sampled", "multinomial"), ("topk_sampled", "allocated")])
def test_rows_are_the_store_rows_and_the_teacher_runs_once_per_sequence(signal, draw):
    teacher, data = memo(signal, draw=draw), examples(6)
    first = teacher.signal(collate(data[:4], 0))
    assert teacher.inner.rows_run == 4 and len(teacher.rows) == 4
    mixed = collate([data[4], data[1], data[5], data[2]], 0)  # two new, two seen
    got = teacher.signal(mixed)
    assert teacher.inner.rows_run == 6 and len(teacher.rows) == 6  # the teacher ran on the two new rows only
    again = teacher.signal(collate(data[:4], 0))
    assert teacher.inner.rows_run == 6  # every row seen: no teacher forward
    assert torch.equal(again.topk_ids_btk, first.topk_ids_btk)
    assert torch.equal(again.topk_logprobs_btk, first.topk_logprobs_btk)

    # the same batch from rows made directly from the teacher's dense logits (what a float32 store holds)
    dense = OnlineTeacher(teacher.inner.model, vocab_size=VOCAB).signal(mixed).logits_btv
    rows = []
    for b, uid in enumerate(mixed.uids):
        n = int(mixed.attention_mask[b].sum())
        ids, lp, tail, extra = row_signal(dense[b, :n], uid, signal=signal, k=8, tail_draws=4, loss_temperature=1.5,
                                          draw=draw)
        rows.append((*loss_rows(signal, ids, lp, tail, extra.get("tail_ids")), {}))
    want = batch_signal(mixed, rows, width=teacher.width, vocab_size=VOCAB, temperature=1.5, hidden_layers=[],
                        fingerprint=None, device=torch.device("cpu"))
    assert torch.equal(got.topk_ids_btk, want.topk_ids_btk)
    torch.testing.assert_close(got.topk_logprobs_btk, want.topk_logprobs_btk, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.tail_logmass_bt, want.tail_logmass_bt, rtol=0, atol=1e-5)
    width = got.topk_ids_btk.shape[-1]
    assert got.temperature == 1.5 and (width >= 12 if draw == "allocated" else width == (12 if signal == "topk_sampled"
                                                                                          else 8))
    assert teacher.held_bytes() > 0


def test_memo_refuses_hidden_states_and_a_width_beyond_the_vocabulary():
    model = tiny_llama(VOCAB, layers=2, hidden=16)
    with pytest.raises(ValueError, match="hidden-state and attention loss terms"):
        MemoTeacher(OnlineTeacher(model, vocab_size=VOCAB, hidden_layers=[1]), signal="topk", k=8, tail_draws=0,
                    loss_temperature=1.0)
    with pytest.raises(ValueError, match="more than the vocabulary"):
        MemoTeacher(OnlineTeacher(model, vocab_size=VOCAB), signal="topk_sampled", k=60, tail_draws=8,
                    loss_temperature=1.0)


def test_a_reused_uid_with_another_length_is_named():
    teacher, data = memo(), examples(2)
    teacher.signal(collate(data, 0))
    other = Example(input_ids=data[0].input_ids + [3, 4], target=[True] * (len(data[0].input_ids) + 2), uid="seq0")
    with pytest.raises(ValueError, match="sequence 'seq0'"):
        teacher.signal(collate([other], 0))
