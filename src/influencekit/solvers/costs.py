"""What a solver tells the dry-run planner (:mod:`influencekit.planner`): its cost on the measured unit costs.

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
from typing import TYPE_CHECKING, Any

import torch

from .fisher import EXPECTED_MAX_LABELS

if TYPE_CHECKING:
    from .base import Solver
    from .kfac import KFACSolver

__all__ = ["CostProbe", "SolverCost", "timed", "unknown_cost", "kfac_cost"]


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
        tau_hvp, tau_hvp_block: τ_h, seconds per example of an HVP with one tangent, and per example·tangent
            with ``block_tangents`` (K) tangents.
        flops: ρ, the matmul rate in flop/s.
        activations: a, values the modules output per example.
        grad_chunk, hvp_chunk, tangent_chunk, query_chunk: the chunk sizes from the memory budget.
        n_test, queries, blocks, cg_iterations: test points, q test points per block, B blocks, and the CG
            iterations assumed.
        fit_seconds: ``fit_seconds(solver)`` fits ``solver`` on the m probe examples and returns the seconds.
        layer_positions: ``layer_positions(layers)``: positions T per example of each layer, by name.
        n_outputs: ``n_outputs()``: values the model outputs per example.
        rows: scoring forms chunks of whole gradient rows (False: layer taps scored a layer at a time and written
            into the query block, :func:`~influencekit.pairwise.scores_without_rows`).
    """

    n: int
    p: int
    dtype: torch.dtype
    item: int
    examples: int
    tau_grad: float
    tau_sum: float
    tau_hvp: float
    tau_hvp_block: float
    block_tangents: int
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
    fit_seconds: Callable[[Solver], float] = field(repr=False, compare=False)
    layer_positions: Callable[[list[Any]], dict[str, int]] = field(repr=False, compare=False)
    n_outputs: Callable[[], int] = field(repr=False, compare=False)
    rows: bool = True

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
        """The measured figures, as :attr:`Plan.probe <influencekit.planner.Plan.probe>` holds them."""
        return {"examples": float(self.examples), "tau_grad": self.tau_grad, "tau_sum": self.tau_sum, "tau_hvp": self.tau_hvp,
                "tau_hvp_block": self.tau_hvp_block, "block_tangents": float(self.block_tangents), "flops": self.flops,
                "activations_per_example": float(self.activations)}


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


def unknown_cost(name: str, probe: CostProbe) -> SolverCost:
    """The answer for a solver without a cost model: nan seconds and a note saying so."""
    return SolverCost(
        fit_seconds=float("nan"), fit_memory=probe.base, fit_formula="unknown solver: no estimate", state=0,
        solve_seconds=float("nan"), solve_memory=2 * probe.queries * probe.p * probe.item, solve_formula="unknown",
        notes=(f"solver {name!r} has no cost model in the planner; its stages show nan.",),
    )


# ------------------------------------------------------------------------------------------- K-FAC/EK-FAC
def kfac_cost(solver: KFACSolver, probe: CostProbe) -> SolverCost:
    """K-FAC/EK-FAC: fit a copy of ``solver`` on the probe examples (no residual probes) and scale its passes to n."""
    n, p, q, item = probe.n, probe.p, probe.queries, probe.item
    probe_hvps = probe.hvp_seconds(solver.probes) * min(n, solver.probe_examples or n) / n
    state, fit_seconds, fit_work, solve_flops, largest, taps = _kfac_fit(solver, probe, probe_hvps)
    return SolverCost(
        fit_seconds=fit_seconds, fit_memory=probe.base + state + fit_work,
        fit_formula="(probe fit − eigh) × n/m + eigh + probes·min(n, the solver's probe_examples)·τ_h; state b_r·Σ(k² + o² + ok), + b_r·Σ(k² + o²) with keep_factors",
        state=state, solve_seconds=q * solve_flops / probe.flops,
        # the result block, plus one row block of the largest layer gathered, rotated, scaled and rotated back
        # (the solve works layer by layer in row blocks of at most block_elements values)
        solve_memory=q * p * item + 4 * min(solver.block_elements, q * largest) * 8,
        solve_formula=("q·Σ[2·min(T(o² + k²) + Tok, ok(o + k)) + 2·ok(o + k)] / ρ (from the test taps)" if taps
                       else "4·q·Σ(o²k + ok²) / ρ") + f" ({'float64' if solver.solve_dtype == torch.float64 else 'solve_dtype'})",
    )


