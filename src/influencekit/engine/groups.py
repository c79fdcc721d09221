"""Group effects: the predicted effect of removing a whole group U of training points (docs/conventions.md).

Removing U and retraining gives the minimiser of R(θ) − ε·(1/n)Σ_{i∈U} L(z_i, θ) at ε = 1 (the remaining points'
mean objective has the same minimiser). With g_U = (1/n)Σ_U ∇L(z_i, θ̂), H_U = (1/n)Σ_U ∇²L(z_i, θ̂), M ≈ (H + δI)⁻¹
the fitted solver, and f a test measurement::

    order 1:  Δ₁ = M g_U                                   Δf ≈ ∇fᵀΔ₁   (= Σ_U −I_up,loss/n)
    order 2:  Δ₂ = Δ₁ + M(H_U Δ₁ − ½∇³R[Δ₁, Δ₁])           Δf ≈ ∇fᵀΔ₂ + ½Δ₁ᵀ∇²f Δ₁
    newton:   Δ_N = (H + δI − H_U)⁻¹ g_U                   Δf = f(θ̂ + Δ_N) − f(θ̂)

Order 2 is θ(1) ≈ θ̂ + θ'(0) + ½θ''(0), the second-order expansion of the removal (Basu, You & Feizi 2020: the
H_U term couples the group's members, the term Σ_U −I_up,loss/n misses; the third-derivative term is the
curvature's own change). "newton" is one Newton step from θ̂ on the objective without U; its solve is the
system (M⁻¹ − H_U)x = g_U solved by conjugate gradients preconditioned by M itself, which needs only the fitted
solver and the group's own HVPs (M⁻¹ is carried along, never applied), and converges in about √(1/(1 − ρ))
iterations for ρ = ρ(M H_U) < 1, the share of the curvature the group holds.

Costs, for k groups: one training-gradient pass (the k sums g_U) and one block solve of k right-hand sides (order
1, cheaper than ``scores``); order 2 adds the group HVPs (Σ|U| examples, one tangent each), one pass of third
directional derivatives over the training set (k tangents, ~3 gradients each), a second block solve, and n_test × k
second directional derivatives of f; newton, per CG iteration, the group HVPs and one block solve, then k forward
passes over the test set.
"""

from __future__ import annotations

import functools
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import vmap

from ..core.autodiff import choose_hvp, per_example_hvp, second_directional, third_directional_sum
from ..core.checks import check_choice, check_indices, check_int, check_number
from ..core.errors import InfluenceKitError, InputError, InputTypeError, NumericalError
from ..core.folders import fingerprint
from ..core.progress import progress_bar
from ..core.results import GroupInfluence
from ..core.task import Task
from ..data.examples import Batch, Examples, batch_size_of
from ..solvers import SolveReport
from .fitted import FittedEngine

__all__ = ["ORDERS", "Groups", "parse_groups", "group_effects", "check_orders", "check_newton"]

ORDERS = ("1", "2", "newton")


