import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


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


def stillroom(*args: str, check: bool = True, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    import os

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "stillroom.cli.main", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stillroom {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def recipe_factory(tmp_path, tiny_teacher_dir):
    return lambda **sections: tiny_recipe(tmp_path, tiny_teacher_dir, **sections)
