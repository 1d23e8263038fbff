"""The block samplers: the threshold decoder at threshold 0 is the one-token-per-step slow sampler, steps counts,
the rules themselves, and the task."""

import math

import torch

from stillroom.config.masked_diffusion import MdTaskConfig
from stillroom.domains.masked_diffusion.sampling import decode, entropy, slow_rule, threshold_rule
from stillroom.domains.masked_diffusion.task import MdTask, build_task
from stillroom.models.masked_diffusion import build_mdlm, special_ids


def _setup(length=8, values=4):
    task, data = build_task(MdTaskConfig(kind="sort", length=length, values=values, train_prompts=8,
                                         heldout_prompts=12, seed=3))
    model = build_mdlm(values, task.positions, hidden_size=16, layers=1, heads=2, intermediate_size=32, seed=1)
    return task, data, model.eval()


def test_the_task_sorts_and_lays_out_prompt_sep_answer():
    task, data, _ = _setup()
    row = data.heldout[0].tokens
    assert row[task.length] == special_ids(task.values)[0]
    assert torch.equal(row[task.answer_start:], row[:task.length].sort().values)
    assert len(data.train) == 8 and len(data.heldout) == 12 and task.positions == 17


def test_threshold_zero_is_the_one_token_per_step_slow_sampler():
    task, data, model = _setup()
    prompts = data.heldout_prompts()
    slow = decode(model, task, prompts, 4, slow_rule(1), batch_size=5)
    fast = decode(model, task, prompts, 4, threshold_rule(0.0), batch_size=5)
    assert torch.equal(slow.answers, fast.answers) and torch.equal(slow.steps, fast.steps)
    assert (slow.steps == task.length).all() and slow.tokens_per_step() == 1.0
    assert not (slow.answers == special_ids(task.values)[1]).any()


def test_slow_sampler_steps_are_length_over_tokens_per_step_and_a_huge_threshold_takes_one_step_per_block():
    task, data, model = _setup()
    prompts = data.heldout_prompts()
    assert (decode(model, task, prompts, 4, slow_rule(2)).steps == 4).all()
    assert (decode(model, task, prompts, 4, slow_rule(4)).steps == 2).all()
    wide = decode(model, task, prompts, 4, threshold_rule(math.log(task.values + 2) + 1))
    assert (wide.steps == 2).all() and wide.tokens_per_step() == 4.0


def test_rules_pick_the_lowest_entropy_masked_positions():
    inf = float("inf")
    ent = torch.tensor([[0.5, inf, 0.1, 0.3], [inf, inf, 2.0, inf]], dtype=torch.float64)
    assert slow_rule(2)(ent).tolist() == [[False, False, True, True], [False, False, True, False]]
    assert threshold_rule(0.4)(ent).tolist() == [[False, False, True, True], [False, False, True, False]]
    assert threshold_rule(0.0)(ent).tolist() == [[False, False, True, False], [False, False, True, False]]


def test_entropy_and_scores_by_hand():
    assert abs(entropy(torch.zeros(1, 1, 4))[0, 0].item() - math.log(4)) < 1e-9
    masked_out = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    assert abs(entropy(masked_out)[0, 0].item() - math.log(2)) < 1e-9  # an excluded id carries no mass
    prompts = torch.tensor([[3, 1, 2], [3, 1, 2]])
    sort = MdTask("sort", 4, prompts)
    token_acc, exact = sort.score(prompts, torch.tensor([[1, 2, 3], [1, 1, 1]]))
    assert abs(token_acc - 4 / 6) < 1e-12 and exact == 0.5


def test_shifted_copy_accepts_any_one_allowed_shift_per_segment():
    prompts = torch.tensor([[0, 1, 2, 3]])
    task = MdTask("copy", 4, prompts, segment=2, shifts=2)
    assert task.score(prompts, torch.tensor([[1, 2, 2, 3]])) == (1.0, 1.0)  # shifts 1 and 0
    assert task.score(prompts, torch.tensor([[1, 1, 0, 3]])) == (0.0, 0.0)  # mixed shifts; wrap-around 3+1=0 mixed
    assert task.score(prompts, torch.tensor([[2, 3, 3, 0]])) == (0.5, 0.0)  # shift 2 is not allowed; 1 wraps to 0
    shifted_sort = MdTask("sort", 4, torch.tensor([[3, 0, 2, 1]]), segment=2, shifts=2)
    assert shifted_sort.score(shifted_sort.prompts, torch.tensor([[1, 2, 2, 3]])) == (1.0, 1.0)  # [0 1]+1, [2 3]+0
    drawn = task.answers(prompts.repeat(200, 1), torch.Generator().manual_seed(0))
    assert task.score(prompts.repeat(200, 1), drawn) == (1.0, 1.0)
    assert len({tuple(r.tolist()) for r in drawn}) == 4  # every combination of the two segments' shifts appears
