"""The configuration of an influence computation, checked once, and the provenance record of a fitted one.

:class:`InfluenceConfig` holds what a user passed to :class:`~influencekit.Influence` (validated at
construction, the solver made once); :class:`Provenance` is what a fit produced it from (task, solver,
damping, dtype, parameter shapes, a fingerprint of θ̂, n_train). Every manifest (solver cache, score folder,
gradient store), every result's metadata and the ranks' agreement check are built from these two records, so
they cannot disagree on a field. :class:`Chunks` are the chunk sizes derived from the memory budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.autodiff import ParamLayout, input_size_per_example
from ..core.checks import check_choice, check_int, check_number, parse_bytes
from ..core.errors import InputTypeError
from ..core.folders import fingerprint
from ..core.layers import GRADIENT_METHODS
from ..core.results import CONVENTION
from ..core.task import Task
from ..solvers import Solver, SolveReport, make_solver
from .gradients import PRECISIONS

__all__ = ["InfluenceConfig", "Provenance", "Chunks", "plan_chunks", "MANIFEST_FORMAT"]

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class InfluenceConfig:
    """The validated arguments of :class:`~influencekit.Influence` (see its docstring for each)."""

    solver: Solver
    damping: float = 0.0
    batch_size: int | None = None
    memory_budget: int = 2 * 2**30
    stationarity_tol: float | None = 1e-3
    progress: bool = False
    distributed: bool | None = None
    gradients: str = "auto"
    cache_dir: str | os.PathLike | None = None
    precision: str = "full"
    solver_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_arguments(
        cls,
        *,
        solver: str | Solver,
        damping: float,
        solver_options: dict[str, Any] | None,
        batch_size: int | None,
        memory_budget: int | str,
        stationarity_tol: float | None,
        progress: bool,
        distributed: bool | None,
        gradients: str,
        cache_dir: str | os.PathLike | None,
        precision: str,
    ) -> InfluenceConfig:
        """Check every argument (raising the error that names it) and make the solver."""
        damping = check_number("damping", damping, low=0.0)
        options = dict(solver_options or {})
        batch_size = None if batch_size is None else check_int("batch_size", batch_size, low=1)
        budget = parse_bytes("memory_budget", memory_budget)
        tol = None if stationarity_tol is None else check_number("stationarity_tol", stationarity_tol, low=0.0)
        if distributed is not None and not isinstance(distributed, bool):
            raise InputTypeError(f"`distributed` must be None, True or False. Got {distributed!r}.")
        check_choice("gradients", gradients, GRADIENT_METHODS)
        check_choice("precision", precision, PRECISIONS)
        return cls(
            make_solver(solver, **options),
            damping,
            batch_size,
            budget,
            tol,
            bool(progress),
            distributed,
            gradients,
            cache_dir,
            precision,
            options,
        )


@dataclass(frozen=True)
class Provenance:
    """What a fitted :class:`~influencekit.Influence` was computed from; manifests and metadata are views of it."""

    task: dict[str, Any]
    solver: dict[str, Any]
    damping: float
    dtype: str
    parameters: tuple[tuple[str, tuple[int, ...]], ...]
    n_params: int
    n_train: int
    theta_fingerprint: str
    precision: str

    @classmethod
    def of(
        cls, task: Task, solver: Solver, config: InfluenceConfig, params: dict[str, torch.Tensor], n_train: int
    ) -> Provenance:
        layout = ParamLayout.of(params)
        return cls(
            task.describe(),
            solver.describe(),
            config.damping,
            str(layout.dtype),
            tuple((name, tuple(shape)) for name, shape in zip(layout.names, layout.shapes)),
            layout.n,
            n_train,
            fingerprint(params),
            config.precision,
        )

    def manifest(self, kind: str, fields: tuple[str, ...], **extra: Any) -> dict[str, Any]:
        """``{"kind", "format", <fields of this record>, **extra}`` for a folder's ``manifest.json``."""
        values = {name: getattr(self, name) for name in fields}
        if "parameters" in values:
            values["parameters"] = [[name, list(shape)] for name, shape in self.parameters]
        return {"kind": kind, "format": MANIFEST_FORMAT, **values, **extra}

    def result_metadata(self, method: str, fields: tuple[str, ...], **extra: Any) -> dict[str, Any]:
        """A result's metadata: ``method``, the sign convention, the chosen fields of this record (``task`` and
        ``solver`` spread into their settings), then ``extra``."""
        values: dict[str, Any] = {"method": method, "convention": CONVENTION}
        for name in fields:
            value = getattr(self, name)
            values.update(value if name in ("task", "solver") else {name: value})
        return {**values, **extra}

    def metadata(self, reports: list[SolveReport], grad_norm: float, **extra: Any) -> dict[str, Any]:
        """The metadata of an :class:`~influencekit.Influence` query: task, solver, damping, solve reports."""
        return self.result_metadata(
            "I_up,loss",
            ("task", "solver", "damping", "dtype", "n_params"),
            grad_norm=grad_norm,
            precision=self.precision,
            solve_reports=[r.to_dict() for r in reports],
            **extra,
        )

    def agreement(self, config: InfluenceConfig) -> dict[str, Any]:
        """What every rank of a process group must hold equal (checked before the first collective)."""
        return {
            "n_train": self.n_train,
            "parameters": self.parameters,
            "dtype": self.dtype,
            "theta_sha256": self.theta_fingerprint,
            "task": repr(sorted(self.task.items())),
            "solver": repr(sorted(self.solver.items())),
            "damping": self.damping,
            "batch_size": config.batch_size,
            "memory_budget": config.memory_budget,
        }


