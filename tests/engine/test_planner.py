"""The dry-run planner: its memory figures equal the arrays the solvers allocate, its times are within a
factor of an actual fit, and bad input is refused with a message naming the argument."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

import influencekit as ik
from influencekit.core.errors import InputError, InputTypeError
from influencekit.data.bundled import load_digits_split

pytestmark = pytest.mark.usefixtures("one_thread")

MEMORY_RTOL = 0.01  # state bytes: the formulas count every fitted array, so only the scalars are left out
# estimated fit seconds within [actual / 10, actual · 10]: probe times on a busy 2-core machine swing up to 8x
# (measured), and a plan is for orders of magnitude
TIME_FACTOR = 10.0


def _mlp_task(
    n: int = 400, hidden: int = 16, conv: bool = False
) -> tuple[ik.ClassificationTask, tuple[torch.Tensor, torch.Tensor]]:
    (X, y), _ = load_digits_split(n, dtype=torch.float32)
    torch.manual_seed(0)
    if conv:
        model = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 8, 8)),
            torch.nn.Conv2d(1, 4, 3, padding=1),
            torch.nn.Tanh(),
            torch.nn.Flatten(),
            torch.nn.Linear(256, 10),
        )
    else:
        model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))
    return ik.ClassificationTask(model, l2=1e-3), (X, y)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _within(estimate: int, actual: int) -> bool:
    return abs(estimate - actual) <= MEMORY_RTOL * actual


def test_exact_state_is_the_dense_hessian_and_its_factor(digits_small):
    inf = ik.Influence(digits_small.task, digits_small.train, solver="exact")
    plan = inf.plan()
    p = plan.n_params
    assert plan.solver_state == 2 * p * p * 8 + p * 8  # float64 eig_dtype, whatever the model's dtype
    solver = inf.fit().solver_
    actual = _nbytes(solver.hessian_, solver.eigenvectors_, getattr(solver, "factor_", None), solver._inv)
    assert _within(plan.solver_state, actual), (plan.solver_state, actual)


def test_exact_cholesky_state():
    task, train = _mlp_task(300, hidden=40)  # 3,010 parameters > eigh_max_params: Cholesky
    inf = ik.Influence(task, train, solver="exact", damping=1.0)
    plan = inf.plan()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solver = inf.fit().solver_
    assert solver.factor_ is not None
    actual = _nbytes(solver.hessian_, solver.factor_)
    assert _within(plan.solver_state, actual), (plan.solver_state, actual)


def test_arnoldi_state_is_rank_by_n_params():
    task, train = _mlp_task()
    inf = ik.Influence(task, train, solver="arnoldi", damping=0.1, solver_options={"rank": 20})
    plan = inf.plan()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solver = inf.fit().solver_
    assert plan.solver_state == 20 * plan.n_params * 4
    assert _within(plan.solver_state, _nbytes(solver.eigenvectors_, solver._inv))


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
@pytest.mark.parametrize("conv", [False, True])
def test_kfac_state_is_the_factors(solver, conv):
    task, train = _mlp_task(200, conv=conv)
    inf = ik.Influence(task, train, solver=solver, damping=0.1, solver_options={"probes": 0})
    plan = inf.plan()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = inf.fit().solver_
    actual = sum(_nbytes(layer.A, layer.S, layer.QA, layer.QS, layer.eig) for layer in fitted.layers_) + _nbytes(
        fitted.diagonal_
    )
    assert _within(plan.solver_state, actual), (plan.solver_state, actual)


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_kfac_fit_memory_covers_the_arrays_at_the_eigendecompositions(solver, monkeypatch):
    """The fit's peak is after the eigendecompositions: the float64 factor sums, the eigenvectors and the float64
    eigenvalues at once (not the state the fit ends with, which is converted to the model's dtype)."""
    from influencekit.solvers import kfac

    task, train = _mlp_task(200, hidden=512)  # factors large enough to set the fit's peak (not a pass's taps)
    held: list[int] = []
    original = kfac._eigendecompose

    def counted(layers, dtype):
        original(layers, dtype)
        held.append(sum(_nbytes(layer.A, layer.S, layer.QA, layer.QS, layer.eig) for layer in layers))

    monkeypatch.setattr(kfac, "_eigendecompose", counted)
    inf = ik.Influence(task, train, solver=solver, damping=0.1, solver_options={"probes": 0})
    plan = inf.plan()
    held.clear()  # the probe's own fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf.fit()
    fit = plan.stage(f"fit: {solver}").memory - plan.n_params * 4  # without the copy of θ̂
    largest = 513 * 513  # the largest factor: A of Linear(512, 10) with its bias column
    eigh_bytes = 8 if solver == "kfac" else 4  # K-FAC decomposes in float64, EK-FAC of a float32 model in float32
    # the formula adds one factor's copy, eigenvectors and workspace (3 × the largest) to the arrays held
    assert held[0] <= fit <= held[0] + 3 * eigh_bytes * largest + MEMORY_RTOL * held[0], (fit, held[0])
    assert held[0] > 1.5 * plan.solver_state  # the float64 sums and eigenvalues: well above the kept state


def test_hvps_are_timed_only_for_solvers_that_make_them(monkeypatch):
    """A forward-over-reverse HVP of a whole transformer held 8 GB in a probe of 8 examples where EK-FAC makes
    none: the probe times HVPs only when a solver's cost asks for them."""
    from influencekit.engine import planner

    task, train = _mlp_task(100)
    calls: list[int] = []
    original = planner.choose_hvp

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(planner, "choose_hvp", counted)
    ekfac = ik.Influence(task, train, solver="ekfac", damping=0.1).plan(n_test=10)
    assert not calls and "tau_hvp" not in ekfac.probe and "HVP not timed" in str(ekfac)
    cg = ik.Influence(task, train, solver="cg", damping=0.1).plan(n_test=10)
    assert len(calls) == 1 and cg.probe["tau_hvp"] > 0 and "ms/example with one tangent" in str(cg)
    probed = ik.Influence(task, train, solver="ekfac", damping=0.1, solver_options={"probes": 2}).plan(n_test=10)
    assert len(calls) == 2 and probed.probe["tau_hvp"] > 0  # EK-FAC's residual probes are HVPs


def _best_fit_seconds(inf: ik.Influence, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inf.fit()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize(
    "solver,options,damping",
    [
        ("exact", {}, 0.0),
        ("arnoldi", {"rank": 30}, 0.1),
        ("ekfac", {"probes": 2}, 0.1),
    ],
)
def test_fit_time_within_a_factor_of_an_actual_fit(digits_small, solver, options, damping):
    if solver == "exact":
        task, train = digits_small.task, digits_small.train
    else:
        task, train = _mlp_task(600, hidden=32)
    inf = ik.Influence(task, train, solver=solver, damping=damping, solver_options=options)
    plan = inf.plan()
    estimate = plan.stage("fit: gradient check").seconds + plan.stage(f"fit: {solver}").seconds
    actual = _best_fit_seconds(inf)
    print(f"{solver}: estimated {estimate:.3f} s, actual {actual:.3f} s")
    assert actual / TIME_FACTOR <= estimate <= actual * TIME_FACTOR, (solver, estimate, actual, str(plan))


def test_scoring_blocks_follow_the_memory_budget():
    task, train = _mlp_task()
    p = sum(v.numel() for v in task.params().values())
    budget = 4 * 4 * p * 10  # queries = budget // (4·itemsize·p) = 10 test points per block
    inf = ik.Influence(
        task,
        train,
        solver="arnoldi",
        damping=0.1,
        solver_options={"rank": 10, "remainder": "damped"},
        memory_budget=budget,
    )
    plan = inf.plan(n_test=35)
    assert plan.chunks["queries"] == 10
    assert "B = 4 " in plan.stage("scoring").formula
    assert any("4 query blocks" in note for note in plan.notes)
    # the score matrix alone is n_test × n_train values
    assert plan.stage("scoring").memory >= 35 * 400 * 4
    # remainder="drop" with rank < n_test scores in the eigenbasis: one training pass whatever the blocks
    drop = ik.Influence(
        task, train, solver="arnoldi", damping=0.1, solver_options={"rank": 10}, memory_budget=budget
    ).plan(n_test=35)
    assert drop.stage("scoring").formula.startswith("in the eigenbasis")
    assert not any("query blocks" in note for note in drop.notes)
    assert drop.stage("scoring").memory >= 35 * 400 * 4 + 400 * 10 * 4


def test_plan_prints_a_table_and_adds_up():
    task, train = _mlp_task()
    plan = ik.Influence(task, train, solver="ekfac", damping=0.1).plan(n_test=50)
    text = str(plan)
    names = [s.name for s in plan.stages]
    assert names == ["fit: gradient check", "fit: ekfac", "test gradients", "query solve", "scoring"]
    for name in names + ["total", "probe on"]:
        assert name in text
    assert plan.seconds == pytest.approx(sum(s.seconds for s in plan.stages), rel=1e-12)
    assert plan.peak_memory == max(s.memory for s in plan.stages)
    assert all(s.seconds >= 0 and s.memory > 0 for s in plan.stages)
    assert plan.to_dict()["peak_memory"] == plan.peak_memory
    with pytest.raises(InputError, match="`name` must be one of"):
        plan.stage("nope")


def test_plan_runs_nothing_expensive():
    task, train = _mlp_task()
    inf = ik.Influence(task, train, solver="cg", damping=0.1)
    plan = inf.plan(n_test=10, cg_iterations=7)
    assert not hasattr(inf, "solver_")  # no fit happened
    assert any("7 block iterations assumed" in note for note in plan.notes)


def test_bad_input_is_refused(digits_small):
    inf = ik.Influence(digits_small.task, digits_small.train, solver="exact")
    with pytest.raises(InputError, match="`n_test` must be an int in \\[0, inf\\]. Got -1"):
        inf.plan(n_test=-1)
    with pytest.raises(InputTypeError, match="`n_test` must be an int"):
        inf.plan(n_test="10")
    with pytest.raises(InputError, match="`probe_examples` must be an int in \\[1, inf\\]"):
        inf.plan(probe_examples=0)
    with pytest.raises(InputError, match="`cg_iterations`"):
        inf.plan(cg_iterations=0)
    too_high = ik.Influence(digits_small.task, digits_small.train, solver="arnoldi", solver_options={"rank": 10_000})
    with pytest.raises(InputError, match="`rank` must be an int in \\[1, n_params\\] = \\[1, 650\\]"):
        too_high.plan()
    big = ik.Influence(digits_small.task, digits_small.train, solver="exact", solver_options={"max_params": 100})
    assert any("refuses this model" in note for note in big.plan().notes)


def test_arnoldi_without_residual_rows_plans_no_residual_hvp():
    task, train = _mlp_task()
    plans = {
        rows: ik.Influence(
            task, train, solver="arnoldi", damping=0.1, solver_options={"rank": 10, "residual_rows": rows}
        ).plan(n_test=5)
        for rows in (0, 2)
    }
    zero, two = plans[0].stage("query solve").seconds, plans[2].stage("query solve").seconds
    assert zero < two  # two full-data HVPs more
    assert zero < 0.5 * two


def test_query_rank_plans_the_low_rank_stages():
    """The conv model: Linear(256→10) is cheaper factored at rank 2 (2·266 < 2,560), the convolution (64 positions)
    is not; the low-rank scoring is estimated below the dense one, and a model with parameters outside the tapped
    layers is refused at plan time, before any data pass."""
    from influencekit.core.errors import UnsupportedError

    task, train = _mlp_task(conv=True)
    inf = ik.Influence(task, train, solver="ekfac", damping=0.1)
    dense = inf.plan(n_test=300)
    low = inf.plan(n_test=300, query_rank=2)
    names = [s.name for s in low.stages]
    assert names[-3:] == ["test layer taps", "query solve (low rank)", "scoring (low rank)"]
    assert any(note.startswith("query_rank=2: factored layers ['4']") for note in low.notes)
    assert low.stage("scoring (low rank)").seconds < dense.stage("scoring").seconds
    assert low.stage("scoring (low rank)").memory >= 300 * 400 * 4  # the score matrix
    with pytest.raises(InputError, match="query_rank"):
        inf.plan(n_test=10, query_rank=0)

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale * self.fc(x)

    other = ik.Influence(ik.ClassificationTask(Scaled(), l2=1e-3), train, solver="cg", damping=0.1)
    with pytest.raises(UnsupportedError, match="'scale'"):
        other.plan(n_test=10, query_rank=2)
