"""What a solver tells the dry-run planner (:mod:`influencekit.engine.planner`): its cost on the measured unit costs.

The planner measures the unit costs once, on a few training examples, into a :class:`CostProbe` and asks the
solver for its :class:`SolverCost` with ``solver.cost(probe)``: the seconds, peak bytes and formula of its fit,
the bytes of its fitted state, and the seconds, working bytes and formula of one block solve of ``q`` right-hand
sides. The planner reads those and no solver names. The formulas are listed in the planner's module docstring.

This module touches no model: what needs one (fitting a solver on the probe examples, the positions per example
of a layer, the model's outputs) the planner supplies as the probe's callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import torch

from ..core.curvature import CurvatureOperator

__all__ = ["CostProbe", "SolverCost", "timed", "unknown_cost", "Fittable"]


class Fittable(Protocol):
    """What the probe's ``fit_seconds`` times: a solver's ``fit`` on a curvature operator."""

    def fit(self, operator: CurvatureOperator) -> object: ...


def timed(work: Callable[[], Any]) -> float:
    """Seconds of ``work()`` after one untimed warm-up call (first-call allocation and dispatch excluded)."""
    work()
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


@dataclass(frozen=True)
class CostProbe:
    """The unit costs and sizes a solver's cost is computed from (measured by the planner's probe).

    Attributes:
        n, p, dtype, item: training examples, selected parameters, the model's dtype and its bytes per value (b).
        examples: m, the probe examples the times were measured on.
        tau_grad, tau_sum: τ_g and τ_s, seconds per example of a per-example and of a summed batch gradient.
        hvp_timing: ``hvp_timing()`` times the HVPs: (τ_h, seconds per example of an HVP with one tangent; the
            seconds per example·tangent with K tangents; K). Called once, on first use of :attr:`tau_hvp`,
            :attr:`tau_hvp_block` or :attr:`block_tangents`: a solver that makes no HVPs (K-FAC without residual
            probes) never pays for a forward-over-reverse pass, which on a transformer holds several times the
            activations of a gradient.
        flops: ρ, the matmul rate in flop/s.
        activations: a, values the modules output per example.
        grad_chunk, hvp_chunk, tangent_chunk, query_chunk: the chunk sizes from the memory budget.
        n_test, queries, blocks, cg_iterations: test points, q test points per block, B blocks, and the CG
            iterations assumed.
        fit_seconds: ``fit_seconds(solver)`` fits ``solver`` on the m probe examples and returns the seconds.
        layer_positions: ``layer_positions(layers)``: positions T per example of each layer, by name.
        n_outputs: ``n_outputs()``: values the model outputs per example.
        rows: scoring forms chunks of whole gradient rows (False: layer taps scored a layer at a time and written
            into the query block, :func:`~influencekit.engine.pairwise.scores_without_rows`).
        closed_form_hessian: the selection is a final Linear layer under a classification loss, whose explicit
            Hessian is built in one data pass (:mod:`~influencekit.engine.last_layer`) instead of p HVPs.
    """

    n: int
    p: int
    dtype: torch.dtype
    item: int
    examples: int
    tau_grad: float
    tau_sum: float
    flops: float
    activations: int
    grad_chunk: int
    hvp_chunk: int
    tangent_chunk: int
    query_chunk: int
    n_test: int
    queries: int
    blocks: int
    cg_iterations: int
    hvp_timing: Callable[[], tuple[float, float, int]] = field(repr=False, compare=False)
    fit_seconds: Callable[[Fittable], float] = field(repr=False, compare=False)
    layer_positions: Callable[[list[Any]], dict[str, int]] = field(repr=False, compare=False)
    n_outputs: Callable[[], int] = field(repr=False, compare=False)
    rows: bool = True
    closed_form_hessian: bool = False

    @cached_property
    def _hvp_times(self) -> tuple[float, float, int]:
        return self.hvp_timing()

    @property
    def tau_hvp(self) -> float:
        """τ_h: seconds per example of an HVP with one tangent (timed on first use)."""
        return self._hvp_times[0]

    @property
    def tau_hvp_block(self) -> float:
        """Seconds per example·tangent of an HVP with :attr:`block_tangents` tangents (timed on first use)."""
        return self._hvp_times[1]

    @property
    def block_tangents(self) -> int:
        """K, the tangents of the timed block HVP."""
        return self._hvp_times[2]

    @property
    def base(self) -> int:
        """Bytes of the copy of θ̂ that fit keeps (p·b)."""
        return self.p * self.item

    def hvp_seconds(self, k: int) -> float:
        """Seconds of one full-data HVP with k tangents (vectorised in blocks of the tangent chunk); 0 for none."""
        if k <= 0:
            return 0.0
        if k <= 1:
            return self.n * self.tau_hvp
        return self.n * k * (self.tau_hvp_block if self.block_tangents > 1 else self.tau_hvp)

    def as_dict(self) -> dict[str, float]:
        """The measured figures, as :attr:`Plan.probe <influencekit.engine.planner.Plan.probe>` holds them."""
        hvp = (
            dict(zip(("tau_hvp", "tau_hvp_block", "block_tangents"), map(float, self._hvp_times)))
            if "_hvp_times" in self.__dict__  # timed only where a solver's cost needed it
            else {}
        )
        return {
            "examples": float(self.examples),
            "tau_grad": self.tau_grad,
            "tau_sum": self.tau_sum,
            **hvp,
            "flops": self.flops,
            "activations_per_example": float(self.activations),
        }


@dataclass(frozen=True)
class SolverCost:
    """A solver's estimated cost: its fit stage, its fitted state, and one block solve of q right-hand sides.

    Attributes:
        fit_seconds, fit_memory, fit_formula: the "fit: <solver>" stage (peak bytes include the copy of θ̂).
        state: bytes of the fitted state (what ``fit`` leaves behind).
        solve_seconds, solve_memory, solve_formula: one block solve; the memory is the solve's working set on top
            of the state, θ̂ and the block of gradients.
        notes: assumptions and warnings for the plan.
        basis_rank: > 0 when scores are computed in the solver's basis of that rank (see ``Solver.solution_basis``).
        refused: why the solver would refuse this model at fit (empty when it runs).
    """

    fit_seconds: float
    fit_memory: int
    fit_formula: str
    state: int
    solve_seconds: float
    solve_memory: int
    solve_formula: str
    notes: tuple[str, ...] = ()
    basis_rank: int = 0
    refused: str = ""


def unknown_cost(name: str, probe: CostProbe) -> SolverCost:
    """The answer for a solver without a cost model: nan seconds and a note saying so."""
    return SolverCost(
        fit_seconds=float("nan"),
        fit_memory=probe.base,
        fit_formula="unknown solver: no estimate",
        state=0,
        solve_seconds=float("nan"),
        solve_memory=2 * probe.queries * probe.p * probe.item,
        solve_formula="unknown",
        notes=(f"solver {name!r} has no cost model in the planner; its stages show nan.",),
    )
