import pytest
import torch

from problems import digits_logistic


@pytest.fixture(scope="session")
def digits():
    """Logistic regression on 1,200 digits, trained to ‖∇R‖ < 1e-10, with its closed-form reference."""
    torch.set_default_dtype(torch.float32)
    return digits_logistic()


@pytest.fixture(scope="session")
def digits_small():
    """The same on 300 training digits (faster solver batteries)."""
    return digits_logistic(n_train=300)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded (torch), restoring the setting afterwards: many small solves on a busy
    2-core machine are faster and steadier on one thread, and results do not depend on it beyond round-off.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
