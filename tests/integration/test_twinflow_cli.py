"""TwinFlow through the real CLI: an rf teacher trained here, copied into a twinflow student, trained without
the teacher and reported at one step; a run killed after its first checkpoint resumes exactly (the EMA copy
is checkpointed objective state, all noise comes from the checkpointed RNG). The config refusals of a non-rf
teacher and a plain student are unit-tested (tests/unit/methods/test_twinflow.py)."""

import json

from cli_helpers import assert_same_losses, completed_checkpoints, stillroom, stillroom_sigkilled

TINY = ["generative.train_points=256", "generative.heldout_points=64", "generative.teacher.steps=20",
        "generative.teacher.batch_size=64", "generative.teacher.arch.width=16", "generative.teacher.arch.depth=2",
        "generative.teacher.sample_steps=4", "generative.eval.samples_per_class=20", "generative.eval.projections=8",
        "generative.eval.teacher_steps=[1]", "train.micro_batch_size=16", "train.log_every=1",
        "train.keep_checkpoints=1", "train.steps=300", "train.save_every=10", "eval.before=false"]


def _args(out, cache, *more):
    return ["twinflow_rings", f"output_dir={out}", f"cache_dir={cache}", *TINY, *more]


def test_twinflow_runs_reports_and_a_killed_run_resumes_exactly(tmp_path):
    cache = tmp_path / "cache"
    stillroom("run", *_args(tmp_path, cache, "name=full"))
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert report["student_after"]["nfe"] == 1 and "swd_data" in report["student_after"]
    info = json.loads((tmp_path / "full" / "student" / "denoiser.json").read_text())
    assert info["kind"] == "twinflow" and info["convention"]["name"] == "rf"
    run_dir = tmp_path / "killed"
    stillroom_sigkilled("run", *_args(tmp_path, cache, "name=killed"), when=lambda: completed_checkpoints(run_dir))
    done = completed_checkpoints(run_dir)
    assert done and "step_000300" not in str(done[-1])
    resumed = stillroom("run", *_args(tmp_path, cache, "name=killed"), "--resume")
    assert "resumed from" in resumed.stdout
    assert_same_losses(run_dir, tmp_path / "full", abs=1e-6, steps=300)
