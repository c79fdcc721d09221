"""One battery over every solver, plus each solver against its exact reference."""

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

import influencekit as ik
from influencekit.data import Examples
from influencekit.engine.hessian import HessianOperator
from problems import relative_error

# solver factory, and the relative error to the exact inverse the solver promises on its battery problem
SOLVERS = {
    "exact": (lambda: ik.ExactSolver(), 1e-10),
    "cg": (lambda: ik.CGSolver(rtol=1e-10), 1e-7),
    # damping 0.05 keeps the recursion short: rate 1 − 0.05/scale per step
    # batch_size = n: the deterministic full-Hessian recursion; 300 steps at rate ≈ 1 − 0.05/0.6 reach 1e-11
    "lissa": (lambda: ik.LissaSolver(depth=300, batch_size=300, warn=False), 1e-8),
    # full rank: the Lanczos basis spans the whole space (measured 1.4e-13 relative)
    "arnoldi": (lambda: ik.ArnoldiSolver(rank=650), 1e-9),
    # on a one-output linear regression the Gauss-Newton matrix is S ⊗ A with S a scalar: exact (measured ~1e-14);
    # the residual probe on all examples (its default subsample of 64 measures the subsample's own Hessian: 0.75)
    "kfac": (lambda: ik.solvers.KFACSolver(fisher="expected", probes=2, probe_examples=None), 1e-10),
    "ekfac": (lambda: ik.solvers.EKFACSolver(fisher="expected", probes=2, probe_examples=None), 1e-10),
}
KRONECKER = ("kfac", "ekfac")  # their battery problem: where they are exact (the others': the digits logistic)


def digits_regression(dtype):
    """A one-output linear regression on 200 digits (l2 1e-2, damping 0.05): K-FAC and EK-FAC are exact on it."""
    (X, y), _ = ik.data.load_digits_split(200, seed=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1).to(dtype)
    task = ik.RegressionTask(model, l2=1e-2)
    data = Examples((X.to(dtype), (y.to(dtype) / 9.0)))
    return HessianOperator(task, task.params(), data, damping=0.05, batch_size=200, tangent_block=256)


@pytest.fixture(scope="module")
def logistic_operator(digits_small):
    X, y = digits_small.train
    return HessianOperator(
        digits_small.task, digits_small.task.params(), Examples((X, y)), damping=0.05, batch_size=300, tangent_block=256
    )


@pytest.fixture(scope="module")
def regression_operator():
    return digits_regression(torch.float64)


