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
