"""The curvature operator (H + δI) of the training objective at θ̂, applied with Hessian-vector products.

    H = ∇²R(θ̂) = (1/n) Σ_i ∇²ℓ(z_i, θ̂) + λI

The L2 part is added analytically (λv), the data part by forward-over-reverse HVPs streamed over the
training set in chunks, so memory stays bounded for any number of examples. Solvers receive this object
in ``fit(operator)`` and read the objective only through it (the protocol: :mod:`influencekit.core.curvature`).

Under a ``torch.distributed`` group (``shard=``, see :mod:`influencekit.core.distributed`) each rank streams its own
contiguous part of the data and the sums are all-reduced, so every rank gets the same products.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..core.autodiff import ParamLayout, choose_hvp
from ..core.curvature import LayerData
from ..core.distributed import LocalShard, Shard
from ..core.errors import CurvatureWarning, NumericalError
from ..core.progress import progress_bar
from ..core.spectrum import lanczos_extremes
from ..core.task import Task
from ..data.examples import Batch, Examples, grouped_stream, stream, take

__all__ = ["HessianOperator", "check_curvature"]

logger = logging.getLogger(__name__)


class HessianOperator:
    """``V ↦ V (H + δI)`` for blocks ``V`` of shape ``(k, n_params)`` (H is symmetric, so rows or columns alike).

    Args:
        task: the task (its ``loss`` and ``l2``).
        params: θ̂, the selected parameters.
        data: the training examples.
        damping: δ ≥ 0 added to the diagonal.
        batch_size: examples per HVP chunk.
        tangent_block: right-hand sides per vectorised HVP call.
        weights: optional per-example weights ``(n,)``; H is then the Hessian of Σ w_i L_i / Σ w_i
            (used by retraining; influence itself uses uniform weights).
        shard: this rank's part of ``data`` under torch.distributed; sums over the data are then taken on
            the shard and all-reduced (``data`` is still the whole training set, indexed globally). ``None``:
            the whole set in this process.

    It follows :class:`~influencekit.core.curvature.CurvatureOperator` with every capability.
    """

    capabilities = frozenset({"minibatch", "dense", "layers"})

    def __init__(
        self,
        task: Task,
        params: dict[str, torch.Tensor],
        data: Examples,
        *,
        damping: float,
        batch_size: int,
        tangent_block: int,
        progress: bool = False,
        weights: torch.Tensor | None = None,
        shard: Shard | None = None,
    ) -> None:
        self.task = task
        self.params = params
        self.layout = ParamLayout.of(params)
        self.data = data
        self.damping = float(damping)
        self.l2 = float(task.l2)
        self.batch_size = int(batch_size)
        self.tangent_block = max(1, int(tangent_block))
        self.progress = progress
        self.weights = None if weights is None else torch.as_tensor(weights).to(self.layout.device, self.layout.dtype)
        self._total_weight = float(len(data)) if weights is None else float(self.weights.sum())
        self.shard = LocalShard(n=len(data)) if shard is None else shard
        self.hvp_count = 0  # Hessian-vector products over the full data set (one per right-hand side)
        self.hvp_method = ""  # "forward-over-reverse", or "autograd loop" for a model jvp/vmap cannot trace
        self.dense_method = ""  # how dense() built H, once called
        self._hvp: Any = None  # chosen on the first product (autodiff.choose_hvp)

    @property
    def n_params(self) -> int:
        return self.layout.n

    @property
    def n_examples(self) -> int:
        return len(self.data)

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.layout.device

    @property
    def shift(self) -> float:
        """λ + δ: what is added to the data Hessian's diagonal."""
        return self.l2 + self.damping

    def _loss_fn(self, offset: int | None) -> Any:
        if self.weights is None or offset is None:
            return self.task.loss
        w = self.weights

        def weighted(params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
            losses = self.task.loss(params, batch)
            return losses * w[offset : offset + losses.shape[0]]

        return weighted

    def _data_hvp(self, batch: Batch, V: torch.Tensor, offset: int | None = None) -> torch.Tensor:
        fn = self._loss_fn(offset)
        out = torch.empty_like(V)
        for lo in range(0, V.shape[0], self.tangent_block):
            hi = min(lo + self.tangent_block, V.shape[0])
            out[lo:hi] = self._products(fn, batch, V[lo:hi])
        return out

    def _products(self, fn: Any, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        """H_batch V with the HVP method chosen on the first product
        (:func:`~influencekit.core.autodiff.choose_hvp`)."""
        if self._hvp is None:
            self._hvp, self.hvp_method, out = choose_hvp(fn, self.params, batch, self.layout, V)
            logger.info("HVPs: %s", self.hvp_method)
            return out
        return self._hvp(fn, self.params, batch, self.layout, V)

    def _check(self, out: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(out).all()):
            raise NumericalError(
                "a Hessian-vector product is not finite: the loss or its curvature overflows at θ̂. "
                "Check the model's outputs for NaN/inf, or compute in float64."
            )
        return out

    def damp(self, HV: torch.Tensor, V: torch.Tensor | None = None) -> torch.Tensor:
        """``HV + δV`` (``V`` omitted: ``HV + δ``): the one place where the damping is added."""
        return HV + self.damping * (1.0 if V is None else V)

    def damp_matrix(self, H: torch.Tensor) -> torch.Tensor:
        """``H + δI`` for an explicit ``(n_params, n_params)`` H, as a copy (no identity matrix is allocated)."""
        out = H.clone()
        out.diagonal().add_(self.damping)
        return out

    def _diagonal(self, damped: bool) -> float:
        """What is added to the data part of a product: λ + δ, or λ alone for the undamped H."""
        return self.shift if damped else self.l2

    def _summed(self, work: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``work()`` (a sum over this process's data), summed over the ranks of the process group."""
        return self.shard.all_reduce(self.shard.local(work))

    def _stream_options(self) -> dict[str, Any]:
        """This rank's examples, on the parameters' device and dtype, checked by the task: what both streams take."""
        return {
            "dtype": self.dtype,
            "device": self.device,
            "check": self.task.check_batch,
            "start": self.shard.start,
            "stop": self.shard.stop,
        }

    def _stream(self) -> Iterator[tuple[int, Any]]:
        return stream(self.data, self.batch_size, **self._stream_options())

    def _layer_stream(self) -> Iterator[tuple[Sequence[int], Any]]:
        """``(indices, batch)`` over this rank's examples for the layer solvers' sums, whose order does not matter:
        token sequences of unequal lengths in batches of similar lengths
        (:func:`~influencekit.data.examples.grouped_stream`)."""
        return grouped_stream(self.data, self.batch_size, **self._stream_options())

    def layer_data(self) -> LayerData:
        """The task, θ̂ (detached) and this rank's data stream, for solvers that read the model's layers."""
        return LayerData(
            self.task,
            {k: v.detach() for k, v in self.params.items()},
            self.layout,
            self.n_examples,
            self.weights is not None,
            self.shard,
            self._layer_stream,
        )

    def matvec(self, V: torch.Tensor, *, damped: bool = True) -> torch.Tensor:
        """(H + δI) applied to each row of ``V`` ``(k, n_params)`` over the whole training set; H V if not
        ``damped``."""
        V = V.to(self.dtype)

        def local() -> torch.Tensor:
            acc = torch.zeros_like(V)
            for lo, batch in self._stream():
                acc += self._data_hvp(batch, V, lo)
            return acc

        acc = self._summed(local)
        self.hvp_count += V.shape[0]
        return self._check(acc / self._total_weight + self._diagonal(damped) * V)

    def minibatch_matvec(
        self, V: torch.Tensor, indices: torch.Tensor, *, damped: bool = True, chunk: int | None = None
    ) -> torch.Tensor:
        """(H_B + δI) V with H_B the Hessian of the mean loss over the examples ``indices`` (plus λI); H_B V if
        not ``damped``. ``chunk``: examples per HVP call (default ``batch_size``; smaller holds less memory)."""
        if self.weights is not None:
            raise NotImplementedError("mini-batch products of a weighted objective are not defined; use matvec().")
        V = V.to(self.dtype)
        indices = torch.as_tensor(indices, dtype=torch.long)
        # the same global indices on every rank; each takes those in its shard
        mine = indices[(indices >= self.shard.start) & (indices < self.shard.stop)]
        step = self.batch_size if chunk is None else max(1, int(chunk))

        def local() -> torch.Tensor:
            acc = torch.zeros_like(V)
            for lo in range(0, len(mine), step):  # in HVP chunks: a large sample must not blow the memory
                batch = take(
                    self.data, mine[lo : lo + step], dtype=self.dtype, device=self.device, check=self.task.check_batch
                )
                acc += self._data_hvp(batch, V)
            return acc

        return self._check(self._summed(local) / len(indices) + self._diagonal(damped) * V)

    def dense(self, *, progress: bool | None = None) -> torch.Tensor:
        """The explicit Hessian H ``(n_params, n_params)`` *without* damping, symmetrised.

        In closed form when the selection is a final Linear layer under cross-entropy
        (:mod:`~influencekit.engine.last_layer`: one pass over the layer's inputs, checked against two HVPs); else built
        from
        HVPs with identity blocks, the data streamed once (outer loop) so a costly data set is read a single time.
        Memory: one ``n_params²`` matrix plus a tangent block. ``dense_method`` records which ran.
        """
        from .last_layer import CLOSED_FORM, last_linear_hessian

        closed = last_linear_hessian(self)
        if closed is not None:
            self.dense_method = CLOSED_FORM
            return self._check(closed)
        self.dense_method = "HVPs with identity blocks"
        p = self.n_params
        eye_block = self.tangent_block
        n_local = self.shard.stop - self.shard.start
        n_chunks = -(-n_local // self.batch_size)

        def local() -> torch.Tensor:
            H = torch.zeros(p, p, dtype=self.dtype, device=self.device)
            bar = progress_bar(
                total=n_chunks * (-(-p // eye_block)),
                desc="dense Hessian",
                enabled=self.progress if progress is None else progress,
            )
            for offset, batch in self._stream():
                fn = self._loss_fn(offset)
                for lo in range(0, p, eye_block):
                    hi = min(lo + eye_block, p)
                    E = torch.zeros(hi - lo, p, dtype=self.dtype, device=self.device)
                    E[torch.arange(hi - lo), torch.arange(lo, hi)] = 1
                    H[lo:hi] += self._products(fn, batch, E)
                    bar.update(1)
            bar.close()
            return H

        H = self._summed(local)
        self.hvp_count += p
        H /= self._total_weight
        H = 0.5 * (H + H.T)
        H.diagonal().add_(self.l2)
        return self._check(H)


def check_curvature(operator: HessianOperator, *, steps: int = 30, seed: int = 0) -> tuple[float, float]:
    """Lanczos estimates ``(λ_min, λ_max)`` of H + δI from ``steps`` full-data HVPs; warns with
    :class:`~influencekit.core.errors.CurvatureWarning` and a damping that removes the negative curvature when λ_min ≤
    0."""
    lo, hi = lanczos_extremes(
        operator.matvec, operator.n_params, steps=steps, dtype=operator.dtype, device=operator.device, seed=seed
    )
    if lo <= 0:
        warnings.warn(
            f"H + δI has negative curvature (Lanczos estimate of its smallest eigenvalue: {lo:.3g} with damping "
            f"{operator.damping:g}); use damping >= {operator.damping - lo * 1.5:.3g} (Lanczos under-estimates "
            "|λ_min|; "
            "raise `steps` for a tighter figure).",
            CurvatureWarning,
            stacklevel=3,
        )
    return lo, hi
