"""Dry-run planner: estimated memory and time of each stage of an influence computation, before running it.

:meth:`Influence.plan <influencekit.engine.scoring.Influence.plan>` calls :func:`plan_influence`, which runs a short
timed probe on a few training examples (never a pass over the data) and extrapolates with the formulas
below. The probe's figures go into a :class:`~influencekit.solvers.costs.CostProbe`, from which each solver
gives its own fit and solve (``Solver.cost``); the planner adds the stages every solver shares. Notation: n training
examples, p selected parameters, b bytes per value of the model's dtype,
t_test test points solved in blocks of q = min(t_test, chunks.queries), B the number of such blocks,
c_g / c_h the examples per gradient / HVP chunk (from ``memory_budget``, see
:func:`~influencekit.engine.config.plan_chunks`).

Measured by the probe (each after one untimed warm-up call, on m = min(n, probe_examples) examples):

    τ_g   seconds of one example's per-example gradient (vmap∘grad)
    τ_s   seconds of one example in a summed batch gradient (forward + backward)
    τ_h   seconds of one example × one tangent in a batched HVP (forward-over-reverse), timed only when the
          solver's cost uses HVPs (not for K-FAC/EK-FAC without residual probes: on a transformer that pass alone
          holds several times a gradient's activations)
    ρ     matmul rate, flop/s, of a (m, p) × (p, m) product in the model's dtype

Stages and their time formulas:

    fit: gradient check     n·τ_s    (‖∇R(θ̂)‖ and the training loss; none with stationarity_tol=None)
    fit: <solver>           exact:    p·n·τ_h + decomposition (p³/3 flops Cholesky, 9p³ eigh) / ρ; a final Linear
                                      layer's H in closed form: n·τ_s + 2·n·τ_h (one pass, two checking HVPs)
                            cg:       nothing (its work is in the query solve)
                            lissa:    eigen_steps·n·τ_h + 90·min(batch_size, n)·τ_h (Lanczos + power iteration)
                            arnoldi:  min(n_iter or 2·rank, p)·n·τ_h
                            kfac/ekfac: (the solver's own fit on the m probe examples − eigh) × n/m + eigh
                                      + probes·min(n, the solver's probe_examples)·τ_h, where eigh (the
                                      factors' eigendecompositions, whose size does not depend on n)
                                      = Σ_factors t_r·(size/r)³, t_r the timed
                                      eigh of an r × r matrix, r = min(largest factor, 1024)
    test gradients          t_test·τ_g
    query solve             B × per block: exact 2·q·p² / ρ (+ residual rows); cg iterations·q·n·τ_h
                            (iterations is an assumption, given as ``cg_iterations``); lissa
                            repeats·depth·q·min(batch_size, n)·τ_h (+ q·n·τ_h residual); arnoldi
                            4·q·rank·p / ρ + min(q, residual_rows)·n·τ_h; kfac/ekfac 4·q·Σ(o²k + ok²) / ρ, or from the
                            test taps q·Σ[2·min(T(o² + k²) + Tok, ok(o + k)) + 2·ok(o + k)] / ρ
    scoring                 B × (n·τ_g + 2·q·n·p / ρ)               (one training-gradient pass per block)
                            arnoldi with remainder="drop" and rank < t_test scores in its eigenbasis:
                            n·τ_g + 2·n·rank·p / ρ + 2·t_test·(n + p)·rank / ρ
    with query_rank=r       test layer taps, query solve (low rank), scoring (low rank): :func:`_low_rank_stages`

Memory of a stage is what it holds at its peak, in bytes: the parameters (p·b), the solver's fitted state
once it exists, and the stage's working set:

    per-example-gradient chunk   4·c_g·p·b (vmap∘grad peaks near 3× its output; the previous chunk is still held)
                                 + 4·c_g·a·b of activations, a = values the modules output per example; only the
                                 latter when scoring takes layer taps a layer at a time (no gradient rows)
    exact state                  2·p²·b_e + p·b_e  (H and its eigenvectors or Cholesky factor, b_e bytes of
                                 eig_dtype; + p²·b while the Hessian is assembled when dtypes differ)
    arnoldi                      state rank·p·b; during fit the Lanczos basis min(n_iter, p)·p·b on top
    kfac/ekfac state             b_r·Σ_layers (k² + o² + o·k)  (Q_A, Q_S and the eigenvalues, summed in float64,
                                 eigendecomposed in eigh_dtype, kept in the rotations' dtype, b_r bytes: solve_dtype or
                                 the model's; k inputs (+1 for a bias) and o outputs per layer; A and S too with
                                 keep_factors: + b_r·Σ(k² + o²)) + 8 per leftover parameter
    kfac/ekfac fit               the largest of: the factor pass 8·Σ(k² + o²) + its taps; the eigendecompositions
                                 8·Σ(k² + o²) + b_e·Σ(k² + o²) + 8·Σok + 3·b_e·(largest factor) (float64 sums,
                                 eigenvectors in the eigh dtype, float64 eigenvalues, one factor's copy and
                                 workspace); EK-FAC's correction pass b_e·Σ(k² + o²) + 8·Σok + its taps
    cg / lissa working set       6·q·p·b / 4·q·p·b  (block iterates, residuals, directions)
    query block                  q·p·b gradients + q·p·b preconditioned
    kfac/ekfac query solve       q·p·b + 4·min(block_elements, q·max_layer(o·k))·8  (the result, and one row block
                                 of the largest layer gathered, rotated, scaled and rotated back)
    score matrix                 t_test·n·b

The estimates are first-order: they ignore the allocator, Python overhead and the data set itself, and the
times assume the machine is as loaded as during the probe. The tests hold the memory of the fitted state
to 1 % of the arrays the solvers allocate, and the time of a fit to a factor of 5.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.autodiff import ParamLayout, batch_grad_sum, choose_hvp, input_size_per_example
from ..core.checks import check_int
from ..core.errors import InputError
from ..core.layers import choose_per_example
from ..core.lowrank import factor_blocks, factored_layers
from ..core.task import Task
from ..data.examples import Batch, Examples, take
from ..solvers import Solver
from ..solvers.costs import CostProbe, SolverCost, timed
from .config import Chunks, InfluenceConfig, plan_chunks
from .hessian import HessianOperator
from .last_layer import closed_form_applies
from .pairwise import scores_without_rows

__all__ = ["Plan", "Stage", "plan_influence"]


@dataclass(frozen=True)
class Stage:
    """One stage of the computation: estimated seconds, peak bytes held, and the formula behind them."""

    name: str
    seconds: float
    memory: int
    formula: str


@dataclass(frozen=True)
class Plan:
    """What :meth:`Influence.plan` estimates. ``str(plan)`` prints a table.

    Attributes:
        stages: the stages in the order they run.
        solver_state: bytes of the solver's fitted state (what ``fit`` leaves behind).
        probe: the measured unit costs (seconds per example τ_g, τ_s, τ_h; matmul rate ρ) and probe size.
        notes: assumptions and warnings (e.g. a stage that would exceed the memory budget).
        refused: why the solver would refuse this model at fit (empty when it runs).
    """

    solver: str
    n_train: int
    n_test: int
    n_params: int
    dtype: str
    memory_budget: int
    chunks: dict[str, int]
    stages: tuple[Stage, ...]
    solver_state: int
    probe: dict[str, float]
    notes: tuple[str, ...] = field(default=())
    refused: str = ""

    @property
    def seconds(self) -> float:
        """Estimated total seconds of ``fit`` plus ``scores`` on ``n_test`` test points."""
        return sum(s.seconds for s in self.stages)

    @property
    def peak_memory(self) -> int:
        """Estimated peak bytes over all stages."""
        return max(s.memory for s in self.stages)

    def stage(self, name: str) -> Stage:
        """The stage called ``name`` (``"fit: gradient check"``, ``"fit: <solver>"``, ``"test gradients"``, ...)."""
        for s in self.stages:
            if s.name == name:
                return s
        raise InputError(f"`name` must be one of {[s.name for s in self.stages]}. Got {name!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": self.seconds, "peak_memory": self.peak_memory}

    def __str__(self) -> str:
        head = (
            f"influence plan: solver={self.solver}, n_train={self.n_train:,}, n_test={self.n_test:,}, "
            f"n_params={self.n_params:,}, {self.dtype}, memory_budget={_fmt_bytes(self.memory_budget)}"
        )
        width = max(len(s.name) for s in self.stages)
        lines = [head, f"{'stage':<{width}}  {'time':>9}  {'memory':>9}  formula"]
        for s in self.stages:
            lines.append(f"{s.name:<{width}}  {_fmt_seconds(s.seconds):>9}  {_fmt_bytes(s.memory):>9}  {s.formula}")
        total = f"{_fmt_seconds(self.seconds):>9}  {_fmt_bytes(self.peak_memory):>9}"
        lines.append(f"{'total':<{width}}  {total}  (time: sum; memory: peak)")
        p = self.probe
        hvp = (
            f"HVP {p['tau_hvp'] * 1e3:.3g} ms/example with one tangent, {p['tau_hvp_block'] * 1e3:.3g} "
            f"ms/(example·tangent) with {int(p['block_tangents'])}"
            if "tau_hvp" in p
            else "HVP not timed (the plan needs none)"
        )
        lines.append(
            f"probe on {int(p['examples'])} examples: per-example gradient {p['tau_grad'] * 1e3:.3g} ms/example, "
            f"batch gradient {p['tau_sum'] * 1e3:.3g} ms/example, {hvp}, matmul {p['flops'] / 1e9:.3g} GFLOP/s"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython shows the table
        printer.text(str(self))


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _fmt_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    if s >= 60:
        return f"{s / 60:.3g} min"
    if s >= 1:
        return f"{s:.3g} s"
    return f"{s * 1e3:.3g} ms"


def plan_influence(
    task: Task,
    train_data: Any,
    config: InfluenceConfig,
    solver: Solver,
    n_test: int,
    *,
    probe_examples: int = 256,
    cg_iterations: int = 100,
    query_rank: int | None = None,
) -> Plan:
    """Estimate the memory and time of ``Influence(task, train_data, ...).fit()`` (its validated ``config``) followed
    by ``scores`` on ``n_test`` test points; ``solver``: an unfitted solver like the configuration's (the probe
    times its fit).

    Runs only a probe on ``min(n_train, probe_examples)`` training examples (see the module docstring for
    what is measured and the formulas). ``cg_iterations`` is the block-CG iteration count assumed for the
    query solve (it depends on the conditioning of H + δI and cannot be known before solving). The solver
    gives its own cost from the probe (:meth:`Solver.cost <influencekit.solvers.Solver.cost>`). ``query_rank``:
    the query stages of ``scores(test, query_rank=...)`` (:func:`_low_rank_stages`).
    """
    n_test = check_int("n_test", n_test, low=0)
    probe_examples = check_int("probe_examples", probe_examples, low=1)
    cg_iterations = check_int("cg_iterations", cg_iterations, low=1)
    rank = None if query_rank is None else check_int("query_rank", query_rank, low=1)
    task.check_mode()
    train = Examples(train_data, name="train")
    n = len(train)
    if n == 0:
        raise InputError("`train` must hold at least one example. Got an empty training set.")
    params, layout, chunks, without_rows = planned_chunks(task, train, config, solver)
    probe, gradient_method = _measure(
        task,
        config,
        train,
        params,
        layout,
        chunks,
        min(n, probe_examples),
        n_test,
        cg_iterations,
        without_rows=without_rows,
    )
    notes = [f"per-example gradients: {gradient_method} (the method scores will use; `gradients=` of Influence)"]
    cost = solver.cost(probe)
    notes += cost.notes
    p, item, act = probe.p, probe.item, probe.activations
    stages = (
        [
            Stage(
                "fit: gradient check",
                n * probe.tau_sum,
                probe.base + min(chunks.grad, n) * 4 * act * item + 2 * p * item,
                "n·τ_s (batch gradients)",
            )
        ]
        if config.stationarity_tol is not None
        else []
    )
    stages.append(Stage(f"fit: {solver.name}", cost.fit_seconds, cost.fit_memory, cost.fit_formula))
    if rank is None:
        stages += _query_stages(probe, cost, notes)
    else:
        stages += _low_rank_stages(
            probe, cost, solver, factor_blocks(task.model, layout), rank, config.memory_budget // 2, notes
        )
    peak = max(s.memory for s in stages)
    if peak > config.memory_budget:
        notes.append(
            f"the estimated peak {_fmt_bytes(peak)} exceeds memory_budget = {_fmt_bytes(config.memory_budget)} "
            "(the budget sizes chunks; the solver's state and the score matrix come on top)."
        )
    return Plan(
        solver=solver.name,
        n_train=n,
        n_test=n_test,
        n_params=p,
        dtype=str(layout.dtype),
        memory_budget=config.memory_budget,
        chunks={"grad": chunks.grad, "hvp": chunks.hvp, "tangents": chunks.tangents, "queries": chunks.queries},
        stages=tuple(stages),
        solver_state=int(cost.state),
        probe=probe.as_dict(),
        notes=tuple(notes),
        refused=cost.refused,
    )


def planned_chunks(
    task: Task, train: Examples, config: InfluenceConfig, solver: Solver
) -> tuple[dict[str, torch.Tensor], ParamLayout, Chunks, bool]:
    """A copy of θ̂, its layout, the chunk sizes a fit with ``solver`` would use, and whether scoring forms no gradient
    rows (what :func:`plan_influence` and the solver choice's pilot both start from)."""
    params = {name: value.detach().clone() for name, value in task.params().items()}
    layout = ParamLayout.of(params)
    without_rows = scores_without_rows(solver, config.gradients, task.model, layout)
    chunks = plan_chunks(
        task,
        params,
        take(train, [0], dtype=layout.dtype, device=layout.device, check=task.check_batch),
        len(train),
        batch_size=config.batch_size,
        memory_budget=config.memory_budget,
        without_rows=without_rows,
    )
    return params, layout, chunks, without_rows


def _measure(
    task: Task,
    config: InfluenceConfig,
    train: Examples,
    params: dict[str, torch.Tensor],
    layout: ParamLayout,
    chunks: Chunks,
    m: int,
    n_test: int,
    cg_iterations: int,
    *,
    without_rows: bool,
) -> tuple[CostProbe, str]:
    """The probe: unit costs timed on the first m training examples, and the sizes a solver's cost needs.
    Returns it with the per-example-gradient method that scores will use."""
    n, p, dtype, device = len(train), layout.n, layout.dtype, layout.device
    batch = take(train, list(range(m)), dtype=dtype, device=device, check=task.check_batch)
    act = input_size_per_example(
        task.loss, params, take(train, [0], dtype=dtype, device=device, check=task.check_batch), task.model
    )
    holder: dict[str, torch.Tensor] = {}
    # each unit cost is timed on at most one chunk of the run's size, so the probe stays within the budget too
    mg, mh = min(m, chunks.grad), min(m, chunks.hvp)
    gbatch = batch if mg == m else take(train, list(range(mg)), dtype=dtype, device=device, check=task.check_batch)
    hbatch = batch if mh == m else take(train, list(range(mh)), dtype=dtype, device=device, check=task.check_batch)
    per_example, gradient_method, _ = choose_per_example(
        config.gradients, task.model, task.loss, params, layout, gbatch
    )

    def grads() -> None:
        holder["G"], _ = per_example(task.loss, params, gbatch)

    tau_g = timed(grads) / mg
    tau_s = timed(lambda: batch_grad_sum(task.loss, params, hbatch, layout)) / mh
    rate = 2.0 * mg * mg * p / max(timed(lambda: holder["G"] @ holder["G"].T), 1e-9)
    holder.clear()

    def hvp_timing() -> tuple[float, float, int]:
        """τ_h with one tangent and per tangent with K; run only for a solver whose cost needs HVPs."""
        gen = torch.Generator(device=device).manual_seed(0)
        K = max(1, min(chunks.tangents, p, 32))
        V = torch.randn(K, p, dtype=dtype, device=device, generator=gen)
        hvp = choose_hvp(task.loss, params, hbatch, layout, V[:1])[0]
        tau_h1 = timed(lambda: hvp(task.loss, params, hbatch, layout, V[:1])) / mh
        tau_hK = timed(lambda: hvp(task.loss, params, hbatch, layout, V)) / (mh * K) if K > 1 else tau_h1
        return tau_h1, tau_hK, K

    def fit_seconds(solver: Solver) -> float:
        """Seconds of ``solver.fit`` on the probe examples (the damping at least 1e-3, so that it is invertible)."""
        operator = HessianOperator(
            task,
            params,
            Examples(batch, name="train"),
            damping=max(config.damping, 1e-3),
            batch_size=min(chunks.hvp, m),
            tangent_block=chunks.tangents,
        )
        start = time.perf_counter()
        solver.fit(operator)
        return time.perf_counter() - start

    q = max(1, min(n_test, chunks.queries))
    rows = gradient_method != "layers" or not without_rows
    probe = CostProbe(
        n=n,
        p=p,
        dtype=dtype,
        item=torch.finfo(dtype).bits // 8,
        examples=m,
        tau_grad=tau_g,
        tau_sum=tau_s,
        hvp_timing=hvp_timing,
        flops=rate,
        activations=act,
        grad_chunk=chunks.grad,
        hvp_chunk=chunks.hvp,
        tangent_chunk=chunks.tangents,
        query_chunk=chunks.queries,
        n_test=n_test,
        queries=q,
        blocks=math.ceil(n_test / q) if n_test else 0,
        cg_iterations=cg_iterations,
        fit_seconds=fit_seconds,
        layer_positions=lambda layers: _positions(layers, task, params, batch),
        n_outputs=lambda: _n_outputs(task, params, batch),
        rows=rows,
        closed_form_hessian=closed_form_applies(task, tuple(layout.names)),
    )
    return probe, gradient_method


def _query_stages(probe: CostProbe, cost: SolverCost, notes: list[str]) -> list[Stage]:
    """The stages of ``scores`` on the probe's n_test test points (none for 0), after a fit that holds θ̂ and the
    solver's state; a note when scoring makes several passes over the training set."""
    n_test, q, blocks = probe.n_test, probe.queries, probe.blocks
    if not n_test:
        return []
    n, p, item, act, tau_g, rate = probe.n, probe.p, probe.item, probe.activations, probe.tau_grad, probe.flops
    held = probe.base + cost.state
    # vmap∘grad peaks at about 3× its (c_g, p) output (measured on a 1M-parameter CNN), and the consumer still
    # holds the previous chunk while the next is computed: 4·c_g·p·b; without rows (layer taps scored a layer at a
    # time) only the taps and activations of a chunk
    rows = 4 * p if probe.rows else 0
    grad_chunk = min(probe.grad_chunk, n) * (rows + 4 * act) * item
    stages = [
        Stage(
            "test gradients",
            n_test * tau_g,
            held + min(probe.grad_chunk, q) * (rows + 4 * act) * item + q * p * item,
            "t_test·τ_g",
        ),
        Stage(
            "query solve",
            blocks * cost.solve_seconds,
            held + q * p * item + cost.solve_memory,
            f"B = {blocks} block(s) × {cost.solve_formula}",
        ),
    ]
    r = cost.basis_rank  # > 0: scores in the solver's basis of that rank
    if r:
        stages.append(
            Stage(
                "scoring",
                n * tau_g + 2 * n * r * p / rate + 2 * n_test * (n + p) * r / rate,
                held + n_test * n * item + n * r * item + q * p * item + grad_chunk,
                "in the eigenbasis: n·τ_g + 2·n·rank·p / ρ (projected once) + 2·t_test·(n + p)·rank / ρ",
            )
        )
    else:
        stages.append(
            Stage(
                "scoring",
                blocks * (n * tau_g + 2 * q * n * p / rate),
                held + n_test * n * item + q * p * item + grad_chunk,
                f"B = {blocks} × (n·τ_g + 2·q·n·p / ρ)",
            )
        )
    if blocks > 1 and not r:
        notes.append(
            f"{blocks} query blocks of {q} test points (memory_budget allows {probe.query_chunk}): scoring makes "
            f"{blocks} per-example-gradient passes over the training set; a larger memory_budget makes fewer."
        )
    return stages


def _low_rank_stages(
    probe: CostProbe, cost: SolverCost, solver: Solver, blocks: list[Any], rank: int, budget: int, notes: list[str]
) -> list[Stage]:
    """The stages of ``scores(test, query_rank=r)``: per layer (out × k, T positions) a factored layer costs
    c = r·T·(o + k) per (query, example) pair and keeps r·(o + k) values per query, a dense one c = o·k (its gradient
    materialised once per example and block, T·o·k) and o·k values; taps passes cost τ_s per example (no gradient rows).

        test gradients   t_test·τ_s
        query solve      kfac/ekfac: t_test·Σ_factored [T(o² + k²) + T·o·k + 12·o·k·(r + 8) + r(o² + k²)]·2 / ρ
                         + t_test·Σ_dense 4(o²k + ok²)·2 / ρ; others: the dense solve + the SVD work
        scoring          B × n·τ_s + 2·t_test·n·Σ c / ρ + B·n·Σ_dense 2·T·o·k / ρ,  B = ⌈t_test · values · b / budget⌉
    """
    n_test = probe.n_test
    if not n_test:
        return []
    n, item, rate, tau = probe.n, probe.item, probe.flops, probe.tau_sum
    positions = probe.layer_positions(blocks)
    T = [positions.get(b.name, 1) for b in blocks]
    factored = factored_layers(blocks, T, rank)
    pair = values = solve = svd = materialise = 0.0
    for block, t, f in zip(blocks, T, factored):
        o, k = block.index.shape
        r = min(rank, o, k)
        if f:
            pair, values = pair + r * t * (o + k) + t * r, values + r * (o + k)
            svd += 12 * o * k * (r + 8) + r * (o * o + k * k)
            solve += t * (o * o + k * k) + t * o * k
        else:
            pair, values = pair + o * k, values + o * k
            solve += 4 * (o * o * k + o * k * k)
            materialise += t * o * k
    kfac_like = type(solver).low_rank_solve is not Solver.low_rank_solve
    solve_s = (
        2 * n_test * (solve + svd) / rate if kfac_like else probe.blocks * cost.solve_seconds + 2 * n_test * svd / rate
    )
    blocks_lr = max(1, math.ceil(n_test * values * item / max(budget, 1)))
    held = probe.base + cost.state
    names = [b.name for b, f in zip(blocks, factored) if f]
    notes.append(
        f"query_rank={rank}: factored layers {names or 'none'} (the others are cheaper dense); {blocks_lr} query "
        f"block(s) of low-rank queries ({_fmt_bytes(int(values * item))} per query)"
    )
    return [
        Stage(
            "test layer taps",
            n_test * tau,
            held + min(probe.grad_chunk, n_test) * 4 * probe.activations * item,
            "t_test·τ_s",
        ),
        Stage(
            "query solve (low rank)",
            solve_s,
            held + int(min(n_test, budget // max(1, int(values * item))) * values * item),
            "from the taps in the Kronecker eigenbasis"
            if kfac_like
            else "the dense solve, then a truncated SVD per layer",
        ),
        Stage(
            "scoring (low rank)",
            blocks_lr * n * tau + 2 * n_test * n * pair / rate + blocks_lr * n * 2 * materialise / rate,
            held + n_test * n * item + int(min(budget, n_test * values * item)),
            f"B = {blocks_lr} × n·τ_s + 2·t_test·n·Σ c / ρ (c per pair and layer)",
        ),
    ]


def _positions(layers: list[Any], task: Task, params: dict[str, torch.Tensor], batch: Batch) -> dict[str, int]:
    """Positions T per example of each layer (1 for a dense input, output pixels of a convolution)."""
    counts: dict[str, int] = {}
    handles = []
    for layer in layers:

        def hook(module: Any, inputs: Any, output: torch.Tensor, name: str = layer.name) -> None:
            channels = output.shape[1] if isinstance(module, nn.Conv2d) else output.shape[-1]
            counts[name] = max(1, output[0].numel() // channels)

        handles.append(layer.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            task.loss(params, batch)
    finally:
        for h in handles:
            h.remove()
    return counts


def _n_outputs(task: Task, params: dict[str, torch.Tensor], batch: Batch) -> int:
    with torch.no_grad():
        out = task.outputs(params, batch)
    return int(out[0].numel()) if out.dim() > 1 else 2
