"""The lm-evaluation-harness adapter (``eval.lm_eval``): its accuracy is argmax log-likelihood computed by hand,
its names, and the problems it reports before a run starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from harness_helpers import CHOICES, QUESTIONS, needs_lm_eval, write_mc_task
from helpers import tiny_llama, tiny_tokenizer
from pydantic import ValidationError

from stillroom.config.harness import LmEvalConfig
from stillroom.eval.harness import check_lm_eval, harness_results, row_metrics


@torch.no_grad()
def _continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context): the continuation's tokens are those the whole text adds to the context's."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@needs_lm_eval
def test_accuracy_is_the_share_of_argmax_loglikelihood_answers(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=3)
    picks = [max(range(len(CHOICES)), key=lambda c: _continuation_logprob(model, tok, q, CHOICES[c]))
             for q in QUESTIONS]
    # the first five answers are the model's picks, the last three another choice: 5/8 by hand
    gold = picks[:5] + [(p + 1) % len(CHOICES) for p in picks[5:]]
    folder = write_mc_task(tmp_path / "tasks", gold)
    model.train()
    results = harness_results(model, tok, LmEvalConfig(tasks=["toy_mc"], include_path=str(folder), batch_size=3))
    assert results == {"toy_mc": {"acc": pytest.approx(5 / 8)}}
    assert model.training  # the model's mode is restored
    limited = harness_results(model, tok, LmEvalConfig(tasks=["toy_mc"], include_path=str(folder), limit=4))
    assert limited["toy_mc"]["acc"] == pytest.approx(1.0)  # the first four documents only


def test_row_metrics_name_task_metric_and_filter():
    rows = row_metrics({"toy_mc": {"acc": 0.5, "acc_norm": 0.25}, "gsm": {"exact_match_strict-match": 0.1}})
    assert rows == {"lm_eval_toy_mc_acc": 0.5, "lm_eval_toy_mc_acc_norm": 0.25,
                    "lm_eval_gsm_exact_match_strict-match": 0.1}


def test_config_wants_tasks_each_once():
    with pytest.raises(ValidationError, match="tasks"):
        LmEvalConfig(tasks=[])
    with pytest.raises(ValidationError, match="more than once"):
        LmEvalConfig(tasks=["a", "b", "a"])


@needs_lm_eval
def test_problems_name_the_folder_and_the_unknown_task(tmp_path):
    folder = write_mc_task(tmp_path / "tasks", [0, 1])
    assert check_lm_eval(LmEvalConfig(tasks=["toy_mc"], include_path=str(folder))) == []
    missing = check_lm_eval(LmEvalConfig(tasks=["toy_mc"], include_path=str(tmp_path / "nowhere")))
    assert len(missing) == 1 and "eval.lm_eval.include_path" in missing[0] and "nowhere" in missing[0]


def test_without_the_harness_the_problem_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    problems = check_lm_eval(LmEvalConfig(tasks=["toy_mc"]))
    assert len(problems) == 1 and "stillroom[harness]" in problems[0] and "eval.lm_eval" in problems[0]


def test_a_vlm_run_with_harness_tasks_is_refused_before_it_starts():
    import stillroom
    from stillroom.config.load import ConfigError, load_config
    from stillroom.run.checks import check_run

    recipe = Path(stillroom.__file__).parent / "recipes" / "vlm_scenes.yaml"
    cfg = load_config(recipe, ["eval.lm_eval.tasks=[toy_mc]"])
    with pytest.raises(ConfigError, match="eval.lm_eval: the harness scores text-only models"):
        check_run(cfg)
