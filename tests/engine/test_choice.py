"""Choosing between solvers by estimated cost (``Influence.choose_solver``): the CG pilot measures the block
iterations the full solve then takes, the choice follows the sizes (many queries on a closed-form Hessian: exact;
a few queries on a network: CG), a refused solver is never chosen, and bad input is refused."""

from __future__ import annotations

import pytest

import influencekit as ik
from influencekit.core.errors import InputError, InputTypeError, NumericalError
from influencekit.data.bundled import load_digits_split
from problems import digits_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlp():
    """A tanh MLP 64-32-10 (2,410 parameters) trained by L-BFGS on 600 digits, and 300 test digits."""
    (X, y), (Xt, yt) = load_digits_split(600, seed=0)
    return digits_mlp((X, y), hidden=32), (X, y), (Xt[:300], yt[:300])


@pytest.mark.parametrize("n_test", [5, 300])
def test_pilot_measures_the_block_iterations_of_the_full_solve(mlp, n_test):
    task, train, test = mlp
    inf = ik.Influence(task, train, solver="cg", damping=1e-2, stationarity_tol=None)
    queries = (test[0][:n_test], test[1][:n_test])
    choice = inf.choose_solver(queries)
    pilot = int(choice.candidate("cg").basis.split("pilot: ")[1].split()[0])
    full = inf.fit().scores(queries).metadata["solve_reports"][0]["iterations"]
    # the pilot solves on 256 of the 600 examples; measured equal (25 and 6 iterations). Allowed: 30% or 2 apart
    assert abs(pilot - full) <= max(2, 0.3 * full), (pilot, full)


def test_few_queries_on_a_network_choose_cg(mlp):
    task, train, test = mlp
    choice = ik.Influence(task, train, damping=1e-2, stationarity_tol=None).choose_solver((test[0][:5], test[1][:5]))
    assert choice.solver == "cg"
    exact, cg = choice.candidate("exact"), choice.candidate("cg")
    # exact assembles H from p = 2,410 HVPs; CG at 5 queries needs 5 × (about 25) of them
    assert exact.seconds > 3 * cg.seconds
    assert "p·n·τ_H" in exact.basis
    assert "cg" in str(choice) and "chosen: cg" in str(choice)


def test_many_queries_on_a_closed_form_hessian_choose_exact(digits_small):
    d = digits_small
    choice = ik.Influence(d.task, d.train, solver="cg").choose_solver(d.test)
    assert choice.solver == "exact"
    exact = choice.candidate("exact")
    assert "closed form" in exact.basis
    assert exact.seconds < choice.candidate("cg").seconds


def test_a_refused_solver_is_never_chosen(digits_small):
    d = digits_small
    small_exact = ik.solvers.ExactSolver(max_params=100)
    choice = ik.Influence(d.task, d.train).choose_solver(d.test, candidates=(small_exact, "cg"))
    assert choice.solver == "cg"
    assert "max_params" in choice.candidate("exact").refused
    assert small_exact.operator_ is None  # the user's instance is not fitted by the pilot or the probe
    with pytest.raises(InputError, match="none of the candidate solvers"):
        ik.Influence(d.task, d.train).choose_solver(d.test, candidates=(small_exact,))


def test_bad_input_is_refused(digits_small):
    d = digits_small
    inf = ik.Influence(d.task, d.train)
    with pytest.raises(InputError, match="at least one solver"):
        inf.choose_solver(d.test, candidates=())
    with pytest.raises(InputError, match="unknown solver 'newton'"):
        inf.choose_solver(d.test, candidates=("exact", "newton"))
    with pytest.raises(InputTypeError, match="solver names or unfitted Solver"):
        inf.choose_solver(d.test, candidates=(3,))
    with pytest.raises(InputError, match="at least one example"):
        inf.choose_solver((d.test[0][:0], d.test[1][:0]))
    with pytest.raises(InputError, match="`train` must hold at least one example"):
        ik.Influence(d.task, (d.train[0][:0], d.train[1][:0])).choose_solver(d.test)
    with pytest.raises(InputError, match="pilot_examples"):
        inf.choose_solver(d.test, pilot_examples=0)


class _CurvedBelow(ik.solvers.CGSolver):
    """CG that meets negative curvature on fewer than ``examples`` training examples (as a random subsample's
    Hessian can where the whole one has none)."""

    def __init__(self, examples: int) -> None:
        super().__init__()
        self.examples = examples

    def _fit(self, operator):
        if len(operator.data) < self.examples:
            raise NumericalError("CG met negative curvature (test)")
        super()._fit(operator)


def test_the_pilot_doubles_its_examples_after_negative_curvature(mlp):
    task, train, test = mlp
    inf = ik.Influence(task, train, damping=1e-2, stationarity_tol=None)
    choice = inf.choose_solver(test, candidates=(_CurvedBelow(400), "exact"))
    assert "on 512 training examples" in choice.candidate("cg").basis  # 256 failed, 512 ran
    choice = inf.choose_solver(test, candidates=(_CurvedBelow(600), "exact"))
    assert "on 600 training examples" in choice.candidate("cg").basis  # 256, 512 failed: the whole training set
    choice = inf.choose_solver(test, candidates=(_CurvedBelow(10**6), "exact"))
    assert choice.solver == "exact"
    assert "fails on the whole training set" in choice.candidate("cg").refused
