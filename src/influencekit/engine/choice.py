"""Choosing a solver by its estimated cost: :func:`choose_solver`, behind :meth:`Influence.choose_solver
<influencekit.engine.scoring.Influence.choose_solver>`.

Each candidate gets the dry-run planner's estimate (:func:`~influencekit.engine.planner.plan_influence`) of ``fit``
followed by ``scores`` on the user's test set. The choice is the fastest candidate that can run at all (the exact
solver refuses more than its ``max_params``). Where the two routes to exact-quality answers meet, their costs grow
differently:

    exact   p full-data HVPs (one data pass for a final Linear layer's closed form) + a p³ decomposition, once;
            then a dense product per query
    cg      (block iterations) × (right-hand sides) full-data HVPs per query block, nothing to fit

The one figure the planner cannot measure cheaply is how many iterations block CG takes, which depends on the
spectrum of H + δI and on how much of it the block of queries spans (on the digits MLP 597 queries converge in a
handful of iterations; a single query can need hundreds). :func:`choose_solver` measures it: a **pilot** runs
the CG candidate, as configured, on the Hessian of ``pilot_examples`` training examples drawn at random, with the
first block of real test gradients as right-hand sides, and hands its iteration count to the planner (every solver
with the ``iterative`` capability gets such a pilot). The pilot costs that many HVPs over the pilot examples only
(``pilot_examples / n`` of the full solve). A subsample's Hessian can have negative curvature where the whole one
has none (the digits MLP at damping 0.01, on 256 of its 1,200 digits): the pilot then doubles its examples, up to
the whole training set, and a CG that fails there too is refused as a candidate.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch

from ..core.checks import check_int
from ..core.errors import InputError, InputTypeError, NumericalError
from ..core.task import Task
from ..data.examples import DataSource, Examples, take
from ..solvers import SOLVERS, Solver, make_solver
from .config import InfluenceConfig
from .gradients import GradientSource
from .hessian import HessianOperator
from .planner import Plan, plan_influence, planned_chunks

__all__ = ["Candidate", "SolverChoice", "choose_solver"]


@dataclass(frozen=True)
class Candidate:
    """One solver's estimate.

    Attributes:
        solver: its name.
        seconds, peak_memory: the planner's estimate of ``fit`` then ``scores`` (seconds, bytes).
        refused: why the solver cannot run on this model (empty when it can).
        basis: how the estimate was made (the pilot's measured iterations for CG).
        plan: the full :class:`~influencekit.engine.planner.Plan`.
    """

    solver: str
    seconds: float
    peak_memory: int
    refused: str
    basis: str
    plan: Plan


@dataclass(frozen=True)
class SolverChoice:
    """What :func:`choose_solver` found. ``solver`` is the name to pass to ``ik.Influence(..., solver=)``;
    ``str(choice)`` prints the candidates as a table with the reason."""

    solver: str
    reason: str
    candidates: tuple[Candidate, ...]

    def candidate(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.solver == name:
                return c
        raise KeyError(f"no candidate {name!r}; the candidates are {[c.solver for c in self.candidates]}")

    def __str__(self) -> str:
        lines = [f"chosen: {self.solver} ({self.reason})", "", "| solver | est. seconds | est. peak | basis |"]
        lines.append("|---|---:|---:|---|")
        for c in self.candidates:
            seconds = "refused" if c.refused else f"{c.seconds:,.1f}"
            lines.append(f"| {c.solver} | {seconds} | {c.peak_memory / 2**20:,.0f} MiB | {c.refused or c.basis} |")
        return "\n".join(lines)


def choose_solver(
    task: Task,
    train_data: DataSource,
    config: InfluenceConfig,
    test_data: DataSource,
    *,
    candidates: tuple[str | Solver, ...] = ("exact", "cg"),
    pilot_examples: int = 256,
    probe_examples: int = 256,
    seed: int = 0,
) -> SolverChoice:
    """The candidate solver with the least estimated time for ``fit`` then ``scores(test_data)``.

    ``candidates``: solver names (default options) or unfitted :class:`~influencekit.solvers.Solver` instances.
    ``pilot_examples``: the training examples of the CG pilot (module docstring); ``probe_examples``: those of the
    planner's timing probe. Raises :class:`~influencekit.core.errors.InputError` when no candidate can run.
    """
    pilot_examples = check_int("pilot_examples", pilot_examples, low=1)
    if not candidates:
        raise InputError("`candidates` must name at least one solver, e.g. ('exact', 'cg').")
    solvers = [_unfitted(c) for c in candidates]
    test = Examples(test_data, name="test")
    if len(test) == 0:
        raise InputError("`test` must hold at least one example: the choice depends on the number of queries.")
    train = Examples(train_data, name="train")
    found = []
    for solver in solvers:
        iterations, basis, refused = 100, "", ""
        if solver.capabilities.iterative:
            iterations, basis, refused = _pilot_iterations(task, train, config, solver, test, pilot_examples, seed)
        plan = plan_influence(
            task, train, config, solver, len(test), probe_examples=probe_examples, cg_iterations=max(iterations, 1)
        )
        basis = basis or f"fit {plan.stage(f'fit: {solver.name}').formula}"
        found.append(Candidate(solver.name, plan.seconds, plan.peak_memory, refused or plan.refused, basis, plan))
    runnable = [c for c in found if not c.refused and math.isfinite(c.seconds)]
    if not runnable:
        reasons = "; ".join(f"{c.solver}: {c.refused or 'no cost model'}" for c in found)
        raise InputError(f"none of the candidate solvers can be estimated on this model ({reasons}).")
    best = min(runnable, key=lambda c: c.seconds)
    others = [c for c in runnable if c is not best]
    reason = (
        f"est. {best.seconds:,.1f} s against "
        + ", ".join(f"{c.solver} {c.seconds:,.1f} s" for c in others)
        + f" for {len(test):,} queries × {len(train):,} training examples, {plan.n_params:,} parameters"
        if others
        else "the only candidate that can run"
    )
    return SolverChoice(best.solver, reason, tuple(found))


def _unfitted(candidate: str | Solver) -> Solver:
    if isinstance(candidate, str):
        if candidate not in SOLVERS:
            raise InputError(f"unknown solver {candidate!r} in `candidates`; the solvers are {sorted(SOLVERS)}.")
        return make_solver(candidate)
    if isinstance(candidate, Solver):
        return copy.deepcopy(candidate)  # the pilot and the probe fit copies; the user's instance stays unfitted
    raise InputTypeError(
        f"`candidates` must hold solver names or unfitted Solver instances. Got {type(candidate).__name__}."
    )


def _pilot_iterations(
    task: Task,
    train: Examples,
    config: InfluenceConfig,
    solver: Solver,
    test: Examples,
    pilot_examples: int,
    seed: int,
) -> tuple[int, str, str]:
    """Block-CG iterations measured on the Hessian of ``pilot_examples`` random training examples (twice as many
    after negative curvature, up to all), with the first query block's test gradients as right-hand sides;
    (iterations, how they were found, why the solver is refused: empty unless it fails on all examples)."""
    params, layout, chunks, _ = planned_chunks(task, train, config, solver)
    n = len(train)
    m = min(n, pilot_examples)
    q = max(1, min(len(test), chunks.queries))
    source = GradientSource(task, params, chunk=chunks.grad, method=config.gradients)
    G = source.gather(test, list(range(q)), side="test")
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    while True:
        # a random subsample's Hessian can have negative curvature where the full one has none: then twice the
        # examples, up to the whole training set, whose failure is CG's own (the candidate is refused)
        if m < n:
            picked = take(
                train,
                shuffled[:m].sort().values.tolist(),
                dtype=layout.dtype,
                device=layout.device,
                check=task.check_batch,
            )
            sample = Examples(picked, name="train")
        else:
            sample = train
        operator = HessianOperator(
            task,
            params,
            sample,
            damping=config.damping,
            batch_size=max(1, min(chunks.hvp, m)),
            tangent_block=chunks.tangents,
        )
        pilot = copy.deepcopy(solver)
        try:
            with warnings.catch_warnings():  # a pilot that stops at max_iter is reported below, not warned about
                warnings.simplefilter("ignore")
                report = pilot.fit(operator).solve(G).report
            break
        except NumericalError as err:
            if m >= n:
                return 0, "", f"fails on the whole training set ({err})"
            m = min(n, 2 * m)
    return (
        max(1, report.iterations),
        (
            f"pilot: {report.iterations} block iterations on {m:,} training examples × {q:,} queries"
            + ("" if report.converged else f" (stopped at max_iter, residual {report.relative_residual:.2g})")
        ),
        "",
    )
