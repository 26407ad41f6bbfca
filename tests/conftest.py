import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models: a second one only adds OpenMP spinning, and on a loaded
    2-core machine it made some of these tests 20-100x slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
