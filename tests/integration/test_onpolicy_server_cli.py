"""method=onpolicy with onpolicy.rollout=server through the real CLI, against our server on loopback: the run
syncs the student to the server and samples there, resumes to the same samples, and is refused by name by a
server started without --allow-reload."""

import json

import pytest
from cli_helpers import interrupted_copy, stillroom
from helpers import load_saved
from loopback import serve, teacher_app, teacher_service

from stillroom.teachers.server import create_app

NO_EVAL = ["eval.before=false", "eval.generations=0"]
TRAIN = {"steps": 6, "micro_batch_size": 2, "precision": "fp32", "warmup_steps": 2, "lr": 1e-3, "save_every": 3,
         "keep_checkpoints": 2}


def _onpolicy(url: str) -> dict:
    return {"max_new_tokens": 6, "text_prompt_tokens": 8, "rollout": "server",
            "server": {"url": url, "model": "tiny", "reload_every": 3, "max_retries": 0}}


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_server_rollouts_train_and_resume_to_the_same_samples(recipe_factory, tmp_path, tiny_teacher_dir):
    model, tok = load_saved(tiny_teacher_dir)  # the server starts with the teacher; the run replaces it
    service = teacher_service(model, tok, allow_reload=True)
    with serve(create_app(service)) as server:
        recipe = recipe_factory(method="onpolicy", onpolicy=_onpolicy(server.url), train=TRAIN)
        out = stillroom("run", str(recipe), "name=full", *NO_EVAL)
        assert "onpolicy: student of step 0 synced to onpolicy.server" in out.stdout
        full_dir = tmp_path / "runs" / "full"
        full = _lines(full_dir / "metrics.jsonl")
        records = _lines(full_dir / "onpolicy.jsonl")
        assert len(full) == 6 and sum(r["generate_s"] for r in full) > 0
        assert [r["source"] for r in records] == ["student"] * 6
        assert all(1 <= r["target_tokens"] <= 2 * 6 for r in records)
        weights = [r["weights"] for r in records]  # synced before steps 1 and 4 (reload_every=3)
        assert weights[0] == weights[1] == weights[2] != weights[3] == weights[4] == weights[5]
        assert (full_dir / "rollout_weights" / "config.json").is_file()
        assert service.weights[:12] == weights[-1]  # the server sampled with the weights the run last wrote

        # Interrupted after step 3: the checkpoint of step 3, then --resume syncs that student and goes on.
        resumed_dir = tmp_path / "runs" / "resumed"
        interrupted_copy(full_dir, resumed_dir, after_step=3, final_step=6)
        out = stillroom("run", str(recipe), "name=resumed", *NO_EVAL, "--resume")
        assert "resumed from" in out.stdout
    resumed = _lines(resumed_dir / "metrics.jsonl")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], abs=1e-6)
    assert [r["targets"] for r in resumed] == [r["targets"] for r in full]
    again = _lines(resumed_dir / "onpolicy.jsonl")
    keys = ("step", "micro", "source", "target_tokens", "weights")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in records]


def test_a_server_without_allow_reload_stops_the_run_before_step_0(recipe_factory, tmp_path, tiny_teacher_dir):
    model, tok = load_saved(tiny_teacher_dir)
    with serve(teacher_app(model, tok)) as server:
        recipe = recipe_factory(method="onpolicy", onpolicy=_onpolicy(server.url), train={**TRAIN, "steps": 1})
        proc = stillroom("run", str(recipe), "name=refused", *NO_EVAL, check=False)
    assert proc.returncode == 1
    assert "RolloutServerError" in proc.stderr and "--allow-reload" in proc.stderr
    assert not (tmp_path / "runs" / "refused" / "metrics.jsonl").exists()
