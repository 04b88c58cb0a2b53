import os

import pytest
import torch

# Tests share one dataset cache (embedded sets are converted once) and never touch ~/.cache.
os.environ.setdefault("CLTOOLBOX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "data"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_config():
    """A config that trains in well under a second on digits."""
    return {
        "name": "tiny",
        "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": [32]},
        "strategy": {"name": "naive"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "seeds": [0],
    }


@pytest.fixture
def one_thread():
    """One torch thread for the duration of a test: batch-10 steps of small MLPs gain nothing from a second
    thread, and two threads spin-wait badly when the cores are shared (measured 5-10x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