CHUNK_BYTES = 512 * 2**20  # the most a chunk of per-example gradients (rows, activations) takes without batch_size
VMAP_TENSOR_BYTES = 32 * 2**20  # the most bytes of activations a vectorised HVP call holds per copy (plan_chunks)


@dataclass(frozen=True)
class Chunks:
    """Chunk sizes derived from the memory budget."""

    grad: int  # examples per per-example-gradient chunk
    hvp: int  # examples per HVP chunk
    tangents: int  # right-hand sides per vectorised HVP
    queries: int  # test points solved together


def plan_chunks(
    task: Task,
    params: dict[str, torch.Tensor],
    first: Any,
    n: int,
    *,
    batch_size: int | None,
    memory_budget: int,
    without_rows: bool = False,
) -> Chunks:
    """Chunk sizes for ``n`` training examples from the budget and a one-example probe ``first`` of the
    model's activation size (:func:`~influencekit.core.autodiff.input_size_per_example`), unless ``batch_size``.

    A query block takes a quarter of the budget: the gradients, the solution or, for a solver that solves in place,
    the gradient chunks that fill the block, and the solve's work, while the training side holds chunks of whole
    gradient rows. ``without_rows`` (the solver solves in place and layer taps give the gradients, which are then
    written into the block and scored a layer at a time, :meth:`GradientSource.parts`): one copy of the block beside
    one chunk's taps and activations (4·c_g·a values, as below), so the block takes what they leave, at least a
    quarter (MiniLM's last block, 200 queries, 2 GiB: one block instead of two, docs/benchmarks.md)."""
    layout = ParamLayout.of(params)
    task.check_forward(params, first, "train")  # a model that cannot take the data: say so in words, not torch's
    act = input_size_per_example(task.loss, params, first, task.model)
    item = torch.finfo(layout.dtype).bits // 8
    p = layout.n
    budget = memory_budget
    # vmap(grad): per-example gradient rows plus a few copies of activations per example. A chunk runs at full speed
    # well before it fills the budget (the score product is wide enough at ~64 rows), so it holds at most CHUNK_BYTES
    # of rows and activations, or 64 examples: on the LDS MLP (101,770 parameters) the budget's 2,590-row chunks
    # peaked at 1,668 MiB, 659-row chunks at 909 MiB, in the same time
    per_example = item * (2 * p + 4 * act)
    grad = batch_size or max(1, min(n, 4096, budget // per_example, max(64, CHUNK_BYTES // per_example)))
    # HVP chunks (also K-FAC's factor passes): large enough that a small model's HVP is one call (per-call
    # overhead dominated there: the digits MLP's HVP took 21 ms in chunks of 1,024 + 176 examples, 11 ms in one),
    # small enough to leave room for 16 tangents per vectorised call, and at least 256 examples where one tangent
    # of 256 fits the budget (1M-parameter CNN: 0.99 ms/example per HVP in chunks of 256, 1.78 in chunks of 1,024).
    # A transformer block has ~1.5M activation values per 128-token example: 256 of them held 12.8 GB.
    one_tangent = max(1, budget // (item * 6 * act))
    hvp = batch_size or max(1, min(n, max(min(256, one_tangent), budget // (item * 6 * act * 16))))
    # vmap over tangents of jvp(grad): each tangent carries activations of the whole chunk and a gradient, and each
    # vectorised intermediate is (tangents, hvp, width). Kept under VMAP_TENSOR_BYTES, the allocator reuses freed
    # memory instead of mapping (and zero-filling) fresh pages for every operation: the digits MLP's 597 HVPs over
    # 1,200 examples took 9.0 s in blocks of 110 tangents (the budget's), 3.7 s in blocks of 8 (one thread)
    tangents = max(1, min(4096, budget // (item * 6 * (hvp * act + p)), VMAP_TENSOR_BYTES // (item * hvp * act)))
    queries = max(1, budget // (item * 4 * p))
    if without_rows:
        queries = max(queries, (budget - item * grad * 4 * act) // (item * p))
    return Chunks(grad=grad, hvp=hvp, tangents=tangents, queries=queries)
