"""Lanczos and power iteration against eigh of an explicit MLP Hessian (optax's test, in torch)."""

import pytest
import torch

import influencekit as ik
from influencekit.data import Examples
from influencekit.engine.hessian import HessianOperator
from problems import small_mlp


@pytest.fixture(scope="module")
def mlp_operator():
    torch.manual_seed(0)
    X = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    task = ik.ClassificationTask(small_mlp(), l2=0.0)  # untrained: an indefinite Hessian
    op = HessianOperator(task, task.params(), Examples((X, y)), damping=0.0, batch_size=40, tangent_block=64)
    return op, torch.linalg.eigvalsh(op.dense())


def test_lanczos_finds_both_extremes(mlp_operator):
    op, evals = mlp_operator
    lo, hi = ik.lanczos_extremes(op.matvec, op.n_params, steps=53)
    assert evals[0] < 0  # the untrained MLP has negative curvature: the check below is meaningful
    assert lo == pytest.approx(float(evals[0]), rel=1e-6)
    assert hi == pytest.approx(float(evals[-1]), rel=1e-6)
    lo20, hi20 = ik.lanczos_extremes(op.matvec, op.n_params, steps=20)
    # Ritz values lie inside the spectrum and the top one converges first
    assert float(evals[0]) - 1e-12 <= lo20 and hi20 <= float(evals[-1]) + 1e-12
    assert hi20 == pytest.approx(float(evals[-1]), rel=1e-3)


def test_power_iteration_finds_the_dominant_eigenvalue(mlp_operator):
    op, evals = mlp_operator
    dominant = float(evals[torch.argmax(evals.abs())])
    assert ik.power_iteration(op.matvec, op.n_params, iters=500, rtol=1e-10) == pytest.approx(dominant, rel=1e-4)


def test_exact_solver_warns_on_negative_curvature_with_a_damping_that_works(mlp_operator):
    op, evals = mlp_operator
    with pytest.warns(ik.CurvatureWarning, match=r"use damping >= ([0-9.e-]+)") as record:
        ik.ExactSolver().fit(op)
    suggested = float(str(record[0].message).split("damping >= ")[1].split(" ")[0])
    assert suggested + float(evals[0]) > 0


def test_influence_eigenvalue_range_warns_and_suggests_a_damping_that_works():
    torch.manual_seed(0)
    X = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    task = ik.ClassificationTask(small_mlp(), l2=0.0)
    with pytest.warns(ik.StationarityWarning):
        inf = ik.Influence(task, (X, y), solver="cg").fit()
    evals = torch.linalg.eigvalsh(inf.operator_.dense())
    with pytest.warns(ik.CurvatureWarning, match=r"use damping >= ([0-9.e-]+)") as record:
        lo, hi = inf.eigenvalue_range(steps=53)
    assert lo == pytest.approx(float(evals[0]), rel=1e-6) and hi == pytest.approx(float(evals[-1]), rel=1e-6)
    suggested = float(str(record[0].message).split("damping >= ")[1].split(" ")[0])
    assert suggested + float(evals[0]) > 0