@pytest.fixture
def problem(request, logistic_operator, regression_operator):
    """(operator, dense H + δI, right-hand sides) of the battery problem of solver ``request.param``."""
    op = regression_operator if request.param in KRONECKER else logistic_operator
    H = op.dense()
    dense = H + 0.05 * torch.eye(H.shape[0], dtype=H.dtype)
    rhs = torch.randn(6, op.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return op, dense, rhs


# the tests below that take `operator`/`dense`/`rhs` are about the digits logistic regression only
@pytest.fixture(scope="module")
def operator(logistic_operator):
    return logistic_operator


@pytest.fixture(scope="module")
def dense(operator):
    H = operator.dense()
    return H + 0.05 * torch.eye(H.shape[0], dtype=H.dtype)


@pytest.fixture(scope="module")
def rhs(digits_small):
    return torch.randn(6, 650, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


battery = pytest.mark.parametrize("name, problem", [(n, n) for n in SOLVERS], indirect=["problem"])


@battery
def test_fit_returns_self_and_solve_before_fit_errors(name, problem):
    op = problem[0]
    solver = SOLVERS[name][0]()
    with pytest.raises(ik.NotFittedError, match=r"not fitted yet\. Call fit\(operator\)"):
        solver.solve(torch.zeros(1, op.n_params, dtype=torch.float64))
    assert solver.fit(op) is solver


@battery
def test_agrees_with_dense_inverse_within_stated_tolerance(name, problem):
    op, dense, rhs = problem
    factory, tol = SOLVERS[name]
    x, report = factory().fit(op).solve(rhs)
    expected = torch.linalg.solve(dense, rhs.T).T
    assert relative_error(x, expected) < tol
    assert report.solver == name and report.n_rhs == 6
    assert report.relative_residual < 1e-8
    assert report.converged


@battery
def test_batched_solve_equals_column_by_column(name, problem):
    op, _, rhs = problem
    factory, tol = SOLVERS[name]
    solver = factory().fit(op)
    batched = solver.solve(rhs).x
    columns = torch.stack([solver.solve(rhs[j]).x for j in range(len(rhs))])
    if name == "cg":
        # block CG shares its Krylov space across right-hand sides: the same answer within the stated
        # tolerance, not the same round-off (and in fewer iterations)
        assert relative_error(batched, columns) < tol
        assert solver.solve(rhs).report.iterations < max(
            solver.solve(rhs[j]).report.iterations for j in range(len(rhs))
        )
    else:
        torch.testing.assert_close(batched, columns, rtol=1e-9, atol=1e-12)


@battery
def test_a_saved_state_loads_into_a_fresh_solver_and_solves_the_same(name, problem):
    """state_dict() -> a new instance's load_state_dict(operator, state): the same solution, bit for bit (what
    ``Influence(cache_dir=)`` relies on); a solver with nothing worth keeping (CG) says None."""
    op, _, rhs = problem
    fitted = SOLVERS[name][0]().fit(op)
    state = fitted.state_dict()
    if name == "cg":
        assert state is None
        return
    loaded = SOLVERS[name][0]().load_state_dict(op, state)
    torch.testing.assert_close(loaded.solve(rhs).x, fitted.solve(rhs).x, rtol=0, atol=0)


@battery
def test_the_report_has_its_fields_and_capabilities_are_declared(name, problem):
    op, _, rhs = problem
    report = SOLVERS[name][0]().fit(op).solve(rhs[:2]).report
    fields = report.to_dict()
    assert {"solver", "iterations", "relative_residual", "converged", "n_rhs", "hvps", "seconds"} <= set(fields)
    assert fields["solver"] == name and fields["n_rhs"] == 2 and fields["seconds"] >= 0
    caps = ik.solvers.SOLVERS[name].capabilities
    assert isinstance(caps, ik.solvers.Capabilities) and caps.batched and caps.sharded


@pytest.mark.parametrize("name", SOLVERS)
def test_dtype_is_kept(name, digits_small):
    if name in KRONECKER:
        op = digits_regression(torch.float32)
    else:
        X, y = digits_small.train
        model32 = torch.nn.Linear(64, 10)
        model32.load_state_dict({k: v.float() for k, v in digits_small.model.state_dict().items()})
        task = ik.ClassificationTask(model32, l2=1e-3)
        op = HessianOperator(
            task, task.params(), Examples((X.float(), y)), damping=0.05, batch_size=300, tangent_block=256
        )
    solver = SOLVERS[name][0]()
    if name == "cg":
        solver = ik.CGSolver()  # the float32 default rtol (1e-5)
    x, report = solver.fit(op).solve(torch.ones(2, op.n_params))
    assert x.dtype == torch.float32
    assert report.relative_residual < 1e-2


def test_solution_is_a_namedtuple_with_report_fields(operator, rhs):
    solution = ik.CGSolver().fit(operator).solve(rhs)
    x, report = solution
    assert x is solution.x
    assert set(report.to_dict()) >= {
        "solver",
        "iterations",
        "relative_residual",
        "converged",
        "n_rhs",
        "hvps",
        "seconds",
    }


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: ik.CGSolver(rtol=0.0), r"`rtol` must be a float in \(0, 1\]\. Got 0\.0"),
        (lambda: ik.CGSolver(max_iter=0), r"`max_iter` must be an int in \[1, inf\]\. Got 0"),
        (lambda: ik.LissaSolver(depth=0), r"`depth` must be an int in \[1, inf\]\. Got 0"),
        (lambda: ik.LissaSolver(scale=-1.0), r"`scale` must be a float in \(0, inf\]\. Got -1\.0"),
        (lambda: ik.LissaSolver(scale_margin=0.5), r"`scale_margin` must be a float in \[1, inf\]\. Got 0\.5"),
        (lambda: ik.ExactSolver(max_params=0), r"`max_params` must be an int in \[1, inf\]\. Got 0"),
        (lambda: ik.ArnoldiSolver(rank=0), r"`rank` must be an int in \[1, inf\]\. Got 0"),
        (
            lambda: ik.solvers.KFACSolver(fisher="true"),
            r"`fisher` must be one of 'auto', 'sampled', 'expected', 'empirical'\. Got 'true'",
        ),
        (lambda: ik.solvers.EKFACSolver(samples=0), r"`samples` must be an int in \[1, inf\]\. Got 0"),
    ],
)
def test_bad_hyper_parameters_give_the_documented_message(factory, message):
    with pytest.raises(ik.InputError, match=message):
        factory()