@dataclass(frozen=True)
class Groups:
    """Groups of training points: ``members[g]`` the sorted distinct indices of group ``g`` named ``names[g]``."""

    members: tuple[np.ndarray, ...]
    names: tuple[str, ...]
    n: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(m) for m in self.members)

    def mask(self) -> np.ndarray:
        """``(n_groups, n)`` booleans: True where a training point belongs to the group (computed once and kept)."""
        return self._mask

    @functools.cached_property
    def _mask(self) -> np.ndarray:
        out = np.zeros((len(self.members), self.n), dtype=bool)
        for g, m in enumerate(self.members):
            out[g, m] = True
        return out

    def membership(self, lo: int, hi: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``(hi − lo, n_groups)`` 0/1 weights of the training points ``lo .. hi − 1``."""
        return torch.as_tensor(self.mask()[:, lo:hi].T, dtype=dtype, device=device)

    def fingerprint(self) -> str:
        return fingerprint({"mask": torch.as_tensor(self.mask())})


def _index_group(name: str, members: Any, n: int) -> np.ndarray:
    values = members.detach().cpu().numpy() if isinstance(members, torch.Tensor) else members
    if isinstance(values, np.ndarray) and values.dtype == np.bool_:
        if values.shape != (n,):
            raise InputError(
                f"the boolean mask of group {name!r} must have one entry per training point, shape ({n},). Got "
                f"{values.shape}."
            )
        values = np.flatnonzero(values)
        if len(values) == 0:
            raise InputError(f"group {name!r} is empty: its mask selects no training point.")
    return np.asarray(sorted(check_indices(f"groups[{name!r}]", values, n, unique=True)), dtype=np.int64)


def _label_column(column: np.ndarray, n: int) -> tuple[list[np.ndarray], list[str]]:
    if column.shape != (n,):
        raise InputError(
            f"`groups` as a label column must have one value per training point, shape ({n},). Got shape "
            f"{column.shape}; "
            "pass a list of index arrays or an (n_groups, n_train) boolean mask instead."
        )
    if column.dtype.kind == "f" and np.isnan(column).any():
        raise InputError(
            "the group label column has missing values (NaN) at training points "
            f"{np.flatnonzero(np.isnan(column))[:5].tolist()}; fill them (e.g. with -1) first."
        )
    if column.dtype == object and any(v is None for v in column):
        raise InputError("the group label column has missing values (None); fill them (e.g. with 'missing') first.")
    values, codes = np.unique(column, return_inverse=True)
    return [np.flatnonzero(codes == j) for j in range(len(values))], [str(v) for v in values]


def parse_groups(groups: Any, n: int) -> Groups:
    """Groups given as a list of index arrays (or boolean masks), a ``{name: indices}`` dict, an
    ``(n_groups, n)`` boolean mask matrix, or a label column of length n (one group per distinct value)."""
    if isinstance(groups, (dict, list, tuple)) and len(groups) == 0:
        raise InputError("`groups` must hold at least one group. Got none.")
    if isinstance(groups, dict):
        names = [str(k) for k in groups]
        members = [_index_group(name, groups[k], n) for name, k in zip(names, groups)]
    elif (
        isinstance(groups, (list, tuple))
        and groups
        and not isinstance(groups[0], (numbers.Number, str, bytes, np.generic))
    ):
        names = [str(g) for g in range(len(groups))]
        members = [_index_group(name, m, n) for name, m in zip(names, groups)]
    else:
        try:
            array = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
        except Exception as exc:
            raise InputTypeError(
                f"`groups` must be index arrays, a boolean mask matrix or a label column. Got {type(groups).__name__}."
            ) from exc
        if array.ndim == 2 and array.dtype == np.bool_:
            if array.shape[1] != n:
                raise InputError(
                    f"`groups` as a boolean mask matrix must have shape (n_groups, {n}). Got {array.shape}."
                )
            names = [str(g) for g in range(len(array))]
            members = [_index_group(name, row, n) for name, row in zip(names, array)]
        elif array.ndim == 1:
            members, names = _label_column(array, n)
        else:
            raise InputError(
                "`groups` must be a list of index arrays, a {name: indices} dict, an (n_groups, n_train) boolean mask "
                f"matrix, or a label column of length n_train. Got an array of shape {array.shape} and dtype "
                f"{array.dtype}."
            )
    whole = [name for name, m in zip(names, members) if len(m) >= n]
    if whole:
        raise InputError(f"group {whole[0]!r} holds every training point; removing it leaves nothing to retrain on.")
    return Groups(tuple(members), tuple(names), n)


# ------------------------------------------------------------------------------------------ the sums
class _Sums:
    """The training-side sums over groups: gradient sums, group HVPs and third derivatives (each rank its shard)."""

    def __init__(self, engine: FittedEngine, groups: Groups) -> None:
        self.engine, self.groups = engine, groups
        self.source, self.layout, self.shard = engine.gradients, engine.layout, engine.shard
        self.n = engine.n_train
        self._pairwise = True  # per-example HVPs over (member, group) pairs until the model refuses vmap
        start, stop = self.shard.start, self.shard.stop
        self._mine = [m[(m >= start) & (m < stop)] for m in groups.members]  # this rank's members of each group
        # the (member, group) pairs in training order, built once: the Newton solve asks for the group HVPs every
        # iteration
        pairs = sorted((int(i), g) for g, m in enumerate(self._mine) for i in m)
        self._pair_examples = [i for i, _ in pairs]
        self._pair_groups = torch.as_tensor([g for _, g in pairs], dtype=torch.long, device=self.layout.device)

    def _reduced(self, work: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.shard.all_reduce(self.shard.local(work)) / self.n

    def gradients(self) -> torch.Tensor:
        """``(k, n_params)`` g_U = (1/n)Σ_U ∇L(z_i, θ̂) (L2 included), from one training-gradient pass."""
        layout, shard = self.layout, self.shard

        def local() -> torch.Tensor:
            out = torch.zeros(len(self.groups.members), layout.n, dtype=layout.dtype, device=layout.device)
            for lo, G in self.source.stream(
                self.engine.train, side="train", start=shard.start, stop=shard.stop, desc="group gradients"
            ):
                out += self.groups.membership(lo, lo + len(G), layout.dtype, layout.device).T @ G
            return out

        return self._reduced(local)

    def group_hvps(self, V: torch.Tensor) -> torch.Tensor:
        """``(k, n_params)`` H_U v_U = (1/n)Σ_{i∈U} ∇²L(z_i, θ̂) v_U for each group's own row of ``V``.

        One per-example HVP per (member, group) pair, Σ|U| in all, vectorised over pairs in chunks of the gradient
        chunk size; where vmap cannot batch the model, one summed HVP per group and chunk instead."""
        l2 = self.engine.task.l2
        counts = torch.as_tensor([len(m) for m in self._mine], dtype=V.dtype, device=V.device)

        def local() -> torch.Tensor:
            if self._pairwise:
                try:
                    return self._pairs(V, l2 * counts[:, None] * V)
                except InfluenceKitError:
                    raise
                except Exception:  # the model cannot be batched over examples: one summed HVP per group and chunk
                    self._pairwise = False
            return self._per_group(V, l2 * counts[:, None] * V)

        return self._reduced(local)

    def _pairs(self, V: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        layout, chunk = self.layout, self.engine.chunks.grad
        for lo in range(0, len(self._pair_examples), chunk):
            batch = self.source.take(self.engine.train, self._pair_examples[lo : lo + chunk])
            g_idx = self._pair_groups[lo : lo + chunk]
            out.index_add_(
                0, g_idx, per_example_hvp(self.engine.task.loss, self.source.params, batch, layout, V[g_idx])
            )
        return out

    def _per_group(self, V: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        layout, chunk, task = self.layout, self.engine.chunks.hvp, self.engine.task
        hvp = None
        for g, members in enumerate(self._mine):
            mine = members.tolist()
            for lo in range(0, len(mine), chunk):
                batch = self.source.take(self.engine.train, mine[lo : lo + chunk])
                if hvp is None:  # the product the model supports, chosen once (the first product kept)
                    hvp, _, first = choose_hvp(task.loss, self.source.params, batch, layout, V[g : g + 1])
                    out[g] += first[0]
                else:
                    out[g] += hvp(task.loss, self.source.params, batch, layout, V[g : g + 1])[0]
        return out

    def third_derivatives(self, V: torch.Tensor) -> torch.Tensor:
        """``(k, n_params)`` ∇³R[v, v] for each row v of ``V`` (the L2 term has none), one pass over the training
        set."""
        engine, layout, shard = self.engine, self.layout, self.shard
        tangents = max(1, engine.chunks.tangents)

        def local() -> torch.Tensor:
            out = torch.zeros_like(V)
            for _, batch in self.source.batches(engine.train, shard.start, shard.stop, chunk=engine.chunks.hvp):
                for t in range(0, len(V), tangents):
                    out[t : t + tangents] += third_directional_sum(
                        engine.task.loss, self.source.params, batch, layout, V[t : t + tangents]
                    )
            return out

        return self._reduced(local)


# ------------------------------------------------------------------------------------------ the orders
def _newton(
    sums: _Sums, solve: Callable, g: torch.Tensor, *, tol: float, max_iter: int, progress: bool
) -> tuple[torch.Tensor, dict[str, Any], list[SolveReport]]:
    """Solve (M⁻¹ − H_U) x = g_U for every group by conjugate gradients preconditioned by M, the fitted solver.

    M⁻¹ is never applied: with search directions p = z + βp (z = M r) it is carried along as q = M⁻¹p = r + βq,
    so an iteration costs one block solve and the groups' own HVPs. Stops at ‖r‖ ≤ tol·‖g_U‖ per group."""
    x = torch.zeros_like(g)
    r = g.clone()
    z, report = solve(r)
    reports, p, q = [report], z.clone(), r.clone()
    rz = (r * z).sum(dim=1)
    floor = g.norm(dim=1) * max(tol, 100 * torch.finfo(g.dtype).eps)
    active = r.norm(dim=1) > floor
    bar = progress_bar(total=max_iter, desc="group Newton steps (preconditioned CG)", enabled=progress)
    iterations = 0
    try:
        while bool(active.any()) and iterations < max_iter:
            iterations += 1
            Ap = q - sums.group_hvps(p)
            curvature = (p * Ap).sum(dim=1)
            bad = active & (curvature <= 0)
            if bool(bad.any()):
                names = [sums.groups.names[i] for i in torch.nonzero(bad).flatten().tolist()[:5]]
                raise NumericalError(
                    f"the Newton step without groups {names} is undefined: the Hessian of the remaining training "
                    "points "
                    "plus damping is not positive definite along it (pᵀAp ≤ 0). Raise `damping`, or use order=1 or "
                    "order=2."
                )
            alpha = torch.where(active, rz / curvature.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(rz))
            x += alpha[:, None] * p
            r -= alpha[:, None] * Ap
            active = active & (r.norm(dim=1) > floor)
            bar.update(1)
            if not bool(active.any()):
                break
            z, report = solve(r)
            reports.append(report)
            rz_new = (r * z).sum(dim=1)
            beta = torch.where(active, rz_new / rz.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(rz))
            p, q, rz = z + beta[:, None] * p, r + beta[:, None] * q, rz_new
    finally:
        bar.close()
    residual = (r.norm(dim=1) / g.norm(dim=1).clamp_min(torch.finfo(g.dtype).tiny)).max()
    info = {
        "method": "conjugate gradients preconditioned by the fitted solver",
        "iterations": iterations,
        "converged": not bool(active.any()),
        "tol": tol,
        "relative_residual": float(residual),
    }
    return x, info, reports


def _moved_measurements(
    task: Task, params: dict[str, torch.Tensor], layout: Any, batch: Batch, deltas: torch.Tensor, block: int
) -> torch.Tensor:
    """``(k, B)`` f(θ̂ + Δ_g) − f(θ̂) on ``batch`` for each row Δ_g of ``deltas``: vmap over ``block`` rows at a time, or
    one forward per row where the model cannot be batched."""
    theta = layout.flatten(params)

    def at(delta: torch.Tensor) -> torch.Tensor:
        return task.measurement(layout.unflatten(theta + delta), batch)

    with torch.no_grad():
        before = task.measurement(params, batch)
        try:
            after = torch.cat([vmap(at)(deltas[t : t + block]) for t in range(0, len(deltas), block)])
        except InfluenceKitError:
            raise
        except Exception:
            after = torch.stack([at(d) for d in deltas])
    return after - before


def _test_values(
    engine: FittedEngine,
    test: Examples,
    deltas: dict[str, torch.Tensor],
    curvature: torch.Tensor | None,
    newton: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """``(k, n_test)`` per order: ∇fᵀΔ (+ ½Δ₁ᵀ∇²fΔ₁ for order 2), and f(θ̂ + Δ_N) − f(θ̂) for newton."""
    source, layout, task = engine.gradients, engine.layout, engine.task
    k = len(next(iter(deltas.values()))) if deltas else len(newton)  # type: ignore[arg-type]
    out = {
        o: torch.empty(k, len(test), dtype=layout.dtype, device=layout.device)
        for o in [*deltas, *(["newton"] if newton is not None else [])]
    }
    for lo, G in source.stream(test, side="test", desc="test gradients"):
        for order, D in deltas.items():
            out[order][:, lo : lo + len(G)] = D @ G.T
    if curvature is None and newton is None:
        return out
    params, tangents = source.params, max(1, engine.chunks.tangents)
    for lo, batch in source.batches(test):
        if curvature is not None:
            for t in range(0, k, tangents):
                part = second_directional(task.measurement, params, batch, layout, curvature[t : t + tangents])
                out["2"][t : t + len(part), lo : lo + part.shape[1]] += 0.5 * part
        if newton is not None:
            out["newton"][:, lo : lo + batch_size_of(batch)] = _moved_measurements(
                task, params, layout, batch, newton, tangents
            )
    return out


def group_effects(
    engine: FittedEngine,
    groups: Groups,
    test: Examples,
    orders: Sequence[str],
    *,
    newton_tol: float = 1e-6,
    newton_max_iter: int = 100,
) -> dict[str, GroupInfluence]:
    """The :class:`GroupInfluence` of each of ``orders`` for ``groups`` on ``test`` (shared work computed once)."""
    start = time.perf_counter()
    solve, metadata = engine.solve, engine.metadata
    sums = _Sums(engine, groups)
    g = sums.gradients()
    D1, report1 = solve(g)
    deltas: dict[str, torch.Tensor] = {}
    reports: dict[str, list[SolveReport]] = {"1": [report1]}
    extra: dict[str, dict[str, Any]] = {"1": {}}
    if "1" in orders:
        deltas["1"] = D1
    if "2" in orders:
        correction, report2 = solve(sums.group_hvps(D1) - 0.5 * sums.third_derivatives(D1))
        deltas["2"] = D1 + correction
        reports["2"], extra["2"] = [report1, report2], {}
    newton = None
    if "newton" in orders:
        newton, info, newton_reports = _newton(
            sums, solve, g, tol=newton_tol, max_iter=newton_max_iter, progress=engine.progress
        )
        reports["newton"], extra["newton"] = [report1, *newton_reports], {"newton": info}
    values = _test_values(engine, test, deltas, D1 if "2" in orders else None, newton)
    changes = {**deltas, **({"newton": newton} if newton is not None else {})}
    seconds = time.perf_counter() - start
    return {
        order: GroupInfluence(
            values[order],
            changes[order],
            groups.names,
            groups.sizes,
            order,
            groups.n,
            metadata(reports[order], group_order=order, n_groups=len(groups.members), seconds=seconds, **extra[order]),
        )
        for order in orders
    }


def check_orders(order: Any) -> tuple[str, ...]:
    """``order`` (1, 2, "newton" or a sequence of them) as a tuple of the names in :data:`ORDERS`."""
    items = order if isinstance(order, (list, tuple)) else [order]
    out = []
    for item in items:
        name = str(item) if isinstance(item, numbers.Integral) and not isinstance(item, bool) else item
        out.append(check_choice("order", name, ORDERS, extra=" (or 1, 2)"))
    if not out:
        raise InputError("`order` must name at least one of 1, 2, 'newton'. Got an empty sequence.")
    return tuple(dict.fromkeys(out))


def check_newton(tol: Any, max_iter: Any) -> tuple[float, int]:
    return check_number("newton_tol", tol, low=0.0, low_inclusive=False), check_int("newton_max_iter", max_iter, low=1)
