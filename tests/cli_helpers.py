"""The real CLI in a subprocess, and tiny recipes for it (imported by name: tests/ is on sys.path).

A module of its own, not ``conftest``: ``from conftest import ...`` finds whichever conftest module pytest
imported first, so it breaks depending on which test folders a run collects.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


def cli_env(**extra: str) -> dict[str, str]:
    """The environment the CLI runs in: offline, one OpenMP thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


SUBPROCESS = os.environ.get("STILLROOM_TEST_SUBPROCESS") == "1"
"""Run every :func:`stillroom` call in a subprocess (``STILLROOM_TEST_SUBPROCESS=1``); by default it runs in this
process, which skips the ~6 s of importing torch and transformers per call (three quarters of a tiny run)."""


def stillroom(*args: str, check: bool = True, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI (``stillroom.cli.main.main``): in this process as the test suite's default (see
    :func:`_in_process`), in a subprocess with ``STILLROOM_TEST_SUBPROCESS=1``. ``timeout`` bounds a subprocess
    only."""
    if SUBPROCESS:
        proc = subprocess.run(
            [sys.executable, "-m", "stillroom.cli.main", *args], capture_output=True, text=True, timeout=timeout,
            env=cli_env(**(env or {})),
        )
    else:
        proc = _in_process(list(args), env or {})
    if check and proc.returncode != 0:
        raise AssertionError(f"stillroom {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _in_process(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``main(args)`` with the subprocess's conditions: its environment (:func:`cli_env`), one torch thread, stdout
    and stderr captured, the exit status of ``SystemExit`` or of an escaped exception (1, traceback on stderr).
    The environment, thread count and the torch/numpy/random generators are restored afterwards, so a call
    leaves this process as it found it."""
    import contextlib
    import io
    import random
    import traceback

    import numpy as np
    import torch

    from stillroom.cli.main import main

    saved_env, threads = dict(os.environ), torch.get_num_threads()
    rng = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(cli_env(**env))
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exc:  # argparse errors, sys.exit in a command
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - a subprocess would die with the traceback on stderr
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
    return subprocess.CompletedProcess(["stillroom", *args], code, out.getvalue(), err.getvalue())


def stillroom_sigkilled(*args: str, when, timeout: float = 120, settle_s: float = 0.0,
                        hint: str = "make it longer") -> None:
    """Run ``stillroom ARGS`` in a subprocess and SIGKILL it as soon as ``when()`` is true (polled every
    millisecond for up to ``timeout`` seconds), ``settle_s`` later. Fails where it finished before the kill."""
    proc = subprocess.Popen([sys.executable, "-m", "stillroom.cli.main", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if when():
            break
        time.sleep(0.001)
    time.sleep(settle_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    what = "the run" if args[0] == "run" else args[0]
    assert proc.returncode == -signal.SIGKILL, f"{what} finished before it could be killed; {hint}"


def completed_checkpoints(run_dir: Path) -> list[Path]:
    """The COMPLETE markers of a run's checkpoints, oldest first."""
    return sorted((run_dir / "checkpoints").glob("step_*/COMPLETE"))


def interrupted_copy(run_dir: Path, copy_dir: Path, *, after_step: int, final_step: int) -> None:
    """``copy_dir``: the finished run ``run_dir`` as a kill right after ``after_step``'s checkpoint would leave it
    (the final checkpoint, the saved student and the later metrics lines gone), ready for ``--resume``."""
    import shutil

    shutil.copytree(run_dir, copy_dir)
    shutil.rmtree(copy_dir / "checkpoints" / f"step_{final_step:06d}")
    shutil.rmtree(copy_dir / "student", ignore_errors=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (copy_dir / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] <= after_step))


def stillroom_torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``stillroom ARGS`` under torchrun, ``nproc`` processes on this machine; fails with the output's tails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "stillroom.cli.main", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_losses(run_dir: Path) -> list[float]:
    """The training loss of every step a run logged (its metrics.jsonl)."""
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(run_dir: Path, reference_dir: Path, *, abs: float, steps: int | None = None) -> None:
    """The run in ``run_dir`` logged the losses of the one in ``reference_dir``, step for step (``steps`` of them
    where given), to within ``abs``."""
    got, want = run_losses(run_dir), run_losses(reference_dir)
    if steps is not None:
        assert len(got) == len(want) == steps
    assert got == pytest.approx(want, abs=abs)


def tiny_recipe(tmp_path: Path, teacher_dir: Path, **sections) -> Path:
    """A recipe for a seconds-long run with the tiny teacher; ``sections`` update the defaults."""
    recipe = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": {"path": str(teacher_dir)}, "dtype": "float32"},
        "student": {"from_teacher": {"strategy": "every_n", "every_n": 2}},
        "data": {"sources": [{"bundled": "pydoc", "limit": 40}], "seq_len": 32, "heldout_fraction": 0.2, "heldout_max": 8},
        "loss": {"terms": [{"name": "forward_kl"}], "chunk_tokens": 64},
        "train": {"steps": 6, "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 2, "lr": 1e-3},
        "eval": {"heldout_sequences": 8, "batch_size": 4, "generations": 1, "max_new_tokens": 4, "speed_tokens": 64},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def assert_store_resumes_exactly(recipe: Path, full: Path, killed: Path) -> None:
    """``stillroom cache-teacher`` of ``recipe`` into ``full``, then into ``killed`` SIGKILLed in the middle and run
    again: it resumes shard by shard (naming how many shards were done) to the very same bytes as ``full``."""
    import json

    from helpers import file_hashes

    stillroom("cache-teacher", str(recipe), f"teacher.store.path={full}", "--batch-size=2")
    num_shards = json.loads((full / "manifest.json").read_text())["num_shards"]
    assert num_shards >= 8
    stillroom_sigkilled("cache-teacher", str(recipe), f"teacher.store.path={killed}", "--batch-size=2",
                        when=(killed / "manifest.json").exists, timeout=240,
                        settle_s=0.05,  # let it get into the middle of a later shard
                        hint="give it more data")
    partial = json.loads((killed / "manifest.json").read_text())
    assert not partial["complete"] and 1 <= len(partial["shards"]) < num_shards
    out = stillroom("cache-teacher", str(recipe), f"teacher.store.path={killed}", "--batch-size=2")
    assert f"resuming teacher store {killed}: {len(partial['shards'])}/{num_shards}" in out.stdout
    assert out.stdout.count("this run)") == num_shards - len(partial["shards"])
    assert file_hashes(killed) == file_hashes(full)
