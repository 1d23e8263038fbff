"""``accelerate launch`` for real: two processes on CPU (gloo), no accelerate config file, offline; they train
what one process trains (the same losses per step and the same final student), with DDP (the default) and with
FSDP2 (``train.parallel=fsdp``: accelerate only starts the processes, stillroom shards)."""

import subprocess
import sys

import pytest
import torch
from cli_helpers import assert_same_losses, cli_env, stillroom
from safetensors.torch import load_file

NO_EVAL = ["eval.before=false", "eval.generations=0"]

# Every choice accelerate would otherwise read from its config file (or ask for) given on the command line.
ACCELERATE = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]


@pytest.mark.multiproc
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_accelerate_launch_two_processes_match_one(recipe_factory, tmp_path, parallel):
    recipe = recipe_factory(train={"steps": 4, "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 2,
                                   "lr": 1e-3})
    stillroom("run", str(recipe), "name=one", *NO_EVAL)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *ACCELERATE, "-m", "stillroom.cli.main",
           "run", str(recipe), "name=two", "train.micro_batch_size=2", f"train.parallel={parallel}", *NO_EVAL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("training: 4 steps") == 2  # both processes ran the loop
    runs = tmp_path / "runs"
    assert_same_losses(runs / "two", runs / "one", abs=1e-5, steps=4)
    one, two = (load_file(runs / name / "student" / "model.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
