"""Nested dict batches (issue 16, item 5): a dict of dicts of tensors as training and test data, and tokenised
examples whose fields are themselves dicts, give the same influence as the same data flat (1e-12)."""

from __future__ import annotations

import torch

import influencekit as ik
from influencekit.data.examples import Examples, pad_collate


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(2, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a(a) + self.b(b)


class NestedTask(ik.Task):
    """Cross-entropy of TwoInputs on a batch {"features": {"a": ..., "b": ...}, "y": ...}."""

    def loss(self, params, batch):
        out = torch.func.functional_call(self.model, params, (batch["features"]["a"], batch["features"]["b"]))
        return torch.nn.functional.cross_entropy(out, batch["y"], reduction="none") + 0.5 * self.l2 * sum(
            (p * p).sum() for p in params.values()
        )


class FlatTask(ik.Task):
    """The same objective on a batch (a, b, y)."""

    def loss(self, params, batch):
        a, b, y = batch
        out = torch.func.functional_call(self.model, params, (a, b))
        return torch.nn.functional.cross_entropy(out, y, reduction="none") + 0.5 * self.l2 * sum(
            (p * p).sum() for p in params.values()
        )


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, 3, dtype=torch.float64, generator=g), torch.randn(n, 2, dtype=torch.float64, generator=g)
    y = (a[:, 0] + b[:, 1] > 0).long() + (a[:, 1] > 1).long()
    return a, b, y


def test_nested_dict_data_equals_the_flat_data():
    torch.manual_seed(0)
    model = TwoInputs().double()
    a, b, y = _data(120, 0)
    ta, tb, ty = _data(10, 1)
    flat = FlatTask(model, l2=1e-2)
    ik.fit_lbfgs(flat, (a, b, y))
    nested = NestedTask(model, l2=1e-2)
    s_flat = ik.Influence(flat, (a, b, y), solver="exact").fit().scores((ta, tb, ty)).values
    s_nested = (
        ik.Influence(nested, {"features": {"a": a, "b": b}, "y": y}, solver="exact")
        .fit()
        .scores({"features": {"a": ta, "b": tb}, "y": ty})
        .values
    )
    assert float((s_nested - s_flat).abs().max() / s_flat.abs().max()) < 1e-12


def test_tokenised_examples_with_nested_fields_are_padded_recursively():
    items = [
        {"enc": {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, "labels": 1, "text": "raw"},
        {"enc": {"input_ids": [8], "attention_mask": [1]}, "labels": 0, "text": "raw"},
    ]
    batch = pad_collate(items, pad_token_id=9)
    assert torch.equal(batch["enc"]["input_ids"], torch.tensor([[5, 6, 7], [8, 9, 9]]))
    assert torch.equal(batch["enc"]["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([1, 0])) and "text" not in batch
    data = Examples(items)
    assert len(data) == 2 and torch.equal(data.batch([1])["enc"]["input_ids"], torch.tensor([[8]]))


def test_nested_data_of_unequal_lengths_is_refused():
    import pytest

    with pytest.raises(ik.InputError, match=r"same number of examples .*Got lengths \[5, 4, 5\]"):
        Examples({"features": {"a": torch.zeros(5, 3), "b": torch.zeros(4, 2)}, "y": torch.zeros(5)})
