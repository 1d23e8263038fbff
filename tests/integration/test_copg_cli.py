"""method=copg through the real CLI: k = 3 graded completions per prompt, the frozen starting student as
pi_ref, the logged loss is the mean CoPG loss and the student moves toward the higher-rewarded answers."""

import json

import pytest
from cli_helpers import stillroom

NO_EVAL = ["eval.before=false", "eval.generations=0", "eval.speed_tokens=16", "eval.heldout_sequences=4"]


def _groups_file(tmp_path):
    """Addition prompts, three answers each: right (reward 1), off by one (0.5), off by five (0)."""
    path = tmp_path / "groups.jsonl"
    with path.open("w") as f:
        for i in range(30):
            a, b = i % 7, (3 * i) % 5
            answers = [f" {a + b}", f" {a + b + 1}", f" {a + b + 5}"]
            f.write(json.dumps({"prompt": f"Q{i}: {a}+{b}=", "completions": answers, "rewards": [1.0, 0.5, 0.0]})
                    + "\n")
    return path


def test_copg_trains_on_graded_groups(recipe_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = recipe_factory(
        method="copg", loss={"terms": [{"name": "ce"}]},
        data={"sources": [{"path": str(_groups_file(tmp_path)), "format": "prompt_completion"}], "seq_len": 32,
              "heldout_fraction": 0.2, "heldout_max": 4},
        train={"steps": 4, "micro_batch_size": 6, "precision": "fp32", "warmup_steps": 0, "lr": 3e-3},
        copg={"beta": 0.5, "group_size": 3},
    )
    out = stillroom("run", str(recipe), *NO_EVAL)
    assert "x 3 completions" in out.stdout and "beta=0.5, reference=student" in out.stdout
    run_dir = tmp_path / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["copg/groups"] == 2 for r in rows)
    # step 1: policy = reference, so the loss is the reward spread alone: (1/2) sum_{i>j} (R_i - R_j)^2 / (2 beta)
    assert rows[0]["loss"] == pytest.approx((0.5 ** 2 + 1 ** 2 + 0.5 ** 2) / 2 / (2 * 0.5), rel=1e-4)
    assert rows[0]["loss/copg"] == pytest.approx(rows[0]["loss"], rel=1e-6)
    assert abs(rows[0]["copg/log_ratio_mean"]) < 1e-5 and rows[-1]["loss"] < rows[0]["loss"]
    AutoModelForCausalLM.from_pretrained(run_dir / "student")  # a plain transformers folder
