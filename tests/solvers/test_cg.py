"""Block CG's options: a preconditioner (K-FAC/EK-FAC or any fitted solver) and the stopping rule set by the scores.

References: the dense inverse of H + δI in float64 on a tanh MLP (non-convex: EK-FAC is only an approximation of
its Gauss-Newton part) and on the digits logistic regression."""

import pytest
import torch

import influencekit as ik
from influencekit.data import Examples
from influencekit.engine.hessian import HessianOperator
from problems import digits_mlp


@pytest.fixture(scope="module")
def mlp_operator(digits_small):
    X, y = digits_small.train
    task = digits_mlp((X, y))
    op = HessianOperator(task, task.params(), Examples((X, y)), damping=0.01, batch_size=300, tangent_block=128)
    A = op.damp_matrix(op.dense())
    return task, op, A


@pytest.fixture(scope="module")
def mlp_rhs(mlp_operator):
    return torch.randn(5, mlp_operator[1].n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("preconditioner", ["ekfac", "kfac"])
def test_preconditioned_cg_solves_to_the_residual_rule(mlp_operator, mlp_rhs, preconditioner):
    """Preconditioning changes the iterations, not the answer: relative error to the dense inverse below 1e-7
    (rtol 1e-10 on the residual of H + δI itself, not of the preconditioned system)."""
    task, op, A = mlp_operator
    solver = ik.CGSolver(rtol=1e-10, preconditioner=preconditioner)
    solver.check_task(task)
    x, report = solver.fit(op).solve(mlp_rhs)
    expected = torch.linalg.solve(A, mlp_rhs.T).T
    assert float((x - expected).norm() / expected.norm()) < 1e-7
    assert report.converged and report.relative_residual < 1e-9
    assert report.details["method"] == f"breakdown-free block CG, preconditioned by {preconditioner}"


def test_a_preconditioner_named_from_the_registry_by_capability(mlp_operator, mlp_rhs):
    """'exact' by name (any registered approximate inverse is accepted by name): one iteration, as the instance."""
    _, op, A = mlp_operator
    x, report = ik.CGSolver(preconditioner="exact").fit(op).solve(mlp_rhs)
    assert report.iterations == 1 and report.relative_residual < 1e-11
    assert float((x - torch.linalg.solve(A, mlp_rhs.T).T).norm() / x.norm()) < 1e-11


def test_an_exact_preconditioner_converges_in_one_iteration(mlp_operator, mlp_rhs):
    """M⁻¹ = (H + δI)⁻¹: Z = the exact error, so the first step lands on the solution (residual ~1e-14)."""
    _, op, A = mlp_operator
    x, report = ik.CGSolver(preconditioner=ik.ExactSolver()).fit(op).solve(mlp_rhs)
    assert report.iterations == 1 and report.relative_residual < 1e-11
    assert float((x - torch.linalg.solve(A, mlp_rhs.T).T).norm() / x.norm()) < 1e-11


def test_score_rtol_stops_earlier_with_scores_within_the_stated_tolerance(mlp_operator, mlp_rhs, digits_small):
    """With score_rtol 1e-4 every right-hand side stops by that rule, in fewer iterations than the residual rule at
    1e-8, and the scores gᵀx over all training gradients stay within 1e-3 relative (Frobenius) of the exact ones."""
    task, op, A = mlp_operator
    X, y = digits_small.train
    rows = []  # every 25th training example's gradient, by plain autograd
    for i in range(0, len(y), 25):
        params = {k: v.detach().requires_grad_(True) for k, v in task.params().items()}
        loss = task.loss(params, (X[i : i + 1], y[i : i + 1])).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))]))
    G = torch.stack(rows)
    exact = torch.linalg.solve(A, mlp_rhs.T).T @ G.T
    full_x, full = ik.CGSolver(rtol=1e-8).fit(op).solve(mlp_rhs)
    x, loose = ik.CGSolver(rtol=1e-8, score_rtol=1e-4).fit(op).solve(mlp_rhs)
    assert loose.details["stopped_by_scores"] == 5 and loose.iterations < full.iterations, (loose, full)
    assert float((x @ G.T - exact).norm() / exact.norm()) < 1e-3
    assert len(loose.details["relative_residuals"]) == 5 and loose.relative_residual == max(
        loose.details["relative_residuals"]
    )
    assert full.details["stopped_by_scores"] == 0


@pytest.mark.parametrize(
    "value, error, message",
    [
        (
            "jacobi",
            ik.InputError,
            r"`preconditioner` must be None, one of 'exact', 'arnoldi', 'kfac', 'ekfac' or a Solver instance\. "
            r"Got 'jacobi'\.",
        ),
        ("lissa", ik.InputError, r"one of 'exact', 'arnoldi', 'kfac', 'ekfac' or a Solver instance\. Got 'lissa'"),
        (3, ik.InputTypeError, r"`preconditioner` must be None, one of .* or a Solver instance\. Got int\."),
        (
            ik.CGSolver(),
            ik.InputError,
            r"must be a direct approximate inverse \(exact, arnoldi, kfac, ekfac\), not "
            r"an iterative cg solver",
        ),
        (ik.LissaSolver(), ik.InputError, r"not an iterative lissa solver"),
    ],
)
def test_a_bad_preconditioner_is_refused_at_construction(value, error, message):
    with pytest.raises(error, match=message):
        ik.CGSolver(preconditioner=value)


def test_an_ekfac_preconditioner_checks_the_task_when_the_influence_is_built(digits_small):
    """A task K-FAC cannot sample labels for is refused by Influence(...), before any pass over the data."""

    class OwnTask(ik.Task):
        def __init__(self, model):
            super().__init__(model)

        def loss(self, params, batch):
            X, y = batch
            out = torch.func.functional_call(self.model, params, (X,))
            return torch.nn.functional.cross_entropy(out, y, reduction="none")

    task = OwnTask(torch.nn.Linear(64, 10).double())
    with pytest.raises(
        ik.UnsupportedError,
        match=r"CG's preconditioner 'ekfac' cannot work with this task: the kfac/ekfac solvers "
        r"need .*Got OwnTask.*leave the preconditioner out",
    ):
        ik.Influence(task, digits_small.train, solver="cg", solver_options={"preconditioner": "ekfac"})


@pytest.mark.parametrize("rtol", [1e-4, 1e-10])
def test_the_reported_residuals_are_the_true_ones_without_the_extra_products(mlp_operator, mlp_rhs, rtol):
    """The recursion's residuals (the default) match ‖v − (H + δI)x‖/‖v‖ from the dense matrix to 1e-6 relative
    (round-off of a few iterations in float64), and check_residuals computes them with one more product per
    right-hand side, reported in ``hvps``."""
    _, op, A = mlp_operator
    x, report = ik.CGSolver(rtol=rtol).fit(op).solve(mlp_rhs)
    true = (mlp_rhs - x @ A).norm(dim=1) / mlp_rhs.norm(dim=1)
    recursive = torch.tensor(report.details["relative_residuals"], dtype=torch.float64)
    assert torch.allclose(recursive, true, rtol=1e-6, atol=1e-14)
    assert report.details["residuals"] == "the recursion's"
    x_checked, checked = ik.CGSolver(rtol=rtol, check_residuals=True).fit(op).solve(mlp_rhs)
    assert torch.allclose(x_checked, x, rtol=0, atol=0)
    assert torch.allclose(torch.tensor(checked.details["relative_residuals"], dtype=torch.float64), true, rtol=1e-6)
    assert checked.hvps == report.hvps + len(mlp_rhs)
