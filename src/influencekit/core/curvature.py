"""What solvers may ask of the curvature: the operator protocol, and the layer view that K-FAC needs.

A solver's ``fit(operator)`` receives an object that follows :class:`CurvatureOperator` (in the library:
:class:`~influencekit.engine.hessian.HessianOperator`) and reads the training objective only through it. The
operator owns the damping δ: its products are of H + δI unless a solver asks for ``damped=False``, and
:meth:`CurvatureOperator.damp` is the one place that adds δ to a product or to eigenvalues of H that a
solver computed itself. Optional abilities are declared in ``capabilities``:

- ``"minibatch"``: :meth:`~CurvatureOperator.minibatch_matvec` on a subset of the examples;
- ``"dense"``: :meth:`~CurvatureOperator.dense`, the explicit H;
- ``"layers"``: :meth:`~CurvatureOperator.layer_data`, the task, θ̂ and this rank's data stream, for solvers
  that build their own curvature from the model's layers (K-FAC/EK-FAC).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .autodiff import ParamLayout
from .distributed import Shard
from .task import Task

__all__ = ["CurvatureOperator", "LayerData"]


@dataclass(frozen=True)
class LayerData:
    """The layer-structure view of a training objective (capability ``"layers"``).

    Attributes:
        task: the task (its model, loss and label handling).
        params: θ̂, the selected parameters (detached).
        layout: their flat layout.
        n_examples: the size of the whole training set.
        weighted: whether the objective weights its examples (solvers may refuse it).
        shard: this process's part of the data and the collectives.
        batches: ``batches()`` yields ``(global indices, batch)`` over this process's examples, each once, in an
            order of its choosing (batches of similar lengths for padded sequences): for sums over the data.
    """

    task: Task
    params: dict[str, torch.Tensor]
    layout: ParamLayout
    n_examples: int
    weighted: bool
    shard: Shard
    batches: Callable[[], Iterator[tuple[Sequence[int], Any]]]

    def summed(self, work: Callable[[], None], sums: list[torch.Tensor]) -> None:
        """Run ``work()`` (which adds this rank's examples into ``sums``), then add ``sums`` across the ranks, in
        place, with one all_reduce: every rank then holds the same totals, bit for bit (a failure in one rank's
        ``work`` ends every rank, :meth:`~influencekit.core.distributed.Shard.local`)."""
        self.shard.local(work)
        if not sums:
            return
        flat = self.shard.all_reduce(torch.cat([t.reshape(-1) for t in sums]))
        offset = 0
        for t in sums:
            t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
            offset += t.numel()


@runtime_checkable
class CurvatureOperator(Protocol):
    """``V ↦ V (H + δI)`` for blocks ``V`` ``(k, n_params)`` (H symmetric), and what a solver may ask besides."""

    capabilities: frozenset[str]
    damping: float  # δ
    hvp_count: int  # full-data Hessian-vector products so far (one per right-hand side)

    @property
    def n_params(self) -> int: ...

    @property
    def n_examples(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def shift(self) -> float:
        """λ + δ: what the L2 term and the damping add to the data curvature's diagonal."""
        ...

    def matvec(self, V: torch.Tensor, *, damped: bool = True) -> torch.Tensor:
        """(H + δI) V over the whole training set (H V with ``damped=False``)."""
        ...

    def minibatch_matvec(
        self, V: torch.Tensor, indices: torch.Tensor, *, damped: bool = True, chunk: int | None = None
    ) -> torch.Tensor:
        """(H_B + δI) V with H_B the Hessian of the mean loss over ``indices`` (plus λI), ``chunk`` examples per
        HVP call (default: the operator's HVP chunk)."""
        ...

    def dense(self, *, progress: bool | None = None) -> torch.Tensor:
        """The explicit H ``(n_params, n_params)``, without damping."""
        ...

    def damp(self, HV: torch.Tensor, V: torch.Tensor | None = None) -> torch.Tensor:
        """``HV + δV`` (``V`` omitted: ``HV + δ``, e.g. eigenvalues of H to those of H + δI)."""
        ...

    def damp_matrix(self, H: torch.Tensor) -> torch.Tensor:
        """``H + δI`` for an explicit H, as a copy."""
        ...

    def layer_data(self) -> LayerData: ...