# ---------------------------------------------------------------- each solver against its reference
def test_cg_matches_scipy_cg(operator, dense, rhs):
    A = dense.numpy()
    x, report = ik.CGSolver(rtol=1e-6).fit(operator).solve(rhs[:1])
    counter = {"n": 0}

    def count(_):
        counter["n"] += 1

    expected, info = scipy.sparse.linalg.cg(A, rhs[0].numpy(), rtol=1e-6, atol=0.0, maxiter=1000, callback=count)
    assert info == 0
    # same stopping rule, same recursion: the same iterate after the same number of iterations
    assert report.iterations == counter["n"]
    np.testing.assert_allclose(x[0].numpy(), expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())


def test_cg_warns_when_max_iter_is_too_small(operator, rhs):
    with pytest.warns(
        ik.ConvergenceWarning,
        match=r"CG stopped after max_iter=3 iterations.*Raise `solver_options=\{'max_iter': 6\}`, or raise "
        r"`damping` if "
        r"H is ill-conditioned\.",
    ):
        _, report = ik.CGSolver(max_iter=3).fit(operator).solve(rhs)
    assert not report.converged and report.iterations == 3


def test_exact_eigenvalues_match_numpy(operator, dense):
    solver = ik.ExactSolver().fit(operator)
    np.testing.assert_allclose(
        solver.eigenvalues_.numpy() + 0.05, np.linalg.eigvalsh(dense.numpy()), rtol=1e-9, atol=1e-12
    )
    G = torch.randn(4, 650, dtype=torch.float64)
    expected = torch.einsum("ij,ji->i", G, torch.linalg.solve(dense, G.T))
    torch.testing.assert_close(solver.quadratic_form(G), expected, rtol=1e-9, atol=1e-12)


def test_lissa_automatic_scale_exceeds_the_top_eigenvalue(operator, dense):
    solver = ik.LissaSolver(depth=10, warn=False).fit(operator)
    top = float(torch.linalg.eigvalsh(dense)[-1])
    assert solver.lambda_max_ == pytest.approx(top, rel=1e-2)  # Lanczos, 20 steps
    assert solver.scale_ >= 1.2 * solver.lambda_max_


def test_lissa_repeats_are_averaged(operator, dense, rhs):
    one = ik.LissaSolver(depth=200, batch_size=32, repeats=1, warn=False, seed=1).fit(operator).solve(rhs).x
    many = ik.LissaSolver(depth=200, batch_size=32, repeats=8, warn=False, seed=1).fit(operator).solve(rhs).x
    full = ik.LissaSolver(depth=200, batch_size=300, repeats=1, warn=False, seed=1).fit(operator).solve(rhs).x
    # averaging repeats shrinks the mini-batch noise towards the full-batch recursion
    assert relative_error(many, full) < relative_error(one, full)


