import os
import sys
from contextlib import ExitStack
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


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one intra-op thread, and a test that sets its own count (the real teacher's) does
    not pass it on: tiny models gain nothing from threads, and the suite shares 2 cores with other runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    from helpers import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "model")


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer (helpers.tiny_tokenizer: 320 tokens, a chat template), one per test module."""
    from helpers import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def loopback():
    """``loopback(app_or_handler)``: a server on a free 127.0.0.1 port in a daemon thread (loopback.serve:
    ``.url`` is its base URL, ending in /v1); every server it started is stopped after the test."""
    from loopback import serve

    with ExitStack() as stack:
        yield lambda target: stack.enter_context(serve(target))
