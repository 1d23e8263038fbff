import pytest
import torch
from helpers import tiny_llama


@pytest.fixture
def llama(tok):
    """A 4-layer random Llama (tied head), fresh per test."""
    return tiny_llama(len(tok), layers=4, seed=0)


@pytest.fixture
def ids_bt(tok):
    torch.manual_seed(1)
    return torch.randint(0, len(tok), (2, 12))
