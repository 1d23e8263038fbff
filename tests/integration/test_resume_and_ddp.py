"""Exact resume after SIGKILL, and two processes (gloo) matching one, through the real CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import stillroom

FAST_TRAIN = {"micro_batch_size": 4, "precision": "fp32", "warmup_steps": 2, "lr": 1e-3, "save_every": 5, "keep_checkpoints": 2}
NO_EVAL = ["eval.before=false", "eval.generations=0"]


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_matches_uninterrupted(recipe_factory, tmp_path):
    steps = 120
    recipe = recipe_factory(train={**FAST_TRAIN, "steps": steps})
    stillroom("run", str(recipe), "name=full", *NO_EVAL)
    full = _losses(tmp_path / "runs" / "full")

    run_dir = tmp_path / "runs" / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stillroom.cli.main", "run", str(recipe), "name=killed", *NO_EVAL],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any((run_dir / "checkpoints").glob("step_*/COMPLETE")):
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    done = sorted((run_dir / "checkpoints").glob("step_*/COMPLETE"))
    assert done and f"step_{steps:06d}" not in str(done[-1])

    out = stillroom("run", str(recipe), "name=killed", "--resume", *NO_EVAL)
    assert "resumed from" in out.stdout
    resumed = _losses(run_dir)
    assert len(resumed) == steps
    assert resumed[-1] == pytest.approx(full[-1], abs=1e-6)
    assert resumed == pytest.approx(full, abs=1e-6)


@pytest.mark.multiproc
def test_two_processes_match_one(recipe_factory, tmp_path):
    recipe = recipe_factory(train={**FAST_TRAIN, "steps": 6, "save_every": 0, "micro_batch_size": 4})
    stillroom("run", str(recipe), "name=one", *NO_EVAL)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "stillroom.cli.main", "run", str(recipe), "name=two", "train.micro_batch_size=2", *NO_EVAL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = _losses(tmp_path / "runs" / "one")
    two = _losses(tmp_path / "runs" / "two")
    assert len(two) == len(one) == 6
    assert two == pytest.approx(one, abs=1e-5)
