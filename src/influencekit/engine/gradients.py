"""Per-example gradients of a task at θ̂, streamed in chunks: the one source every query reads.

The training side is ∇L(z, θ̂) = ∇ℓ(z, θ̂) + λθ̂ (the L2 term added analytically), the test side
∇(measurement)(z_test, θ̂). How a chunk is differentiated is chosen per side on its first chunk
(:func:`~influencekit.core.layers.choose_per_example`: layer taps when they cover the selected parameters and
agree with ``vmap(grad)``, ``vmap(grad)`` otherwise) and kept in :attr:`GradientSource.methods`. Every
chunk's losses and gradients are checked to be finite, naming the offending examples.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ..core.autodiff import ParamLayout, batch_grad_sum, per_example_grads
from ..core.checks import check_choice
from ..core.distributed import Shard
from ..core.errors import NumericalError, StationarityWarning, UnsupportedError
from ..core.layers import GRADIENT_METHODS, DensePiece, GradientPiece, LayerGradients, LayerTaps, choose_per_example
from ..core.lowrank import Factors, factor_blocks
from ..core.memory import Workspace
from ..core.progress import progress_bar
from ..core.task import Task
from ..data.examples import Batch, Examples, batch_size_of, columns, grouped_stream, stream, take

__all__ = [
    "GradientSource",
    "PRECISIONS",
    "SIDES",
    "check_losses",
    "check_grads",
    "matmul_precision",
    "objective_gradient_norm",
]

logger = logging.getLogger(__name__)

SIDES = ("train", "test")
PRECISIONS = ("full", "tf32", "bf16")  # the arithmetic of scoring's gradient products


def check_losses(losses: torch.Tensor, name: str, offset: int) -> None:
    """Raise :class:`NumericalError` naming the examples (global indices) whose loss is NaN/inf."""
    if not bool(torch.isfinite(losses).all()):
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        raise NumericalError(
            f"the loss is not finite for `{name}` example(s) {[offset + b for b in bad[:5]]}: check those examples "
            "and the model's outputs (e.g. log of 0, overflow); compute in float64 if values are extreme."
        )


def check_grads(G: torch.Tensor, name: str, offset: int) -> None:
    """Raise :class:`NumericalError` naming the examples whose gradient row holds NaN/inf."""
    # a NaN or inf entry makes its row's sum NaN or inf: one reduction, no (B, p) mask for a clean chunk
    # (the elementwise check runs only when a row sum is not finite, e.g. an overflowing sum)
    if bool(torch.isfinite(G.sum(dim=1)).all()):
        return
    finite = torch.isfinite(G).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise NumericalError(
            f"the loss gradient is not finite for `{name}` example(s) {[offset + b for b in bad[:5]]} although the "
            "loss is: the model is not differentiable there (e.g. sqrt or abs at 0, a hard clamp). Smooth the model "
            "or remove those examples."
        )


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """With ``precision="tf32"``: float32 matrix products may use TensorFloat-32 inside; restored after."""
    if precision != "tf32":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class GradientSource:
    """Per-example gradients of ``task`` at ``params`` over any :class:`~influencekit.data.examples.Examples`.

    Args:
        task: the task (its ``loss``, ``measurement``, ``l2``, ``check_batch`` and ``model``).
        params: θ̂, the selected parameters (a detached copy taken at fit).
        chunk: examples per gradient chunk.
        method: ``"auto" | "layers" | "vmap" | "loop"`` (see ``gradients`` of :class:`~influencekit.Influence`).
        precision: ``"full" | "tf32" | "bf16"``; ``"tf32"`` lets float32 gradient products use TF32.
        progress: show a bar per stream.
    """

    def __init__(
        self,
        task: Task,
        params: dict[str, torch.Tensor],
        *,
        chunk: int,
        method: str = "auto",
        precision: str = "full",
        progress: bool = False,
    ) -> None:
        self.task = task
        self.params = params
        self.layout = ParamLayout.of(params)
        self.chunk = int(chunk)
        self.method = check_choice("gradients", method, GRADIENT_METHODS)
        self.precision = check_choice("precision", precision, PRECISIONS)
        self.progress = progress
        self.methods: dict[str, str] = {}  # side -> "layers" | "vmap" | "loop", once chosen
        self.reasons: dict[str, str] = {}  # side -> why that method (the fallbacks tried)
        self._chosen: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
        self._l2_term = task.l2 * self.layout.flatten(params) if task.l2 else None

    def describe(self) -> dict[str, dict[str, str]]:
        """Per side computed so far: the method and why (for result metadata)."""
        return {side: {"method": m, "reason": self.reasons.get(side, "")} for side, m in self.methods.items()}

    def function(self, side: str) -> Callable[..., torch.Tensor]:
        """The per-example function differentiated on ``side``: the loss (train) or the measurement (test)."""
        return self.task.loss if check_choice("side", side, SIDES) == "train" else self.task.measurement

    def batches(
        self, data: Examples, start: int = 0, stop: int | None = None, chunk: int | None = None
    ) -> Iterator[tuple[int, Any]]:
        """``(offset, batch)`` chunks of ``data[start:stop]`` on the parameters' device and dtype, checked by the
        task."""
        layout = self.layout
        yield from stream(
            data,
            chunk or self.chunk,
            dtype=layout.dtype,
            device=layout.device,
            check=self.task.check_batch,
            start=start,
            stop=stop,
        )

    def take(self, data: Examples, indices: Sequence[int]) -> Any:
        """The examples ``indices`` of ``data`` as one batch, as :meth:`batches` would give them."""
        layout = self.layout
        return take(data, list(indices), dtype=layout.dtype, device=layout.device, check=self.task.check_batch)

    def stream(
        self, data: Examples, *, side: str, start: int = 0, stop: int | None = None, desc: str = ""
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, G)`` with ``G`` the ``(chunk, n_params)`` per-example gradients of ``data[start:stop]``."""
        stop = len(data) if stop is None else stop
        bar = progress_bar(total=stop - start, desc=desc or f"{data.name} gradients", enabled=self.progress)
        for lo, batch in self.batches(data, start, stop):
            G = self._rows(side, batch, data.name, lo, self.precision)
            bar.update(batch_size_of(batch))
            yield lo, G
        bar.close()

    def block(
        self, data: Examples, *, side: str, start: int = 0, stop: int | None = None, desc: str = ""
    ) -> torch.Tensor:
        """The per-example gradients of ``data[start:stop]`` as one ``(stop - start, n_params)`` tensor, each chunk's
        pieces (:meth:`parts`) written into it as they come: no chunk of whole rows besides the block itself."""
        stop = len(data) if stop is None else stop
        G = torch.empty(stop - start, self.layout.n, dtype=self.layout.dtype, device=self.layout.device)
        for indices, pieces in self.parts(data, side=side, start=start, stop=stop, desc=desc, in_order=True):
            rows = G[columns(indices, start)]
            for piece in pieces:
                piece.write(rows)
            if side == "train" and self._l2_term is not None:
                rows += self._l2_term
        return G

    def parts(
        self,
        data: Examples,
        *,
        side: str,
        start: int = 0,
        stop: int | None = None,
        desc: str = "",
        in_order: bool = False,
    ) -> Iterator[tuple[Sequence[int], Iterator[GradientPiece]]]:
        """``(indices, pieces)`` per chunk of ``data[start:stop]``: the per-example gradients **without** the L2 term
        (:attr:`l2_term`), a layer's parameter at a time when they come from layer taps (each piece made as it is
        drawn: a consumer that scores them one by one never holds a chunk's whole rows), else the whole rows as one
        piece. Use each piece before drawing the next (layer taps' rows share one buffer). Every piece is checked to be
        finite.

        Token sequences of unequal lengths come in chunks of similar lengths
        (:func:`~influencekit.data.examples.grouped_stream`: less padding through the model), place them with
        :func:`~influencekit.data.examples.columns`; ``in_order``: chunks in data order (``indices`` ranges)."""
        stop = len(data) if stop is None else stop
        bar = progress_bar(total=stop - start, desc=desc or f"{data.name} gradients", enabled=self.progress)
        layout = self.layout
        chunks = (
            ((range(lo, lo + batch_size_of(batch)), batch) for lo, batch in self.batches(data, start, stop))
            if in_order
            else grouped_stream(
                data,
                self.chunk,
                dtype=layout.dtype,
                device=layout.device,
                check=self.task.check_batch,
                start=start,
                stop=stop,
            )
        )
        workspace = Workspace()  # the pieces are drawn one at a time: a layer's rows reuse one buffer
        for indices, batch in chunks:
            pieces, losses = self._pieces(side, batch, data.name, self.precision, workspace)
            check_losses(losses, data.name, indices[0])
            yield indices, self._checked(pieces, data.name, indices[0])
            bar.update(len(losses))
        bar.close()

    def _checked(self, pieces: Iterator[GradientPiece], name: str, offset: int) -> Iterator[GradientPiece]:
        """``pieces``, each made under the gradient precision and checked to be finite (naming the examples)."""
        while True:
            with matmul_precision(self.precision):
                piece = next(pieces, None)
            if piece is None:
                return
            check_grads(piece.rows if isinstance(piece, DensePiece) else piece.grads.flatten(1), name, offset)
            yield piece

    def gather(self, data: Examples, indices: Sequence[int], *, side: str) -> torch.Tensor:
        """The per-example gradients of the examples ``indices`` of ``data``, ``(len(indices), n_params)``."""
        rows = []
        for lo in range(0, len(indices), self.chunk):
            part = list(indices[lo : lo + self.chunk])
            rows.append(self._rows(side, self.take(data, part), data.name, part[0], "full"))
        return torch.cat(rows)

    def _rows(self, side: str, batch: Batch, name: str, offset: int, precision: str) -> torch.Tensor:
        pieces, losses = self._pieces(side, batch, name, precision)
        check_losses(losses, name, offset)
        with matmul_precision(precision):
            first = next(pieces)
            if isinstance(first, DensePiece) and first.offset == 0 and first.rows.shape[1] == self.layout.n:
                G = first.rows  # the whole rows already (vmap, loop): no copy
            else:
                G = torch.empty(len(losses), self.layout.n, dtype=self.layout.dtype, device=self.layout.device)
                for piece in itertools.chain([first], pieces):
                    piece.write(G)
        check_grads(G, name, offset)
        if side == "train" and self._l2_term is not None:
            G += self._l2_term  # in place: the chunk is freshly allocated, a copy would double its memory traffic
        return G

    def _pieces(
        self, side: str, batch: Batch, name: str, precision: str, workspace: Workspace | None = None
    ) -> tuple[Iterator[GradientPiece], torch.Tensor]:
        """One chunk's per-example gradients as pieces (:meth:`parts`) and its losses; a model that cannot take the
        data is named in words (:meth:`Task.check_forward`), else torch's error stands. With a ``workspace``, layer
        taps' pieces reuse its buffers: each is valid until the next is drawn."""
        fn = self.function(side)
        try:
            with matmul_precision(precision):
                per_example = self.per_example(side, batch)
                if isinstance(per_example, LayerGradients):
                    return per_example.pieces(fn, self.params, batch, workspace)
                G, losses = per_example(fn, self.params, batch)
                return iter([DensePiece(0, G)]), losses
        except (RuntimeError, TypeError, IndexError, ValueError):
            self.task.check_forward(
                self.params, tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) else t, batch), name
            )
            raise

    @property
    def l2_term(self) -> torch.Tensor | None:
        """λθ̂, the L2 term every training-side gradient carries (None without L2)."""
        return self._l2_term

    def layer_factors(
        self, data: Examples, *, side: str, start: int = 0, stop: int | None = None, desc: str = ""
    ) -> Iterator[tuple[int, Factors]]:
        """``(offset, Factors)``: the layer taps of ``data[start:stop]`` in chunks, without the gradient rows
        (:mod:`~influencekit.core.lowrank`; the L2 term is not in them: see :attr:`l2_term`). Needs every selected
        parameter
        in a tapped layer and the taps chosen for ``side`` (they agreed with the reference on its first chunk)."""
        blocks = factor_blocks(self.task.model, self.layout)
        fn, dtype = self.function(side), self.layout.dtype
        stop = len(data) if stop is None else stop
        bar = progress_bar(total=stop - start, desc=desc or f"{data.name} layer taps", enabled=self.progress)
        for lo, batch in self.batches(data, start, stop):
            self.per_example(side, batch)
            if self.methods[side] != "layers":
                raise UnsupportedError(
                    f"`query_rank` scores from layer taps, but the {side} side's per-example gradients come from "
                    f"{self.methods[side]} ({self.reasons[side]}). Score without `query_rank`."
                )
            with LayerTaps(blocks) as taps:
                inputs, grads, losses = taps.run(fn, self.params, batch)
            check_losses(losses, data.name, lo)
            f = Factors(
                blocks,
                [b.inputs(x, dtype=dtype) for b, x in zip(blocks, inputs)],
                [b.output_grads(g, dtype=dtype) for b, g in zip(blocks, grads)],
            )
            for g in f.g:
                check_grads(g.reshape(len(f), -1), data.name, lo)
            bar.update(len(f))
            yield lo, f
        bar.close()

    def per_example(self, side: str, batch: Batch) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The per-example gradient function ``(fn, params, batch) -> (G, values)`` for ``side``, chosen on its
        first batch and kept (the choice and its reason are logged; the choice is in :attr:`methods`)."""
        if side not in self._chosen:
            chosen, method, reason = choose_per_example(
                self.method, self.task.model, self.function(side), self.params, self.layout, batch, side=side
            )
            self.methods[side] = method
            self.reasons[side] = reason
            logger.info("per-example gradients (%s side): %s (%s)", side, method, reason)
            self._chosen[side] = chosen
        return self._chosen[side]


def objective_gradient_norm(source: GradientSource, train: Examples, shard: Shard) -> tuple[float, float]:
    """``(‖∇R(θ̂)‖, R's mean loss)`` from one summed-gradient pass over the training set (sharded, all-reduced)."""
    task, params, layout = source.task, source.params, source.layout

    def local_sums() -> torch.Tensor:  # (gradient sum, loss sum) as one vector for one all_reduce
        sums = torch.zeros(layout.n + 1, dtype=layout.dtype, device=layout.device)
        for lo, batch in source.batches(train, shard.start, shard.stop):
            g, losses = batch_grad_sum(task.loss, params, batch, layout)
            check_losses(losses, "train", lo)
            if not bool(torch.isfinite(g).all()):  # name the examples
                check_grads(per_example_grads(task.loss, params, batch, layout)[0], "train", lo)
            sums[:-1] += g
            sums[-1] += losses.sum()
        return sums

    sums = shard.all_reduce(shard.local(local_sums))
    n = len(train)
    return float((sums[:-1] / n + task.l2 * layout.flatten(params)).norm()), float(sums[-1]) / n


def warn_if_not_stationary(grad_norm: float, tol: float) -> None:
    """Warn (at the caller of ``Influence.fit``) when ‖∇R(θ̂)‖ exceeds ``tol``: influence assumes θ̂ minimises R."""
    if grad_norm > tol:
        warnings.warn(
            f"the model is far from a stationary point of the training objective: ||grad R(theta)|| = {grad_norm:.3g} "
            "> "
            f"stationarity_tol={tol:g}. Influence assumes theta minimises R (with the same `l2`); train longer or "
            "check "
            "that `l2` matches the training regularisation.",
            StationarityWarning,
            stacklevel=3,
        )
