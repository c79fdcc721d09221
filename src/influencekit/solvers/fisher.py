"""The passes behind K-FAC/EK-FAC's factors: output gradients at labels drawn from the model's own predictions.

For each chunk of this rank's examples, the layers' inputs (once) and the output gradients of the loss at
relabelled batches: labels sampled from the model's predictive distribution (``"sampled"``: the true Fisher),
every label weighted by its probability (``"expected"``), the true labels (``"empirical"``), or ``"auto"``:
the expectation where an example has at most :data:`EXPECTED_MAX_LABELS` labels to weigh (a few classes, a binary
output, a few regression outputs), a sampled label otherwise (per-token outputs, many classes). Sampled
labels depend only on the seed and the example's global index (one generator per block of ``DRAW_BLOCK``
consecutive examples), so neither the chunk size, the order of the batches nor sharding changes them (per-token
labels also depend on the padded length of the batch, the width of the draw).

Where the task computes its loss from the model's outputs (:meth:`~influencekit.core.task.Task.has_loss_from_outputs`),
a chunk runs one tapped forward and one backward per label variant
(:meth:`~influencekit.core.layers.LayerTaps.run_each`):
the expectation over C labels costs one forward and C backwards, a sampled label one of each.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.autodiff import ParamLayout
from ..core.curvature import LayerData
from ..core.errors import UnsupportedError
from ..core.layers import LayerBlock, LayerTaps, choose_per_example
from ..core.task import Task
from ..data.examples import Batch

__all__ = ["FisherPasses", "FISHERS", "EXPECTED_MAX_LABELS", "DRAW_BLOCK", "loss_kind"]

FISHERS = ("auto", "sampled", "expected", "empirical")
# "auto" takes the expectation where it weighs at most this many labels per example: its pass then costs at most one
# forward and 4 backwards against one of each for a sampled label, and it removes the sampling noise that costs small
# data sets most (a 124-example, 3-class logistic regression: docs/benchmarks.md)
EXPECTED_MAX_LABELS = 4
# examples per seeded generator of sampled labels: the draws of example i come from block i // DRAW_BLOCK
DRAW_BLOCK = 256
# the sampled per-token labels of a fit's first pass are kept for its second (EK-FAC's correction) up to this many
# bytes: the draw (a softmax and a cumulative sum over the vocabulary per position) is then done once; past it, the
# second pass draws them again (the same labels: they depend on the seed, the example's index and θ̂ only)
LABEL_CACHE_BYTES = 256 * 2**20

Pass = tuple["list[torch.Tensor] | None", "list[torch.Tensor]", "torch.Tensor | None", "torch.Tensor | None"]


def loss_kind(task: Task) -> str:
    """The task's declared likelihood, 'classification' or 'regression'; UnsupportedError when it has none."""
    kind = getattr(task, "fisher", None)
    if kind in ("classification", "regression"):
        return kind
    raise UnsupportedError(
        f"the kfac/ekfac solvers need a loss whose Gauss-Newton/Fisher factors are defined: ClassificationTask "
        f"(cross-entropy or logistic) or RegressionTask (squared error), with their own loss(), the ik.hf tasks, or a "
        f"Task that declares `fisher` with outputs()/labels()/with_labels(). Got {type(task).__name__}; use "
        "solver='cg' or solver='exact' for it."
    )


def _labels_to_weigh(kind: str, out: torch.Tensor) -> int | None:
    """Labels the expected Fisher weighs per example for outputs ``out`` (B, ...): C classes, 2 for a binary output,
    m regression outputs; None for per-token outputs (B, T, C), where it is not available."""
    if kind == "classification":
        if out.dim() == 3:
            return None
        return out.shape[1] if out.dim() == 2 and out.shape[1] > 1 else 2
    return out[0].numel()


def with_target(task: Task, batch: Batch, target: torch.Tensor) -> Any:
    """``batch`` with its labels replaced by ``target``."""
    return task.with_labels(batch, target)


# a draw from more classes than this finds its block of CDF_BLOCK classes first, then the class inside it: two short
# cumulative sums instead of one over every class (a cumulative sum is a sequential scan: 29 ms for 2,048 rows of a
# 8,192-token vocabulary on 2 cores, against 1.4 ms for the blocks' sums)
CDF_BLOCK = 128


