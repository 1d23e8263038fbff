"""ExampleSampler: determinism, epochs, exact resume, rank split equivalence."""

from __future__ import annotations

import pytest

from stillroom.data import ExampleSampler


def _take(s: ExampleSampler, k: int) -> list[list[int]]:
    return [s.next_indices() for _ in range(k)]


def test_deterministic_and_each_epoch_is_a_permutation():
    a, b = ExampleSampler(10, 2, seed=7), ExampleSampler(10, 2, seed=7)
    first = _take(a, 15)
    assert first == _take(b, 15)
    for e in range(3):
        epoch = [i for batch in first[5 * e : 5 * e + 5] for i in batch]
        assert sorted(epoch) == list(range(10))
    assert first[:5] != first[5:10]  # a new permutation each epoch
    assert _take(ExampleSampler(10, 2, seed=8), 5) != first[:5]


def test_no_shuffle_is_identity_order_and_cycles():
    s = ExampleSampler(5, 2, seed=0, shuffle=False)
    # the last global batch would straddle the epoch: its remainder (index 4) is skipped
    assert _take(s, 5) == [[0, 1], [2, 3], [0, 1], [2, 3], [0, 1]]
    assert s.epoch == 2


def test_resume_is_exact():
    s = ExampleSampler(13, 3, seed=1)
    _take(s, 6)
    state = s.state_dict()
    expected = _take(s, 20)
    fresh = ExampleSampler(13, 3, seed=1)
    fresh.load_state_dict(state)
    assert _take(fresh, 20) == expected


def test_resume_refuses_other_data():
    s = ExampleSampler(13, 3, seed=1)
    with pytest.raises(ValueError, match="checkpoint has n=13 but this run has 14"):
        ExampleSampler(14, 3, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="seed"):
        ExampleSampler(13, 3, seed=2).load_state_dict(s.state_dict())


def test_ranks_together_equal_one_process_with_the_global_batch():
    single = ExampleSampler(11, 4, seed=5)
    ranks = [ExampleSampler(11, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):
        assert single.next_indices() == ranks[0].next_indices() + ranks[1].next_indices()


def test_bad_arguments():
    with pytest.raises(ValueError, match="cannot fill one global micro-batch"):
        ExampleSampler(3, 2, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        ExampleSampler(10, 2, seed=0, rank=2, world_size=2)
