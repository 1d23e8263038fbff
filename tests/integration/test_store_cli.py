"""Teacher stores through the real CLI: k = V parity with the online teacher, SIGKILL + resume.

(Refusal of a mismatching store before step 0 is tested in-process: tests/unit/teachers/test_store_factory.py.)
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import stillroom

NO_EVAL = ["eval.before=false", "eval.generations=0"]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tree(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_store_with_k_equal_v_trains_like_the_online_teacher(recipe_factory, tmp_path, tiny_teacher_dir):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tiny_teacher_dir)))
    store = tmp_path / "store_full"
    recipe = recipe_factory(
        teacher={"store": {"path": str(store), "k": vocab, "logprob_dtype": "float32"}},
        loss={"terms": [{"name": "forward_kl"}, {"name": "ce", "weight": 0.5}], "chunk_tokens": 64,
              "loss_temperature": 1.5},
    )
    out = stillroom("cache-teacher", str(recipe))
    assert f"k={vocab} of V={vocab}, float32 log-probs at T=1.5" in out.stdout
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["k"] == vocab and manifest["loss_temperature"] == 1.5

    stillroom("run", str(recipe), "name=online", *NO_EVAL)
    stillroom("run", str(recipe), "name=stored", "teacher.source=store", *NO_EVAL)
    online = _losses(tmp_path / "runs" / "online")
    stored = _losses(tmp_path / "runs" / "stored")
    assert len(online) == len(stored) == 6
    assert stored == pytest.approx(online, abs=1e-5)



def test_sigkill_then_resume_writes_the_same_bytes(recipe_factory, tmp_path):
    recipe = recipe_factory(teacher={"store": {"k": 8, "logprob_dtype": "int8", "shard_tokens": 1024}})
    full, killed = tmp_path / "store_full", tmp_path / "store_killed"
    stillroom("cache-teacher", str(recipe), f"teacher.store.path={full}", "--batch-size=2")
    num_shards = json.loads((full / "manifest.json").read_text())["num_shards"]
    assert num_shards >= 8

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stillroom.cli.main", "cache-teacher", str(recipe), f"teacher.store.path={killed}",
         "--batch-size=2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (killed / "manifest.json").exists():
            break
        time.sleep(0.001)
    time.sleep(0.05)  # let it get into the middle of a later shard
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "cache-teacher finished before it could be killed; give it more data"
    partial = json.loads((killed / "manifest.json").read_text())
    assert not partial["complete"] and 1 <= len(partial["shards"]) < num_shards

    out = stillroom("cache-teacher", str(recipe), f"teacher.store.path={killed}", "--batch-size=2")
    assert f"resuming teacher store {killed}: {len(partial['shards'])}/{num_shards}" in out.stdout
    assert out.stdout.count("this run)") == num_shards - len(partial["shards"])
    assert _tree(killed) == _tree(full)
