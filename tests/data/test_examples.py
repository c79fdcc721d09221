"""data/examples.py: the finiteness check's fast path (a finite sum) agrees with the per-entry check."""

import pytest
import torch

import influencekit as ik
from influencekit.data.examples import prepare_batch


def _prepare(x):
    return prepare_batch(
        (x, torch.zeros(len(x), dtype=torch.long)),
        name="train",
        offset=10,
        dtype=torch.float64,
        device=torch.device("cpu"),
    )


def test_finite_values_whose_sum_overflows_pass():
    x = torch.full((4, 3), 1e308, dtype=torch.float64)  # every entry finite, the sum is inf
    assert not bool(torch.isfinite(x.sum()))
    out, _ = _prepare(x)
    assert torch.equal(out, x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entries_are_named(bad):
    x = torch.ones(5, 3, dtype=torch.float64)
    x[3, 1] = bad
    with pytest.raises(
        ik.InputError, match=r"`train` must hold only finite values\. Got NaN/inf in example\(s\) \[13\]"
    ):
        _prepare(x)
