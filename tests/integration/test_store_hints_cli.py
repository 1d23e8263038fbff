"""Teacher-store hints that work when followed literally, through the real CLI: settings a store records are read
from its manifest (a store-fed run, a repair), and every printed command works when pasted."""

import json
import shlex

from cli_helpers import stillroom

QUIET = ["eval.before=false", "eval.generations=0", "train.steps=2"]


def _printed_command(stderr: str) -> list[str]:
    """The words of the `stillroom ...` command the error output ends with (as a shell would split them)."""
    line = next((line for line in reversed(stderr.splitlines()) if ": stillroom " in line), None)
    assert line is not None, f"no full command printed:\n{stderr}"
    words = shlex.split(line.split(": ", 1)[1])
    assert words[0] == "stillroom"
    return words[1:]


def test_a_store_run_takes_k_and_dtype_from_the_store_and_logs_it(recipe_factory, tmp_path):
    store = tmp_path / "store"
    recipe = recipe_factory()
    at = f"teacher.store.path={store}"
    stillroom("cache-teacher", str(recipe), at, "teacher.store.k=8", "teacher.store.logprob_dtype=int8")
    positions = json.loads((store / "manifest.json").read_text())["tokens"]

    proc = stillroom("run", str(recipe), at, "teacher.source=store", "name=a", *QUIET)  # k, dtype left at defaults
    assert f"teacher: store {store} (k=8, int8, {positions} positions)" in proc.stdout
    assert "teacher.store.k and teacher.store.logprob_dtype read from its manifest" in proc.stdout

    # Only an explicit, different value is a mismatch; the printed command rebuilds the store for the run.
    mismatch = [at, "teacher.source=store", "teacher.store.k=16", "name=b"]
    proc = stillroom("run", str(recipe), *mismatch, *QUIET, check=False)
    assert proc.returncode == 1 and "k (store 8, run 16)" in proc.stderr
    command = _printed_command(proc.stderr)
    assert command == ["cache-teacher", str(recipe), at, "teacher.store.k=16", "name=b", *QUIET, "--overwrite"]
    stillroom(*command)
    proc = stillroom("run", str(recipe), *mismatch, *QUIET)
    assert f"teacher: store {store} (k=16, float16, {positions} positions)" in proc.stdout


def test_a_corrupted_shard_is_repaired_by_the_command_as_printed(recipe_factory, tmp_path):
    store = tmp_path / "store"
    recipe = recipe_factory()
    at = f"teacher.store.path={store}"
    stillroom("cache-teacher", str(recipe), at, "teacher.store.shard_tokens=1024", "teacher.store.k=4")
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["num_shards"] >= 2
    for entry in manifest["shards"][1:]:  # same size, other bytes: found by the sha256 check when read
        shard = store / entry["file"]
        shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 0xFF]))

    # The run repeats k (a run never needs shard_tokens): the printed command lacks the store's shard_tokens.
    run = [at, "teacher.source=store", "teacher.store.k=4"]
    proc = stillroom("run", str(recipe), *run, "name=a", *QUIET, check=False)
    assert proc.returncode == 1 and "fails its sha256 check" in proc.stderr
    command = _printed_command(proc.stderr)
    assert command == ["cache-teacher", str(recipe), at, "teacher.store.k=4", "name=a", *QUIET]
    out = stillroom(*command).stdout
    assert "teacher.store.shard_tokens=1024 read from its manifest" in out
    assert f"resuming teacher store {store}: 1/{manifest['num_shards']} shards done" in out
    assert "OK" in stillroom("verify-store", str(store)).stdout
    stillroom("run", str(recipe), *run, "name=b", *QUIET)