def _draw_classes(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The class drawn by each uniform ``u`` (shape ``p.shape[:-1]``) from the probabilities ``p`` over the last
    dimension, by the inverse cdf; with many classes the block of :data:`CDF_BLOCK` classes holding u first (the
    blocks are views of ``p``, no copy; a last partial block is padded with zeros)."""
    C = p.shape[-1]
    if C <= 2 * CDF_BLOCK:
        return _inverse_cdf(p.cumsum(dim=-1), u)
    p = p.contiguous()
    full = C // CDF_BLOCK
    blocks = p.unfold(-1, CDF_BLOCK, CDF_BLOCK)  # (..., full, CDF_BLOCK), a view
    block_mass = blocks.sum(dim=-1)
    tail = None
    if C % CDF_BLOCK:  # the last classes, padded to a block with zeros (a small copy)
        tail = F.pad(p[..., full * CDF_BLOCK :], (0, CDF_BLOCK - C % CDF_BLOCK))
        block_mass = torch.cat([block_mass, tail.sum(dim=-1, keepdim=True)], dim=-1)
    block_cdf = block_mass.cumsum(dim=-1)
    block = _inverse_cdf(block_cdf, u)
    before = (block_cdf - block_mass).gather(-1, block.unsqueeze(-1)).squeeze(-1)  # the mass of the blocks before it
    index = block.clamp_max(full - 1).reshape(*block.shape, 1, 1).expand(*block.shape, 1, CDF_BLOCK)
    inside = blocks.gather(-2, index).squeeze(-2)  # (..., CDF_BLOCK): the chosen block's probabilities
    if tail is not None:
        inside = torch.where((block == full).unsqueeze(-1), tail, inside)
    return (block * CDF_BLOCK + _inverse_cdf(inside.cumsum(dim=-1), u - before)).clamp_max(C - 1)


def _inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The class drawn by each uniform ``u`` (shape ``cdf.shape[:-1]``) from the cumulative probabilities ``cdf`` over
    the last dimension: the number of classes whose cdf lies below u (cdf is non-decreasing), found by a binary search
    instead of a comparison with every class; the last class where round-off leaves the total below u."""
    return torch.searchsorted(cdf, u.unsqueeze(-1).contiguous()).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


class FisherPasses:
    """Label variants and tapped backward passes for one ``fisher`` kind, ``samples`` and ``seed``."""

    def __init__(self, fisher: str, samples: int, seed: int) -> None:
        self.fisher, self.samples, self.seed = fisher, samples, seed
        self._leftover: Any = None  # the per-example gradient function of the leftover parameters, once chosen
        self.used: str | None = None  # what "auto" chose, and why (for the report), once a chunk was seen
        self._drawn: dict[int, torch.Tensor] = {}  # first index of a chunk -> its sampled per-token labels (this fit)
        self._drawn_bytes = 0

    def forget_labels(self) -> None:
        """Drop the labels kept between a fit's passes (call at the start and the end of a fit: θ̂ may change)."""
        self._drawn.clear()
        self._drawn_bytes = 0

    def resolve(self, kind: str, out: torch.Tensor) -> str:
        """The Fisher used for outputs like ``out`` (B, ...): ``fisher`` itself, or what ``"auto"`` picks for them
        (the outputs' shape decides, so every chunk and rank picks the same)."""
        if self.fisher != "auto":
            self.used = self.fisher
            return self.fisher
        labels = _labels_to_weigh(kind, out)
        chosen = "expected" if labels is not None and labels <= EXPECTED_MAX_LABELS else "sampled"
        what = "per-token outputs" if labels is None else f"{labels} label(s) per example"
        self.used = f"{chosen} (auto: {what}; the expectation up to {EXPECTED_MAX_LABELS})"
        return chosen

    def draws(
        self, indices: Sequence[int], width: int, *, normal: bool, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Random numbers ``(samples, len(indices), width)`` for the examples of global ``indices`` (in that order).

        Example i's numbers come from the generator of block i // DRAW_BLOCK, seeded by (seed, block), at a
        fixed place in it: they depend on ``seed`` and i only, not on the chunking, the order of the batches or on
        a rank's shard.
        """
        index = torch.as_tensor(list(indices), dtype=torch.long)
        block_of = index // DRAW_BLOCK
        rows = torch.empty(len(index), self.samples, width, dtype=dtype, device=device)
        for b in block_of.unique().tolist():
            gen = torch.Generator(device=device)
            gen.manual_seed(
                int(
                    np.random.SeedSequence([abs(self.seed), int(self.seed < 0), b]).generate_state(1, np.uint64)[0]
                    >> np.uint64(1)
                )
            )
            shape = (DRAW_BLOCK, self.samples, width)
            block = (
                torch.randn(shape, dtype=dtype, device=device, generator=gen)
                if normal
                else torch.rand(shape, dtype=dtype, device=device, generator=gen)
            )
            here = (block_of == b).nonzero().flatten()
            rows[here.to(device)] = block[(index[here] - b * DRAW_BLOCK).to(device)]
        return rows.transpose(0, 1)

    def variants(
        self,
        kind: str,
        batch: Batch,
        out: torch.Tensor,
        task: Task,
        indices: Sequence[int],
    ) -> list[tuple[Any, torch.Tensor]]:
        """Batches whose label-gradients build the Fisher, with per-example weights w (the loss is Σ √w ℓ).

        ``indices``: the global indices of the batch's examples (they fix the sampled labels)."""
        target = task.labels(batch)
        B = out.shape[0]
        ones = torch.ones(B, dtype=out.dtype, device=out.device)
        fisher = self.resolve(kind, out)
        if fisher == "empirical":
            return [(batch, ones)]
        if kind == "classification" and out.dim() == 3:
            return self._sequence(fisher, batch, out, task, indices, target)
        if kind == "classification":
            return self._classification(fisher, batch, out, task, indices, target, ones)
        # squared error averaged over m outputs = Gaussian likelihood with variance m/2 (up to a constant)
        f = out.reshape(target.shape).to(out.dtype)
        m = f[0].numel()
        scale = math.sqrt(m / 2.0)
        if fisher == "sampled":
            eps = self.draws(indices, m, normal=True, dtype=f.dtype, device=f.device)
            return [(with_target(task, batch, f + scale * e.reshape(f.shape)), ones / self.samples) for e in eps]
        variants = []
        for j in range(m):
            e = torch.zeros(m, dtype=f.dtype, device=f.device)
            e[j] = scale
            variants.append((with_target(task, batch, f + e.reshape(f.shape[1:])), ones))
        return variants

    def _classification(
        self,
        fisher: str,
        batch: Batch,
        out: torch.Tensor,
        task: Task,
        indices: Sequence[int],
        target: torch.Tensor,
        ones: torch.Tensor,
    ) -> list[tuple[Any, torch.Tensor]]:
        B = out.shape[0]
        if out.dim() == 2 and out.shape[1] > 1:
            p = torch.softmax(out, dim=1)
            if fisher == "sampled":  # inverse CDF of each example's own uniform draw
                U = self.draws(indices, 1, normal=False, dtype=p.dtype, device=p.device)
                Y = [_draw_classes(p, u.squeeze(-1)) for u in U]
                return [(with_target(task, batch, y.to(target.dtype)), ones / self.samples) for y in Y]
            return [(with_target(task, batch, torch.full_like(target, c)), p[:, c]) for c in range(p.shape[1])]
        q = torch.sigmoid(out.reshape(B))
        if fisher == "sampled":
            U = self.draws(indices, 1, normal=False, dtype=q.dtype, device=q.device).squeeze(2)
            return [(with_target(task, batch, (u < q).to(target.dtype)), ones / self.samples) for u in U]
        return [
            (with_target(task, batch, torch.ones_like(target)), q),
            (with_target(task, batch, torch.zeros_like(target)), 1 - q),
        ]

    def _sequence(
        self,
        fisher: str,
        batch: Batch,
        out: torch.Tensor,
        task: Task,
        indices: Sequence[int],
        target: torch.Tensor,
    ) -> list[tuple[Any, torch.Tensor]]:
        """Labels drawn per position of ``(B, T, C)`` logits; positions without a loss keep their label."""
        if fisher != "sampled":
            raise UnsupportedError(
                f"fisher={fisher!r} is not available for per-token outputs (B, T, C): the expected Fisher would "
                "weight every position by its own probability. Use fisher='sampled' (default) or 'empirical'."
            )
        B, T = out.shape[:2]
        mask = task.label_mask(target)
        keep = torch.ones_like(target, dtype=torch.bool) if mask is None else mask
        drawn = self._drawn.get(indices[0])
        if drawn is None or tuple(drawn.shape) != (self.samples, B, T):
            drawn = self._draw_tokens(out, indices, T)
        ones = torch.ones(B, dtype=out.dtype, device=out.device)
        return [
            (with_target(task, batch, torch.where(keep, y.to(target.dtype), target)), ones / self.samples)
            for y in drawn
        ]

    def _draw_tokens(self, out: torch.Tensor, indices: Sequence[int], T: int) -> torch.Tensor:
        """One label per position and sample, ``(samples, B, T)``, from the logits ``out`` (B, T, C) by the inverse
        cdf of each position's own uniform draw; kept for the fit's next pass while the cache has room."""
        p = torch.softmax(out, dim=-1)
        U = self.draws(indices, T, normal=False, dtype=p.dtype, device=p.device)  # (samples, B, T)
        dtype = torch.int32 if out.shape[-1] < 2**31 else torch.int64
        drawn = torch.stack([_draw_classes(p, u).to(dtype) for u in U])
        size = drawn.numel() * drawn.element_size()
        if self._drawn_bytes + size <= LABEL_CACHE_BYTES:
            self._drawn[indices[0]] = drawn
            self._drawn_bytes += size
        return drawn

    def _leftover_grads(
        self, model: Any, fn: Any, params: dict[str, torch.Tensor], batch: Batch, layout: ParamLayout
    ) -> torch.Tensor:
        """Per-example gradients of the parameters outside supported layers, by the method
        :func:`~influencekit.core.layers.choose_per_example` picks on the first chunk (vmap, or the autograd loop)."""
        if self._leftover is None:
            self._leftover = choose_per_example("auto", model, fn, params, layout, batch, side="kfac leftover")[0]
        return self._leftover(fn, params, batch)[0]

    def _tapped(
        self,
        taps: LayerTaps,
        task: Task,
        kind: str,
        params: dict[str, torch.Tensor],
        batch: Batch,
        indices: Sequence[int],
    ) -> Iterator[tuple[Any, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]]:
        """Per label variant of a chunk: (relabelled batch, weights w, layer inputs, output gradients of Σ √w ℓ).

        With a loss computable from the outputs (:meth:`~influencekit.core.task.Task.has_loss_from_outputs`), the labels
        come from the outputs of the very forward pass that is back-propagated, once per variant: one forward per chunk,
        where the general path runs a no-grad forward for the labels and a tapped forward and backward per variant."""
        if task.has_loss_from_outputs():
            variants: list[tuple[Any, torch.Tensor]] = []

            def losses_of(out: torch.Tensor) -> list[torch.Tensor]:
                variants.extend(self.variants(kind, batch, out.detach(), task, indices))
                return [task.loss_from_outputs(out, vbatch) * w.sqrt().to(out.dtype) for vbatch, w in variants]

            raw_in, grads_each = taps.run_each(task.outputs, losses_of, params, batch)
            for (vbatch, w), raw_grads in zip(variants, grads_each):
                yield vbatch, w, raw_in, raw_grads
            return
        with torch.no_grad():
            out = task.outputs(params, batch)
        for vbatch, w in self.variants(kind, batch, out, task, indices):
            raw_in, raw_grads, _ = taps.run(task.loss, params, vbatch, scale=w.sqrt())
            yield vbatch, w, raw_in, raw_grads

    def run(self, data: LayerData, layers: list[LayerBlock], leftover: list[str], layer_inputs: Any) -> Iterator[Pass]:
        """Yield, per chunk and label variant: (layer inputs per layer via ``layer_inputs(layer, x)`` on the first
        variant else None, output gradients (B,T,out) per layer in the model's dtype, per-example gradients of the
        leftover parameters (B, p) or None, the task's position mask (B, T) of the chunk or None)."""
        task, params = data.task, data.params
        kind = loss_kind(task)
        leftover_layout = ParamLayout.of({n: params[n] for n in leftover}) if leftover else None
        with LayerTaps(layers) as taps:
            for indices, batch in data.batches():
                mask = task.position_mask(batch)
                for v, (vbatch, w, raw_in, raw_grads) in enumerate(
                    self._tapped(taps, task, kind, params, batch, indices)
                ):
                    A_in = [layer_inputs(layer, x) for layer, x in zip(layers, raw_in)] if v == 0 else None
                    G_out = [layer.output_grads(g, x=x) for layer, g, x in zip(layers, raw_grads, raw_in)]
                    extra = None
                    if leftover_layout is not None:

                        def weighted(p: dict[str, torch.Tensor], b: Any) -> torch.Tensor:
                            inner, sw_ = b
                            return sw_ * task.loss({**params, **p}, inner)

                        extra = self._leftover_grads(
                            task.model, weighted, {n: params[n] for n in leftover}, (vbatch, w.sqrt()), leftover_layout
                        )
                    yield A_in, G_out, extra, mask
