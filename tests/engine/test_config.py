"""Chunk sizes from the memory budget (engine.config.plan_chunks): the cap on a vectorised HVP's right-hand sides."""

import torch

import influencekit as ik
from influencekit.core.autodiff import input_size_per_example
from influencekit.engine.config import VMAP_TENSOR_BYTES, plan_chunks


def _mlp_task() -> tuple[ik.ClassificationTask, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)).double()
    X, y = torch.randn(1200, 64, dtype=torch.float64), torch.randint(0, 10, (1200,))
    return ik.ClassificationTask(model, l2=1e-3), (X, y)


def test_hvp_tangent_blocks_stay_under_the_vectorised_tensor_cap():
    """The digits-MLP shape (1,200 examples, 266 activation values each, float64): the 2 GiB budget alone would
    allow 110 tangents per call; the cap allows the most whose (tangents × examples × activations) values fit
    32 MiB: 13."""
    task, (X, y) = _mlp_task()
    params = task.params()
    first = (X[:1], y[:1])
    act = input_size_per_example(task.loss, params, first, task.model)
    chunks = plan_chunks(task, params, first, len(y), batch_size=None, memory_budget=2 * 2**30)
    assert chunks.hvp == 1200 and act == 266
    per_tangent = 8 * chunks.hvp * act
    assert chunks.tangents == VMAP_TENSOR_BYTES // per_tangent == 13
    assert chunks.tangents * per_tangent <= VMAP_TENSOR_BYTES < (chunks.tangents + 1) * per_tangent


def test_a_small_budget_still_binds_and_one_tangent_is_the_floor():
    """At 64 MiB the budget, not the cap, sets the tangents (each carries 6 copies of a chunk's activations and a
    gradient); at 1 MiB one tangent per call remains."""
    task, (X, y) = _mlp_task()
    params = task.params()
    first = (X[:1], y[:1])
    act, p = input_size_per_example(task.loss, params, first, task.model), sum(t.numel() for t in params.values())
    small = plan_chunks(task, params, first, len(y), batch_size=None, memory_budget=64 * 2**20)
    by_budget = 64 * 2**20 // (8 * 6 * (small.hvp * act + p))
    assert small.tangents == by_budget < VMAP_TENSOR_BYTES // (8 * small.hvp * act)
    many = plan_chunks(task, params, first, len(y), batch_size=1200, memory_budget=2 * 2**30)
    assert many.tangents == 13  # batch_size sets the examples, the cap still the tangents
    tiny = plan_chunks(task, params, first, len(y), batch_size=None, memory_budget=2**20)
    assert tiny.tangents == 1