def _kfac_fit(solver: KFACSolver, probe: CostProbe, probe_hvps: float) -> tuple[int, float, int, float, int, bool]:
    """Returns (state bytes, fit seconds, working bytes of a factor pass, flops per right-hand side of a solve,
    values o·k of the largest layer block, whether the queries are solved from the test taps)."""
    options = {"fisher": solver.fisher, "samples": solver.samples, "seed": solver.seed, "unsupported": solver.unsupported,
               "block_elements": solver.block_elements}
    probe_solver = type(solver)(**{**options, "probes": 0})
    total = probe.fit_seconds(probe_solver)
    # the eigendecompositions do not grow with n: estimate them from one timed eigh of a matrix of at most
    # 1,024 rows, scaled by (size / 1024)³, and take them out of what is scaled by n/m (a smaller timed
    # matrix is dominated by call and threading overhead, which the cube then magnifies)
    sizes = [d for layer in probe_solver.layers_ for d in layer.index.shape]
    r = max(1, min(1024, max(sizes, default=1)))
    M = torch.randn(r, r, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    M = M @ M.T
    unit = timed(lambda: torch.linalg.eigh(M))
    eig = sum(unit * (d / r) ** 3 for d in sizes)
    positions = probe.layer_positions(probe_solver.layers_)
    outputs = probe.n_outputs()
    auto = outputs if max(outputs, 2) <= EXPECTED_MAX_LABELS else solver.samples  # "auto": per-token outputs count as many
    variants = {"sampled": solver.samples, "expected": outputs, "empirical": 1, "auto": auto}[solver.fisher]
    kept = torch.finfo(solver.solve_dtype or probe.dtype).bits // 8  # b_r: the state is kept in the rotations' dtype
    taps = not probe.rows and probe_solver.tap_solvable()  # the queries solved from the test taps (solve_taps)
    state, work, flops = _kfac_layers(probe_solver.layers_, positions, variants, min(probe.hvp_chunk, probe.n),
                                      2 if solver._corrected else 1, kept, taps=taps, factors=solver.keep_factors)
    state += 8 * len(probe_solver.diagonal_)
    seconds = max(total - eig, 0.1 * total) * probe.n / probe.examples + eig + probe_hvps
    largest = max((int(layer.index.numel()) for layer in probe_solver.layers_), default=0)
    return state, seconds, work, flops, largest, taps


def _kfac_layers(layers: list[Any], positions: dict[str, int], variants: int, c: int, passes: int, kept: int, *,
                 taps: bool = False, factors: bool = False) -> tuple[int, int, float]:
    """(state bytes, ``kept`` bytes a value, working bytes of a factor pass over c examples, flops per right-hand side)
    summed over the layers; ``taps``: a layer's test gradient is rotated in from its taps where that is cheaper;
    ``factors``: the dense layers' A and S are kept beside their eigenvectors (``keep_factors``)."""
    state, work, flops = 0, 0, 0.0
    for layer in layers:
        t = positions[layer.name]
        if layer.embedding:  # A diagonal (V,), S and Q_S (d, d), eigenvalues (V, d); a pass holds indices and d grads
            V, d = layer.index.shape
            state += kept * (V + 2 * d * d + V * d)
            work += 8 * c * t * (1 + d * variants) * passes
            flops += 4.0 * V * d * d
            continue
        o, k = layer.index.shape
        state += kept * ((2 if factors else 1) * (k * k + o * o) + o * k)
        work += 8 * c * t * (k + o * variants) * passes
        rotate_in = min(t * (o * o + k * k) + t * o * k, o * k * (o + k)) if taps else o * k * (o + k)
        flops += 2.0 * (rotate_in + o * k * (o + k))
    return state, work, flops