def test_exact_cholesky_equals_eigh_and_falls_back_on_indefinite(operator, dense, rhs):
    """Cholesky (large models) and eigh give the same solve and quadratic form to 1e-9 relative; auto picks
    Cholesky above eigh_max_params; an indefinite H + δI falls back to eigh and its curvature warning."""
    eig = ik.ExactSolver(method="eigh").fit(operator)
    cho = ik.ExactSolver(eigh_max_params=100).fit(operator)  # 650 parameters > 100: Cholesky
    assert cho.factor_ is not None and cho.eigenvalues_ is None and eig.factor_ is None
    x_eig, r_eig = eig.solve(rhs)
    x_cho, r_cho = cho.solve(rhs)
    assert relative_error(x_cho, x_eig) < 1e-9 and r_cho.relative_residual < 1e-10
    assert r_cho.details["method"] == "cholesky" and r_eig.details["method"] == "eigh"
    G = torch.randn(3, operator.n_params, dtype=torch.float64)
    torch.testing.assert_close(cho.quadratic_form(G), eig.quadratic_form(G), rtol=1e-9, atol=1e-12)
    with pytest.raises(ik.InputError, match="method"):
        ik.ExactSolver(method="lu")


def test_exact_cholesky_falls_back_to_eigh_when_not_positive_definite():
    from problems import small_mlp

    torch.manual_seed(0)
    model = small_mlp()
    X, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # far from a minimum: H has negative eigenvalues
    task = ik.ClassificationTask(model)
    op = HessianOperator(task, task.params(), Examples((X, y)), damping=0.0, batch_size=40, tangent_block=64)
    evals = torch.linalg.eigvalsh(op.dense())
    assert float(evals.min()) < -1e-6
    with pytest.warns(ik.CurvatureWarning, match="negative eigenvalues"):
        solver = ik.ExactSolver(method="cholesky").fit(op)
    assert solver.factor_ is None and solver.eigenvalues_ is not None


def test_lissa_warning_names_the_knob_that_helps(operator, rhs):
    """Too shallow a recursion is told to raise depth (with the steps needed); a deep one whose residual is
    mini-batch noise is told to raise batch_size or repeats instead."""
    with pytest.warns(
        ik.ConvergenceWarning,
        match=r"converging, measured factor 0\.\d+ per step.*Raise `solver_options=\{'depth': \d+\}` \(reaches rtol at "
        r"the measured factor\)",
    ):
        ik.LissaSolver(depth=5, batch_size=10_000).fit(operator).solve(rhs[:2])
    with pytest.warns(
        ik.ConvergenceWarning,
        match=r"stalled.*mini-batch noise, which more depth does not remove: raise "
        r"`solver_options=\{'batch_size': \d+\}` \(now 4\) or `solver_options=\{'repeats': 4\}`",
    ):
        ik.LissaSolver(depth=3000, batch_size=4, rtol=1e-6).fit(operator).solve(rhs[:1])


def test_capabilities_are_typed_flags_and_the_set_spelling_is_converted_with_a_warning():
    caps = ik.solvers.KFACSolver.capabilities
    assert isinstance(caps, ik.solvers.Capabilities) and caps.tap_solve and caps.in_place and not caps.dense
    assert "tap_solve" in caps and "dense" not in caps and "no_such_flag" not in caps  # the former spelling answers
    assert ik.ExactSolver.capabilities.dense and not ik.CGSolver.capabilities.quadratic_form
    with pytest.warns(DeprecationWarning, match=r"Capabilities\(quadratic_form=True, sharded=True\)"):

        class OldStyle(ik.ExactSolver):
            capabilities = frozenset({"quadratic_form", "sharded"})

    assert OldStyle.capabilities == ik.solvers.Capabilities(quadratic_form=True, sharded=True, batched=False)
    with pytest.raises(ik.InputError, match=r"unknown solver capabilities \['fast'\]"):
        ik.solvers.Capabilities.of({"fast"})
