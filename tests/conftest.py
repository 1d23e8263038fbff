import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models run fastest on one thread (thread start-up dominates their matmuls);
# tests that use the real teacher set their own thread count.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``gpu`` where no CUDA device is usable; ``-ra`` prints the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device, torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    from helpers import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "model")
