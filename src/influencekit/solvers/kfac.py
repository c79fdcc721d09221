"""K-FAC and EK-FAC: Kronecker-factored Gauss-Newton/Fisher curvature, inverted layer by layer.

Curvature: **not the Hessian H** but the Gauss-Newton matrix G = (1/n) Σ_i J_iᵀ H_out,i J_i (J_i the Jacobian of
the model's outputs for example i, H_out,i the Hessian of the loss with respect to those outputs), which for
cross-entropy, the logistic loss and squared error is also the true Fisher, kept block-diagonal over layers
and Kronecker-factored within a layer (Martens & Grosse 2015, K-FAC; Grosse & Martens 2016 for
convolutions; George et al. 2018, EK-FAC; Grosse et al. 2023 for influence functions). G = H for a model
whose outputs are linear in θ (logistic or ridge regression on fixed features); for other models G is H
without the term Σ_k (∂ℓ/∂f_k) ∇²f_k of the model's own second derivatives, and is positive semi-definite.

For a layer with pre-activation outputs s = W ã (ã: the layer input with a 1 appended when the bias is
selected; W holds the weight and bias as columns) the per-example gradient is ∇_W ℓ = Σ_t g_t ã_tᵀ with
g_t = ∂ℓ/∂s_t, summed over the positions t (one for a dense input; the sequence positions of a
``(B, T, in)`` input; the spatial output positions of a convolution, ã_t being the unfolded input patch).
K-FAC approximates that layer's block of G by S ⊗ A, with

    A = (1/n) Σ_i (1/T) Σ_t ã_it ã_itᵀ        (inputs: the mean over positions)
    S = (1/n) Σ_i Σ_t g_it g_itᵀ              (output gradients: the sum over positions)

(the convention of Grosse & Martens 2016: exact for T = 1, and exact under their "spatially uncorrelated
derivatives" assumption for T > 1). The output gradients g are those of the loss at labels drawn from the
model's own predictive distribution (``fisher="sampled"``, seeded: the true Fisher, unbiased), at every
label weighted by its probability (``fisher="expected"``: the true Fisher in closed form, C backward passes
for C classes; then S equals the exact (1/n) Σ_i J_s,iᵀ H_out,i J_s,i of the layer), or at the true labels
(``fisher="empirical"``: the empirical Fisher, which is not a curvature of R and is offered for comparison).
The default ``fisher="auto"`` takes the expectation where an example has at most 4 labels to weigh and samples
otherwise (:mod:`~influencekit.solvers.fisher`).

With the eigendecompositions A = Q_A diag(λ_A) Q_Aᵀ and S = Q_S diag(λ_S) Q_Sᵀ (float64), the solve of a
layer's block V (out × k) is

    K-FAC:   X = Q_S [ (Q_Sᵀ V Q_A) / (λ_S λ_Aᵀ + λ + δ) ] Q_Aᵀ
    EK-FAC:  X = Q_S [ (Q_Sᵀ V Q_A) / (Λ + λ + δ) ] Q_Aᵀ,   Λ = (1/n) Σ_i (Q_Sᵀ ∇_W ℓ_i Q_A)²   (elementwise)

λ is the task's L2 strength (the L2 term adds λI to the curvature exactly), δ the damping. EK-FAC's Λ
("eigenvalue correction") is the second moment of the per-example gradients in the Kronecker eigenbasis:
the best diagonal in that basis, computed in a second pass over the data.

Precision: each chunk's products (Σ ã ãᵀ, Σ g gᵀ, the rotated per-example gradients Q_Sᵀ ∇_W ℓ Q_A and their
squares) are computed in the model's dtype, the layer inputs and output gradients are never copied to float64;
the sums over chunks, the factors and their eigendecompositions are float64. For a float32 model that halves the
passes' working memory and doubles their matmul speed, at float32 round-off within a chunk (relative ~1e-6,
far below the sampling noise of the factors); a float64 model computes in float64 throughout.

Layers (:mod:`~influencekit.core.layers`): ``nn.Linear`` (any leading dimensions), ``nn.Conv1d`` and ``nn.Conv2d``
(``groups=1``) and the transformers-style ``Conv1D``, weight and/or bias; and ``nn.Embedding`` (no ``max_norm``,
no ``scale_grad_by_freq``), a dense layer on one-hot inputs: its A is the diagonal of row frequencies
(1/n) Σ_i (1/T) Σ_t e_{x_t} (no eigendecomposition, Q_A = I, the ``padding_idx`` row gets no gradient), S the
(d × d) second moment of the output gradients, and EK-FAC's Λ sums each example's rotated output gradients per
looked-up row before squaring. A selected parameter of any other layer raises
:class:`~influencekit.core.errors.UnsupportedError` naming it,
unless ``unsupported="diagonal"``: those parameters then get the damped diagonal of the same Fisher,
1 / (E[g²] + λ + δ), with a warning. Losses: :class:`~influencekit.core.task.ClassificationTask` (cross-entropy,
logistic) and :class:`~influencekit.core.task.RegressionTask` (squared error averaged over outputs).

Sampled labels depend only on ``seed`` and the example's global index (one generator per block of
``DRAW_BLOCK`` consecutive examples, :mod:`~influencekit.solvers.fisher`), so neither the chunk size nor sharding
changes them. Under a
``torch.distributed`` process group (the operator's ``shard``) each rank streams its own examples, the sums
behind A, S, the diagonal and EK-FAC's Λ are added across ranks with one ``all_reduce`` each and divided by
the global n, and every rank eigendecomposes the same summed factors.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..core.autodiff import ParamLayout
from ..core.checks import check_choice, check_int
from ..core.curvature import CurvatureOperator, LayerData
from ..core.errors import InfluenceKitWarning, InputError, NumericalError, UnsupportedError
from ..core.layers import LayerBlock, layer_blocks
from ..core.lowrank import Factors, LowRankQueries, factor_rows
from ..core.memory import Workspace
from ..core.task import Task
from .base import Capabilities, Solver, SolveReport, relative_residuals
from .costs import CostProbe, SolverCost, timed
from .fisher import EXPECTED_MAX_LABELS, FISHERS, FisherPasses, loss_kind
from .registry import register

__all__ = ["KFACSolver", "EKFACSolver", "UNSUPPORTED"]

logger = logging.getLogger(__name__)

UNSUPPORTED = ("exclude", "diagonal", "error")
FACTORED_LAYERS = (
    "nn.Linear, nn.Conv1d, nn.Conv2d (groups=1), untied nn.Embedding (no max_norm, no scale_grad_by_freq) "
    "and transformers Conv1D"
)


def _names(names: list[str], most: int = 4) -> str:
    return ", ".join(repr(n) for n in names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


@dataclass
class _Layer(LayerBlock):
    """A layer block (:class:`~influencekit.core.layers.LayerBlock`) with its Kronecker factors. For an embedding
    (``LayerBlock.embedding``) A is the diagonal (V,) of row frequencies, S is (d, d) and QA is None (= I)."""

    A: torch.Tensor | None = None  # (k, k)
    S: torch.Tensor | None = None  # (out, out)
    QA: torch.Tensor | None = None
    QS: torch.Tensor | None = None
    eig: torch.Tensor | None = None  # (out, k): λ_S λ_Aᵀ (K-FAC) or Λ (EK-FAC); an embedding's (V, d)


def _layer_inputs(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
    """A layer's inputs as (B, T, k) rows in the model's dtype *without* the bias's 1 (the sums add it without
    copying the rows into a wider tensor); an embedding's looked-up indices as (B, T)."""
    return layer.indices(x) if layer.embedding else layer.inputs(x, append_one=False)


def _rotate_inputs(layer: _Layer, a: torch.Tensor) -> torch.Tensor:
    """ã Q_A for inputs a (B, T, k) without the bias's 1: a Q_A[:k] + Q_A[k] when the bias is selected, in a's dtype."""
    kw = a.shape[-1]
    QA = layer.QA.to(a.dtype)
    rotated = a @ QA[:kw]
    return rotated.add_(QA[kw]) if layer.has_bias else rotated


def _add_inputs(layer: _Layer, a: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Add one chunk's inputs to A: row frequencies for an embedding, else Σ ã ãᵀ with ã = (a, 1) by blocks.

    With the task's position mask (B, T) and a layer that sees those T positions, A is the mean over each
    example's real positions only: padded positions neither enter A nor count in T."""
    if mask is not None and a.shape[1] == mask.shape[1] and a.shape[1] > 1:
        _add_masked_inputs(layer, a, mask)
        return
    if layer.embedding:
        # (B, T) looked-up rows; the padding row has no gradient, so no frequency
        counts = torch.bincount(a.reshape(-1), minlength=layer.A.shape[0]).to(torch.float64)
        if layer.module.padding_idx is not None:
            counts[layer.module.padding_idx] = 0.0
        layer.A += counts / a.shape[1]
        return
    kw, T = a.shape[-1], a.shape[1]
    flat = a.reshape(-1, kw)
    _add_gram(layer.A[:kw, :kw], flat, flat, 1.0 / T)
    if layer.has_bias:
        col = flat.sum(0, dtype=torch.float64) / T
        layer.A[:kw, kw] += col
        layer.A[kw, :kw] += col
        layer.A[kw, kw] += flat.shape[0] / T


_GRAM_BLOCK = 512  # columns per stripe of a wide factor's sum (below two stripes one product is as fast)


def _add_gram(target: torch.Tensor, x: torch.Tensor, weighted: torch.Tensor, scale: float = 1.0) -> None:
    """``target += scale · xᵀ weighted`` in float64, for ``weighted`` = x with each row scaled (a symmetric product):
    a wide factor is made by stripes of columns on and above the diagonal, mirrored below (at k = 1,536 a third
    fewer multiply-adds: 46 against 71 ms for 2,432 rows on 2 cores), a narrow one as one product."""
    k = x.shape[1]
    if k < 2 * _GRAM_BLOCK:
        target += (x.T @ weighted).to(torch.float64) * scale
        return
    for lo in range(0, k, _GRAM_BLOCK):
        hi = min(lo + _GRAM_BLOCK, k)
        stripe = (x[:, lo:hi].T @ weighted[:, lo:]).to(torch.float64) * scale  # rows lo..hi, columns lo..k
        target[lo:hi, lo:] += stripe
        target[hi:, lo:hi] += stripe[:, hi - lo :].T


def _add_masked_inputs(layer: _Layer, a: torch.Tensor, mask: torch.Tensor) -> None:
    w = mask.to(torch.float64)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, T): 1/T_i at example i's real positions
    if layer.embedding:
        rows = torch.zeros_like(layer.A)
        rows.index_add_(0, a.reshape(-1), w.reshape(-1))
        if layer.module.padding_idx is not None:
            rows[layer.module.padding_idx] = 0.0
        layer.A += rows
        return
    kw = a.shape[-1]
    flat, weights = a.reshape(-1, kw), w.reshape(-1, 1)
    weighted = flat * weights.to(flat.dtype)
    _add_gram(layer.A[:kw, :kw], flat, weighted)
    if layer.has_bias:
        col = weighted.sum(0).to(
            torch.float64
        )  # in the rows' dtype, as the product above; summed in float64 across chunks
        layer.A[:kw, kw] += col
        layer.A[kw, :kw] += col
        layer.A[kw, kw] += float(weights.sum())


def _add_corrected(
    layer: _Layer, aq: torch.Tensor, gq: torch.Tensor, block_elements: int, workspace: Workspace
) -> None:
    """Adds one chunk's Σ_b (Q_Sᵀ ∇_W ℓ_b Q_A)² to ``layer.eig``: ``aq`` the rotated inputs (B, T, k) (an embedding's
    indices (B, T)), ``gq`` the rotated output gradients (B, T, out); the per-example products are made in
    ``workspace``'s buffer ``"corrected"``."""
    if layer.embedding:  # per example Σ_{t: x_t = v} (Q_Sᵀ g_t): rows summed per (example, index)
        V = layer.eig.shape[0]
        keys = (torch.arange(aq.shape[0], device=aq.device)[:, None] * V + aq).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        rows = torch.zeros(len(unique), gq.shape[-1], dtype=gq.dtype, device=gq.device)
        rows.index_add_(0, inverse, gq.reshape(-1, gq.shape[-1]))
        layer.eig.index_add_(0, unique % V, (rows * rows).to(torch.float64))
        return
    if aq.shape[1] == 1:  # one position: Σ_b (g̃_b ã_bᵀ)² = (g̃²)ᵀ(ã²), a matmul, no (B, out, k) temporary
        layer.eig += (gq[:, 0].square().T @ aq[:, 0].square()).to(torch.float64)
        return
    step = max(1, block_elements // max(1, layer.eig.numel()))
    for lo in range(0, aq.shape[0], step):
        g, a = gq[lo : lo + step], aq[lo : lo + step]
        M = workspace.take("corrected", (len(g), g.shape[2], a.shape[2]), dtype=g.dtype, device=g.device)
        torch.bmm(g.transpose(1, 2), a, out=M)
        layer.eig += M.square_().sum(0).to(torch.float64)  # a block's sum in the model's dtype, the chunks' in float64


def _rotated_in(
    layer: _Layer, a: torch.Tensor, g: torch.Tensor, dtype: torch.dtype, workspace: Workspace
) -> torch.Tensor:
    """Q_Sᵀ (Σ_t g_t ã_tᵀ) Q_A per example, ``(B, out, k)``, from taps ``a (B, T, k)`` (the bias's 1 appended) and
    ``g (B, T, out)``: as (g Q_S)ᵀ(ã Q_A) where that is cheaper (T·(out² + k²) + T·out·k multiply-adds per example
    against out·k·(out + k + T) for forming the gradient and rotating it: a transformer's T < out, k), else rotating the
    formed gradient. The temporaries and the result are ``workspace``'s buffers ``"gq"``, ``"aq"``, ``"y"``, ``"x"``
    (the result is valid until the next call): a fresh 64 MB block per layer and chunk would be page faults, about a
    tenth of the products' time on this project's machine."""
    QS, QA = layer.QS.to(dtype), layer.QA.to(dtype)
    B, T, k, out = a.shape[0], a.shape[1], a.shape[2], g.shape[2]

    def take(name: str, *shape: int) -> torch.Tensor:
        return workspace.take(name, shape, dtype=dtype, device=a.device)

    X = take("x", B, out, k)
    if T * (out * out + k * k) < out * k * (out + k):
        gq = torch.matmul(g.to(dtype), QS, out=take("gq", B, T, out))
        aq = torch.matmul(a.to(dtype), QA, out=take("aq", B, T, k))
        return torch.bmm(gq.transpose(1, 2), aq, out=X)
    formed = torch.bmm(g.transpose(1, 2).to(dtype), a.to(dtype), out=take("y", B, out, k))
    rotated = torch.matmul(QS.T, formed, out=take("gq", B, out, k))
    return torch.matmul(rotated.view(B * out, k), QA, out=X.view(B * out, k)).view(B, out, k)


def _solved_from_taps(
    layer: _Layer, a: torch.Tensor, g: torch.Tensor, *, shift: float, dtype: torch.dtype, workspace: Workspace
) -> torch.Tensor:
    """The layer's block of the solution for examples given by their taps: Q_S [(Q_Sᵀ ∇W Q_A) / (Λ + shift)] Q_Aᵀ,
    ``(B, out, k)`` in ``dtype``, rotated in by :func:`_rotated_in`; every temporary and the result are
    ``workspace``'s buffers (the result is valid until the next call)."""
    QS, QA = layer.QS.to(dtype), layer.QA.to(dtype)
    X = _rotated_in(layer, a, g, dtype, workspace).div_((layer.eig + shift).to(dtype))
    B, out, k = X.shape
    Y = torch.matmul(QS, X, out=workspace.take("y", (B, out, k), dtype=dtype, device=X.device))
    return torch.matmul(Y.view(B * out, k), QA.T, out=X.view(B * out, k)).view(B, out, k)


def _precondition_factors(
    layers: list[_Layer],
    factors: Factors,
    factored: list[bool],
    rank: int,
    *,
    shift: float,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    block_elements: int,
    seed: int,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], list[torch.Tensor | None]]:
    """:meth:`KFACSolver.low_rank_solve`'s per-layer work: ``(U, V, M)`` as
    :class:`~influencekit.core.lowrank.LowRankQueries` holds them."""
    by_name = {layer.name: layer for layer in layers}
    U: list[torch.Tensor | None] = []
    V: list[torch.Tensor | None] = []
    M: list[torch.Tensor | None] = []
    workspace = Workspace()  # the per-layer temporaries; each block is copied out of it before the next is made
    for block, a, g, f in zip(factors.blocks, factors.a, factors.g, factored):
        layer = by_name[block.name]
        QS, QA, denom = layer.QS.to(dtype), layer.QA.to(dtype), (layer.eig + shift).to(dtype)
        rows = max(1, block_elements // layer.index.numel())
        if not f:
            solved = torch.empty(len(factors), *layer.eig.shape, dtype=out_dtype, device=denom.device)
            for lo in range(0, len(factors), rows):
                solved[lo : lo + rows] = _solved_from_taps(
                    layer, a[lo : lo + rows], g[lo : lo + rows], shift=shift, dtype=dtype, workspace=workspace
                )
            M.append(solved)
            U.append(None), V.append(None)
            continue
        us, vs = [], []
        for lo in range(0, len(factors), rows):
            rotated = _rotated_in(layer, a[lo : lo + rows], g[lo : lo + rows], dtype, workspace) / denom
            u, v = factor_rows(rotated, rank, seed=seed)  # (n, r, out), (n, r, k) in the eigenbasis
            us.append((u @ QS.T).to(out_dtype))
            vs.append((v @ QA.T).to(out_dtype))
        U.append(torch.cat(us)), V.append(torch.cat(vs)), M.append(None)
    return U, V, M


def _solve_taps(
    layers: list[_Layer], factors: Factors, out: torch.Tensor, *, shift: float, dtype: torch.dtype, block_elements: int
) -> None:
    """:meth:`KFACSolver.solve_taps`'s work: each layer's block of the solution, written into ``out``."""
    by_name = {layer.name: layer for layer in layers}
    workspace = Workspace()  # the per-layer temporaries, reused across the layers and row blocks
    for block, a, g in zip(factors.blocks, factors.a, factors.g):
        layer = by_name[block.name]
        rows = max(1, block_elements // layer.index.numel())
        for lo in range(0, len(factors), rows):
            solved = _solved_from_taps(
                layer, a[lo : lo + rows], g[lo : lo + rows], shift=shift, dtype=dtype, workspace=workspace
            )
            layer.write(out[lo : lo + rows], solved)


def _eigendecompose(layers: list[_Layer], dtype: torch.dtype) -> None:
    """Each layer's Q_S, Q_A (eigenvectors of its float64 factors, computed in ``dtype``) and λ_S λ_Aᵀ in float64."""
    for layer in layers:
        lS, layer.QS = _eigh(layer.S, dtype)
        if layer.embedding:  # A diagonal: its eigenvectors are the rows themselves (QA = I, kept as None)
            layer.QA = None
            layer.eig = layer.A[:, None] * lS.clamp_min(0)[None, :]  # (V, d), as the weight
            continue
        lA, layer.QA = _eigh(layer.A, dtype)
        # the factors are PSD: negative eigenvalues are round-off
        layer.eig = lS.clamp_min(0)[:, None] * lA.clamp_min(0)[None, :]


def _eigh(factor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (float64) and eigenvectors (``dtype``) of a symmetric float64 factor, decomposed in ``dtype``."""
    values, vectors = torch.linalg.eigh(factor.to(dtype))
    return values.to(torch.float64), vectors


def _drop_factors(layers: list[_Layer]) -> None:
    """Free the dense layers' A and S once eigendecomposed (an embedding's diagonal A and small S stay)."""
    for layer in layers:
        if not layer.embedding:
            layer.A = layer.S = None


def _quadratic_form(
    layers: list[_Layer], G: torch.Tensor, *, shift: float, dtype: torch.dtype, block_elements: int
) -> torch.Tensor:
    """gᵀ(G_kfac + shift·I)⁻¹g of each row of ``G`` over the factored layers: Σ (Q_Sᵀ g Q_A)² / (Λ + shift), one
    rotation per example instead of a solve's two and a dot product."""
    out = torch.zeros(G.shape[0], dtype=torch.float64, device=G.device)
    for layer in layers:
        QS, denom = layer.QS.to(dtype), (layer.eig + shift).to(dtype)
        QA = None if layer.QA is None else layer.QA.to(dtype)
        rows = max(1, block_elements // layer.index.numel())
        for lo in range(0, G.shape[0], rows):
            block = layer.read(G[lo : lo + rows]).to(dtype)
            rotated = block @ QS if QA is None else QS.T @ block @ QA
            out[lo : lo + rows] += (rotated * rotated / denom).sum(dim=(1, 2)).to(out.dtype)
    return out


def _tap_quadratic_form(
    layers: list[_Layer], f: Factors, l2: torch.Tensor | None, *, shift: float, dtype: torch.dtype, block_elements: int
) -> torch.Tensor:
    """:func:`_quadratic_form` of the gradients g ãᵀ (+ λW) given by a chunk's layer taps. A one-position layer's
    rotated gradient is the outer product (Q_Sᵀg)(Q_Aᵀã)ᵀ: its form is (g̃²)ᵀD⁻¹(ã²) + 2λ g̃ᵀ(W̃/D)ã + λ²ΣW̃²/D
    (D = Λ + shift, W̃ = Q_SᵀWQ_A): out·k multiply-adds per example instead of a rotation's out·k·(out + k)."""
    by_name = {layer.name: layer for layer in layers}
    out = torch.zeros(len(f), dtype=torch.float64, device=f.g[0].device)
    for j, block in enumerate(f.blocks):
        layer = by_name[block.name]
        QS, QA, denom = layer.QS.to(dtype), layer.QA.to(dtype), (layer.eig + shift).to(dtype)
        W = None if l2 is None else layer.read(l2[None])[0].to(dtype)
        if f.a[j].shape[1] > 1:
            rows = max(1, block_elements // layer.index.numel())
            for lo in range(0, len(f), rows):
                part = Factors([block], [f.a[j][lo : lo + rows]], [f.g[j][lo : lo + rows]]).block_gradient(0).to(dtype)
                rotated = QS.T @ (part if W is None else part + W) @ QA
                out[lo : lo + rows] += (rotated * rotated / denom).sum(dim=(1, 2)).to(out.dtype)
            continue
        g, a = f.g[j][:, 0].to(dtype) @ QS, f.a[j][:, 0].to(dtype) @ QA  # (B, out), (B, k)
        value = ((g * g) @ (1.0 / denom) * (a * a)).sum(dim=1)
        if W is not None:
            Wt = QS.T @ W @ QA
            value = value + 2.0 * ((g @ (Wt / denom)) * a).sum(dim=1) + (Wt * Wt / denom).sum()
        out += value.to(out.dtype)
    return out


@register
class KFACSolver(Solver):
    """Kronecker-factored Gauss-Newton/Fisher (K-FAC) per layer: factors summed in float64, eigendecomposed.

    Args:
        fisher: which output gradients build S and the corrections: ``"auto"`` (default: ``"expected"`` where an
            example has at most 4 labels to weigh, ``"sampled"`` otherwise; the choice in every solve report's
            ``details["fisher"]``), ``"sampled"`` (labels drawn from the model, seeded by ``seed``: the true Fisher),
            ``"expected"`` (every label weighted by its probability: the true Fisher without sampling noise, at
            C backward passes for C classes and m for m regression outputs), ``"empirical"`` (the true labels).
        samples: labels drawn per example when ``fisher="sampled"`` (each variant weighted 1/samples); one is
            unbiased but noisy when the model is confident and the data small (see docs/guide.md).
        seed: seed of the sampled labels.
        unsupported: what happens to selected parameters outside the factored layers (LayerNorm, RMSNorm, a tied
            embedding, ...): ``"exclude"`` (default) leaves them out of the influence, as Kronfluence and Bergson do:
            the :class:`~influencekit.Influence` is built on the task restricted to the factored layers
            (:meth:`covered_task`), with a one-line warning and the left-out names in the results' metadata
            (``metadata["params_excluded"]``); ``"diagonal"`` keeps them with the damped diagonal Fisher
            1 / (E[g²] + λ + δ) and a warning; ``"error"`` raises, naming them.
        probes: random directions on which ``fit`` measures the relative residual of the approximation
            against the true operator, ‖(H + δI)x − v‖/‖v‖ (one batched HVP pass), the approximation error every
            solve then reports. 0 (default) skips it and the reports carry NaN: a diagnostic, not part of the answer,
            and on a transformer the dearest part of the fit (MiniLM's 38 layers: 4 probes over 64 e-mails took 49 s
            of a 70 s fit and doubled its peak memory, 6.9 against 3.5 GB). ``probes=4`` measures it.
        probe_examples: the residual's H is the mean over this many evenly spaced training examples when the
            data hold more (default 64; ``None``: all). On 9,000 MNIST images the full-data probe cost twice
            the whole EK-FAC fit, and on MiniLM's last block (1,000 e-mails) 256 probe examples took 15.9 s of
            a 54 s fit (each costs four double-backward passes); a diagnostic should not dominate the fit.
        block_elements: largest number of values of a temporary per-example tensor (memory knob).
        solve_dtype: precision of the solve's rotations into and out of the Kronecker eigenbasis: ``None``
            (default) for the model's dtype, or e.g. ``torch.float64``. Rotating a float32 model's queries in
            float32 agrees with float64 rotations to 1e-5 relative (tests/solvers/test_kfac.py) and is 2× faster: on
            MiniLM's last block the float64 rotations of 200 test e-mails took half the scoring time.
        eigh_dtype: precision of the factors' eigendecompositions (the factors are summed in float64 either way).
            ``None`` (default): float64 for K-FAC, whose eigenvalues are the curvature; for EK-FAC the model's dtype
            (float32 at least), since only its eigenvectors are used (the correction pass measures the eigenvalues
            in that basis, summed in float64): on MiniLM's 38 layers float32 took 3.0 s against 7.0 s, with scores
            5e-5 relative apart (Pearson 1 − 1e-9; tests/solvers/test_kfac.py states the bound on a float32 MLP).
        keep_factors: keep each dense layer's Kronecker factors A and S after their eigendecomposition (in
            ``layers_`` and the saved state). The solves use only the eigenvectors and eigenvalues: by default the
            factors are dropped (MiniLM's 38 layers: 148 MB of the fitted state).
    """

    name = "kfac"
    capabilities = Capabilities(
        approximate_inverse=True,
        quadratic_form=True,
        tap_quadratic_form=True,
        sharded=True,
        in_place=True,
        tap_solve=True,
    )
    _corrected = False

    def __init__(
        self,
        *,
        fisher: str = "auto",
        samples: int = 1,
        seed: int = 0,
        unsupported: str = "exclude",
        probes: int = 0,
        block_elements: int = 2**24,
        solve_dtype: torch.dtype | None = None,
        probe_examples: int | None = 64,
        keep_factors: bool = False,
        eigh_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_choice("fisher", fisher, FISHERS)
        self.unsupported = check_choice("unsupported", unsupported, UNSUPPORTED)
        self.fisher = fisher
        self.samples = check_int("samples", samples, low=1)
        self.seed = check_int("seed", seed)
        self.probes = check_int("probes", probes, low=0)
        self.probe_examples = None if probe_examples is None else check_int("probe_examples", probe_examples, low=1)
        self.block_elements = check_int("block_elements", block_elements, low=1)
        if solve_dtype is not None and (not isinstance(solve_dtype, torch.dtype) or not solve_dtype.is_floating_point):
            raise InputError(f"`solve_dtype` must be a floating torch.dtype or None. Got {solve_dtype!r}.")
        self.solve_dtype = solve_dtype
        if eigh_dtype not in (None, torch.float32, torch.float64):
            raise InputError(f"`eigh_dtype` must be torch.float32, torch.float64 or None. Got {eigh_dtype!r}.")
        self.eigh_dtype = eigh_dtype
        self.keep_factors = bool(keep_factors)
        self.passes = FisherPasses(fisher, self.samples, self.seed)

    # ------------------------------------------------------------------------------------------ setup
    def check_task(self, task: Task) -> None:
        """The task must declare its likelihood (``task.fisher``): the factors are those of its Fisher."""
        loss_kind(task)

    def covered_task(self, task: Task) -> Task:
        """With ``unsupported="exclude"``, ``task`` restricted to the parameters of the layers K-FAC factors (a
        one-line warning names what is left out); ``task`` itself otherwise or when every parameter is covered."""
        if self.unsupported != "exclude":
            return task
        params = task.params()
        _, leftover = layer_blocks(task.model, ParamLayout.of(params), embeddings=True)
        if not leftover:
            return task
        if len(leftover) == len(task.param_names):
            raise UnsupportedError(
                f"none of the selected parameters ({_names(leftover)}) lies in a layer the kfac/ekfac solvers factor "
                f"({FACTORED_LAYERS}); select such layers with the task's `params=`, or use solver='cg' or 'exact'."
            )
        sizes = {name: value.numel() for name, value in params.items()}
        kept = [n for n in task.param_names if n not in leftover]
        warnings.warn(
            f"{self.name}: influence over the {len(kept)} parameter tensors of factored layers "
            f"({sum(sizes[n] for n in kept):,} values); {len(leftover)} others left out ({_names(leftover)}; "
            f"{sum(sizes[n] for n in leftover):,} values; solver_options={{'unsupported': 'diagonal'}} keeps them).",
            InfluenceKitWarning,
            stacklevel=3,
        )
        return task.restricted(kept)

    @staticmethod
    def _layer_data(operator: CurvatureOperator) -> LayerData:
        if "layers" not in operator.capabilities:
            raise UnsupportedError(
                f"the kfac/ekfac solvers need an operator with the 'layers' capability. Got {type(operator).__name__}."
            )
        return operator.layer_data()

    def _layers(self, data: LayerData) -> tuple[list[_Layer], list[str]]:
        """Supported modules holding selected parameters, and the selected names left over."""
        blocks, leftover = layer_blocks(data.task.model, data.layout, embeddings=True)
        return [_Layer(b.name, b.module, b.weight, b.bias, b.index) for b in blocks], leftover

    def cost(self, probe: CostProbe) -> SolverCost:
        """A fit of a copy on the probe examples scaled to n (:func:`kfac_cost`)."""
        return kfac_cost(self, probe)

    # --------------------------------------------------------------------------------------------- fit
    def _fit(self, operator: CurvatureOperator) -> None:
        data = self._layer_data(operator)
        loss_kind(data.task)
        if data.weighted:
            raise UnsupportedError(
                "the kfac/ekfac solvers do not support a weighted objective (`weights`); use solver='cg'."
            )
        layers, leftover = self._layers(data)
        self._check_leftover(leftover)
        self.passes.forget_labels()  # the labels kept between this fit's two passes, never another fit's
        try:
            self._fit_passes(operator, data, layers, leftover)
        finally:
            self.passes.forget_labels()

    def _fit_passes(
        self, operator: CurvatureOperator, data: LayerData, layers: list[_Layer], leftover: list[str]
    ) -> None:
        """The factor pass, the eigendecompositions, EK-FAC's correction pass, the checks and the residual probe."""
        diag = self._factors(data, layers, leftover, operator.device)
        _eigendecompose(layers, self._eigh_dtype(operator.dtype))
        if not self.keep_factors:
            _drop_factors(layers)
        self.diagonal_ = diag / data.n_examples
        self.layers_ = layers
        self.leftover_ = leftover
        if self._corrected:
            self._correct(data)
        self._check_invertible(operator.shift)
        self._keep_in(self.solve_dtype or operator.dtype)
        self._index_leftover(data.layout, operator.device)
        self.probe_residual_ = float("nan")
        if self.probes:
            g = torch.Generator(device="cpu").manual_seed(self.seed + 1)
            V = torch.randn(self.probes, operator.n_params, dtype=torch.float64, generator=g).to(
                operator.device, operator.dtype
            )
            # a diagnostic must not set the fit's peak: an HVP (forward-over-reverse) holds several times the
            # activations of the factor passes' backward, so the probe's products run on a third of the HVP chunk
            hvp_chunk = getattr(operator, "batch_size", None)
            chunk = None if hvp_chunk is None else max(1, hvp_chunk // 3)
            self.probe_residual_ = float(
                relative_residuals(operator, self._apply(V), V, examples=self.probe_examples, chunk=chunk).max()
            )
        logger.info(
            "%s: %d layers, %d diagonal parameters, probe residual %.3g",
            self.name,
            len(layers),
            len(diag),
            self.probe_residual_,
        )

    def _eigh_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The eigendecompositions' dtype (``eigh_dtype``, or its default: see the class docstring)."""
        if self.eigh_dtype is not None:
            return self.eigh_dtype
        return torch.float64 if not self._corrected or model_dtype == torch.float64 else torch.float32

    def _keep_in(self, dtype: torch.dtype) -> None:
        """Keep each layer's factors, eigenvectors and eigenvalues in the rotations' dtype: summed and eigendecomposed
        in float64, they are used only in ``dtype`` from here on (a float32 transformer's 38 layers: 0.35 GB less)."""
        for layer in self.layers_:
            for name in ("A", "S", "QA", "QS", "eig"):
                value = getattr(layer, name)
                if value is not None and value.dtype != dtype:
                    setattr(layer, name, value.to(dtype))

    def _check_leftover(self, leftover: list[str]) -> None:
        if leftover and self.unsupported != "diagonal":
            # "exclude" leaves them out of the task when the Influence is built; an operator that still holds them
            # (a solver fitted directly, a CG preconditioner) cannot drop its own parameters
            raise UnsupportedError(
                f"the kfac/ekfac solvers factor {FACTORED_LAYERS} layers only; the selected parameters "
                f"{', '.join(repr(n) for n in leftover)} belong to other layers. Exclude them with the task's "
                "`params=` "
                "(e.g. params=['fc1', 'fc2']; ik.Influence does so itself with the default unsupported='exclude'), or "
                "pass solver_options={'unsupported': 'diagonal'} for a damped diagonal Fisher on them."
            )
        if leftover:
            warnings.warn(
                f"kfac/ekfac: the parameters {', '.join(repr(n) for n in leftover)} are outside supported layers and "
                "get "
                "a damped diagonal Fisher 1/(E[g²] + λ + δ), a cruder curvature than the Kronecker factors.",
                InfluenceKitWarning,
                stacklevel=5,
            )

    def _factors(self, data: LayerData, layers: list[_Layer], leftover: list[str], dev: torch.device) -> torch.Tensor:
        """Sum A and S per layer (and E[g²] of the leftover parameters, returned) over all examples and ranks."""
        for layer in layers:
            if layer.embedding:  # A is diagonal: the (1/T-weighted) frequency of each row; S is over the d columns
                V, d = layer.index.shape
                layer.A = torch.zeros(V, dtype=torch.float64, device=dev)
                layer.S = torch.zeros(d, d, dtype=torch.float64, device=dev)
                continue
            k, out = layer.index.shape[1], layer.index.shape[0]
            layer.A = torch.zeros(k, k, dtype=torch.float64, device=dev)
            layer.S = torch.zeros(out, out, dtype=torch.float64, device=dev)
        sizes = dict(zip(data.layout.names, data.layout.numels))
        diag = torch.zeros(sum(sizes[nm] for nm in leftover), dtype=torch.float64, device=dev)

        def local_sums() -> None:
            for A_in, G_out, extra, mask in self.passes.run(data, layers, leftover, _layer_inputs):
                for i, layer in enumerate(layers):
                    if A_in is not None:
                        _add_inputs(layer, A_in[i], mask)
                    g = G_out[i].reshape(-1, G_out[i].shape[-1])
                    _add_gram(layer.S, g, g)
                if extra is not None:
                    diag.add_((extra.to(torch.float64) ** 2).sum(0))

        # sums over this rank's examples, then over all ranks: divided by the global n below, the means are exact
        data.summed(local_sums, [t for layer in layers for t in (layer.A, layer.S)] + [diag])
        for layer in layers:
            layer.A /= data.n_examples
            layer.S /= data.n_examples
        return diag

    def _index_leftover(self, layout: Any, device: torch.device) -> None:
        if self.leftover_:
            self._leftover_index = torch.cat(
                [
                    off + torch.arange(numel)
                    for name, off, numel in zip(
                        layout.names, torch.tensor((0, *layout.numels[:-1])).cumsum(0).tolist(), layout.numels
                    )
                    if name in self.leftover_
                ]
            ).to(device)

    def state_dict(self) -> dict[str, Any]:
        """Per layer (by module name) the factors A, S, their eigenvectors and the eigenvalues in use; the
        diagonal of the leftover parameters; the probe residual."""
        self._require_fitted()
        return {
            "layers": {
                layer.name: {
                    k: getattr(layer, k) for k in ("A", "S", "QA", "QS", "eig") if getattr(layer, k) is not None
                }
                for layer in self.layers_
            },
            "leftover": list(self.leftover_),
            "diagonal": self.diagonal_,
            "probe_residual": self.probe_residual_,
        }

    def load_state_dict(self, operator: CurvatureOperator, state: dict[str, Any]) -> KFACSolver:
        data = self._layer_data(operator)
        layers, leftover = self._layers(data)
        stored = state.get("layers", {})
        if sorted(stored) != sorted(layer.name for layer in layers) or list(state.get("leftover", [])) != leftover:
            raise InputError(
                f"the stored {self.name} state covers the layers {sorted(stored)} and leftover "
                f"{state.get('leftover')}, "
                f"but this model has {sorted(layer.name for layer in layers)} and {leftover}; delete it and refit."
            )
        for layer in layers:
            for k, v in stored[layer.name].items():
                setattr(layer, k, v)
        self.operator_ = operator
        self.layers_, self.leftover_ = layers, leftover
        self.diagonal_ = state["diagonal"]
        self.probe_residual_ = float(state["probe_residual"])
        self._index_leftover(data.layout, operator.device)
        return self

    def _correct(self, data: LayerData) -> None:
        """EK-FAC's second pass: Λ = (1/n) Σ_i (Q_Sᵀ ∇_W ℓ_i Q_A)² per layer (the same labels as the first pass)."""
        for layer in self.layers_:
            layer.eig = torch.zeros_like(layer.eig, dtype=torch.float64)  # summed in float64 whatever the eigh's dtype

        def local_sums() -> None:
            A_keep: list[torch.Tensor] | None = None
            workspace = Workspace()
            for A_in, G_out, _, _ in self.passes.run(data, self.layers_, [], _layer_inputs):
                if A_in is not None:
                    A_keep = [
                        a if layer.embedding else _rotate_inputs(layer, a) for a, layer in zip(A_in, self.layers_)
                    ]
                for i, layer in enumerate(self.layers_):
                    gq = G_out[i] @ layer.QS.to(G_out[i].dtype)
                    _add_corrected(layer, A_keep[i], gq, self.block_elements, workspace)

        data.summed(local_sums, [layer.eig for layer in self.layers_])
        for layer in self.layers_:
            layer.eig /= data.n_examples

    def _check_invertible(self, shift: float) -> None:
        smallest = [float(layer.eig.min()) for layer in self.layers_]
        if len(self.diagonal_):
            smallest.append(float(self.diagonal_.min()))
        if shift <= 0 and smallest and min(smallest) <= 0:
            raise NumericalError(
                f"the Kronecker-factored curvature is singular (smallest eigenvalue {min(smallest):.3g}) and λ + δ = "
                "0. "
                "Add damping (e.g. damping=1e-3) or an L2 term (`l2=` of the task)."
            )

    # ------------------------------------------------------------------------------------------- solve
    def _apply(self, V: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The approximate (G + (λ + δ)I)⁻¹ applied to each row of V (k, n_params), written into ``out`` (may be V:
        each layer's block is gathered before the same positions are written, and the layers are disjoint).

        Layer by layer and in blocks of rows, so that the float64 working copies stay within
        ``block_elements`` values (a whole float64 copy of a query block of a 1M-parameter model is GBs)."""
        shift = self.operator_.shift
        dt = self.solve_dtype or V.dtype
        X = torch.empty_like(V) if out is None else out
        for layer in self.layers_:
            QS, denom = layer.QS.to(dt), (layer.eig + shift).to(dt)
            QA = None if layer.QA is None else layer.QA.to(dt)
            rows = max(1, self.block_elements // layer.index.numel())
            for lo in range(0, V.shape[0], rows):
                block = layer.read(V[lo : lo + rows]).to(dt)  # (r, out, k_in); an embedding's (r, V, d)
                if QA is None:  # embedding: the row side is already diagonal
                    layer.write(X[lo : lo + rows], ((block @ QS) / denom) @ QS.T)
                    continue
                layer.write(X[lo : lo + rows], QS @ (QS.T @ block @ QA).div_(denom) @ QA.T)
        if self.leftover_:
            idx = self._leftover_index
            X[:, idx] = (V[:, idx].to(torch.float64) / (self.diagonal_ + shift)).to(V.dtype)
        return X

    def low_rank_solve(
        self, factors: Factors, factored: list[bool], rank: int, *, seed: int = 0
    ) -> tuple[LowRankQueries, SolveReport]:
        """Queries from test layer taps: a factored layer's block is rotated as (g Q_S)ᵀ(ã Q_A) (T·(out² + k²) flops,
        not out²k + out·k²), divided by the eigenvalues, truncated there, only the factors rotated back."""
        op = self._require_fitted()
        if self.leftover_:
            raise UnsupportedError(
                f"`query_rank` with {self.name}: {self.leftover_} have no layer factors; exclude them with `params=`."
            )
        start = time.perf_counter()
        U, V, M = _precondition_factors(
            self.layers_,
            factors,
            factored,
            rank,
            shift=op.shift,
            dtype=self.solve_dtype or op.dtype,
            out_dtype=op.dtype,
            block_elements=self.block_elements,
            seed=seed,
        )
        report = SolveReport(solver=self.name, n_rhs=len(factors), seconds=time.perf_counter() - start, **self._info())
        return LowRankQueries(factors.blocks, rank, U, V, M), report

    def solve_taps(self, factors: Factors, out: torch.Tensor) -> SolveReport:
        """The solutions for the gradients of ``factors``' examples (their layer taps, the L2 term not in them), written
        into the rows ``out (len(factors), n_params)``: equal to :meth:`solve` of their gradient rows, each layer's
        block rotated into the eigenbasis from the taps where that is cheaper (a transformer layer's T positions
        against its width), so no gradient row is formed. Needs every parameter in a factored, non-embedding layer."""
        op = self._require_fitted()
        if not self.tap_solvable():
            raise UnsupportedError(
                f"{self.name}: solving from layer taps needs every parameter in a factored dense layer."
            )
        start = time.perf_counter()
        _solve_taps(
            self.layers_,
            factors,
            out,
            shift=op.shift,
            dtype=self.solve_dtype or op.dtype,
            block_elements=self.block_elements,
        )
        return SolveReport(solver=self.name, n_rhs=len(factors), seconds=time.perf_counter() - start, **self._info())

    def tap_solvable(self) -> bool:
        self._require_fitted()
        return not self.leftover_ and not any(layer.embedding for layer in self.layers_)

    def _solve(self, V: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self._apply(V), self._info()

    def _solve_in_place(self, V: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self._apply(V, out=V), self._info()

    def quadratic_form(self, G: torch.Tensor) -> torch.Tensor:
        op = self._require_fitted()
        out = _quadratic_form(
            self.layers_, G, shift=op.shift, dtype=self.solve_dtype or G.dtype, block_elements=self.block_elements
        )
        if self.leftover_:
            out += (G[:, self._leftover_index].to(torch.float64) ** 2 / (self.diagonal_ + op.shift)).sum(dim=1)
        return out.to(G.dtype)

    def tap_quadratic_form(self, f: Factors, l2: torch.Tensor | None) -> torch.Tensor:
        """:meth:`quadratic_form` of the gradients in a chunk's layer taps (``l2``: the λθ̂ every one carries)."""
        op = self._require_fitted()
        if self.leftover_:
            raise UnsupportedError(f"{self.name}: {self.leftover_} have no layer taps; exclude them with `params=`.")
        dtype = self.solve_dtype or f.g[0].dtype
        return _tap_quadratic_form(
            self.layers_, f, l2, shift=op.shift, dtype=dtype, block_elements=self.block_elements
        ).to(f.g[0].dtype)

    def _probed_examples(self) -> str:
        """How many training examples the fit's residual probe used: "all", or the count."""
        everything = self.probe_examples is None or self.probe_examples >= self.operator_.n_examples
        return "all" if everything else str(self.probe_examples)

    def _info(self) -> dict[str, Any]:
        return {
            "iterations": 0,
            "relative_residual": self.probe_residual_,
            "converged": True,
            "hvps": 0.0,
            "details": {
                "fisher": self.passes.used or self.fisher,
                "layers": [layer.name for layer in self.layers_],
                "diagonal_params": list(self.leftover_),
                "residual": f"approximation error of the factored Gauss-Newton against H + δI, measured at fit on "
                f"{self.probes} random directions (NaN when probes=0), H over {self._probed_examples()} "
                "training examples",
            },
        }

    def describe(self) -> dict[str, Any]:
        return {
            "solver": self.name,
            "fisher": self.fisher,
            "samples": self.samples,
            "seed": self.seed,
            "unsupported": self.unsupported,
            "solve_dtype": str(self.solve_dtype),
            "eigh_dtype": str(self.eigh_dtype),
            "probes": self.probes,
            "probe_examples": self.probe_examples,
            "keep_factors": self.keep_factors,
            "curvature": "gauss-newton",
        }


@register
class EKFACSolver(KFACSolver):
    """K-FAC with the eigenvalue correction of George et al. (2018): Λ = E[(Q_Sᵀ ∇_W ℓ Q_A)²] replaces λ_S λ_Aᵀ.

    Same arguments as :class:`KFACSolver`; ``fit`` makes a second pass over the data for Λ.
    """

    name = "ekfac"
    capabilities = Capabilities(
        approximate_inverse=True,
        quadratic_form=True,
        tap_quadratic_form=True,
        sharded=True,
        in_place=True,
        tap_solve=True,
    )
    _corrected = True

    def cost(self, probe: CostProbe) -> SolverCost:
        return kfac_cost(self, probe)


# ------------------------------------------------------------------------------------------- K-FAC/EK-FAC
def kfac_cost(solver: KFACSolver, probe: CostProbe) -> SolverCost:
    """K-FAC/EK-FAC: fit a copy of ``solver`` on the probe examples (no residual probes) and scale its passes to n."""
    n, p, q, item = probe.n, probe.p, probe.queries, probe.item
    probe_hvps = probe.hvp_seconds(solver.probes) * min(n, solver.probe_examples or n) / n
    state, fit_seconds, fit_peak, solve_flops, largest, taps = _kfac_fit(solver, probe, probe_hvps)
    return SolverCost(
        fit_seconds=fit_seconds,
        fit_memory=probe.base + fit_peak,
        fit_formula="(probe fit − eigh) × n/m + eigh + probes·min(n, the solver's probe_examples)·τ_h; peak the "
        "float64 factors, eigenvectors and eigenvalues at the eigendecompositions (_kfac_layers); state "
        "b_r·Σ(k² + o² + ok), + b_r·Σ(k² + o²) with keep_factors",
        state=state,
        solve_seconds=q * solve_flops / probe.flops,
        # the result block, plus one row block of the largest layer gathered, rotated, scaled and rotated back
        # (the solve works layer by layer in row blocks of at most block_elements values)
        solve_memory=q * p * item + 4 * min(solver.block_elements, q * largest) * 8,
        solve_formula=(
            "q·Σ[2·min(T(o² + k²) + Tok, ok(o + k)) + 2·ok(o + k)] / ρ (from the test taps)"
            if taps
            else "4·q·Σ(o²k + ok²) / ρ"
        )
        + f" ({'float64' if solver.solve_dtype == torch.float64 else 'solve_dtype'})",
    )


def _kfac_fit(solver: KFACSolver, probe: CostProbe, probe_hvps: float) -> tuple[int, float, int, float, int, bool]:
    """Returns (state bytes, fit seconds, bytes the fit holds at its peak, flops per right-hand side of a solve,
    values o·k of the largest layer block, whether the queries are solved from the test taps)."""
    options = {
        "fisher": solver.fisher,
        "samples": solver.samples,
        "seed": solver.seed,
        "unsupported": solver.unsupported,
        "block_elements": solver.block_elements,
        "eigh_dtype": solver.eigh_dtype,
    }
    probe_solver = type(solver)(**{**options, "probes": 0})
    total = probe.fit_seconds(probe_solver)
    # the eigendecompositions do not grow with n: estimate them from one timed eigh of a matrix of at most
    # 1,024 rows, scaled by (size / 1024)³, and take them out of what is scaled by n/m (a smaller timed
    # matrix is dominated by call and threading overhead, which the cube then magnifies)
    sizes = [d for layer in probe_solver.layers_ for d in layer.index.shape]
    r = max(1, min(1024, max(sizes, default=1)))
    M = torch.randn(r, r, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    M = (M @ M.T).to(probe_solver._eigh_dtype(probe.dtype))
    unit = timed(lambda: torch.linalg.eigh(M))
    eig = sum(unit * (d / r) ** 3 for d in sizes)
    positions = probe.layer_positions(probe_solver.layers_)
    outputs = probe.n_outputs()
    auto = (
        outputs if max(outputs, 2) <= EXPECTED_MAX_LABELS else solver.samples
    )  # "auto": per-token outputs count as many
    variants = {"sampled": solver.samples, "expected": outputs, "empirical": 1, "auto": auto}[solver.fisher]
    kept = torch.finfo(solver.solve_dtype or probe.dtype).bits // 8  # b_r: the state is kept in the rotations' dtype
    taps = not probe.rows and probe_solver.tap_solvable()  # the queries solved from the test taps (solve_taps)
    state, work, flops, fit_peak = _kfac_layers(
        probe_solver.layers_,
        positions,
        variants,
        min(probe.hvp_chunk, probe.n),
        2 if solver._corrected else 1,
        kept,
        torch.finfo(probe_solver._eigh_dtype(probe.dtype)).bits // 8,
        taps=taps,
        factors=solver.keep_factors,
        corrected=solver._corrected,
    )
    state += 8 * len(probe_solver.diagonal_)
    seconds = max(total - eig, 0.1 * total) * probe.n / probe.examples + eig + probe_hvps
    largest = max((int(layer.index.numel()) for layer in probe_solver.layers_), default=0)
    return state, seconds, fit_peak + 8 * len(probe_solver.diagonal_), flops, largest, taps


def _kfac_layers(
    layers: list[Any],
    positions: dict[str, int],
    variants: int,
    c: int,
    passes: int,
    kept: int,
    eigh: int,
    *,
    taps: bool = False,
    factors: bool = False,
    corrected: bool = True,
) -> tuple[int, int, float, int]:
    """(state bytes, ``kept`` bytes a value; working bytes of a factor pass over c examples; flops per right-hand side;
    bytes held at the fit's peak) summed over the layers. ``eigh``: bytes a value of the eigendecompositions;
    ``taps``: a layer's test gradient is rotated in from its taps where that is cheaper; ``factors``: the dense
    layers' A and S are kept beside their eigenvectors (``keep_factors``); ``corrected``: EK-FAC's second pass.

    The fit's arrays, by phase (F = Σ(k² + o²) factor values, O = Σ ok eigenvalues, Q the eigenvectors):
    the factor pass holds the float64 sums (8F) and a pass's taps; the eigendecompositions add Q (``eigh`` bytes a
    value), the float64 eigenvalues (8·O) and one factor's copy, eigenvectors and workspace (3 of the largest, in
    ``eigh`` bytes); EK-FAC's correction pass holds Q, its float64 sums (8·O) and a pass's taps (the factors only
    with keep_factors); the state is then converted to ``kept`` bytes."""
    state, work, flops = 0, 0, 0.0
    sums = eigvecs = eigvals = largest = 0  # values of A and S, of Q_A and Q_S, of the eigenvalues; largest factor
    for layer in layers:
        t = positions[layer.name]
        if layer.embedding:  # A diagonal (V,), S and Q_S (d, d), eigenvalues (V, d); a pass holds indices and d grads
            V, d = layer.index.shape
            state += kept * (V + 2 * d * d + V * d)
            work += 8 * c * t * (1 + d * variants) * passes
            flops += 4.0 * V * d * d
            sums, eigvecs, eigvals, largest = sums + V + d * d, eigvecs + d * d, eigvals + V * d, max(largest, d * d)
            continue
        o, k = layer.index.shape
        state += kept * ((2 if factors else 1) * (k * k + o * o) + o * k)
        work += 8 * c * t * (k + o * variants) * passes
        rotate_in = min(t * (o * o + k * k) + t * o * k, o * k * (o + k)) if taps else o * k * (o + k)
        flops += 2.0 * (rotate_in + o * k * (o + k))
        sums, eigvecs, eigvals = sums + k * k + o * o, eigvecs + k * k + o * o, eigvals + o * k
        largest = max(largest, k * k, o * o)
    decomposed = 8 * sums + eigh * eigvecs + 8 * eigvals + 3 * eigh * largest
    correcting = eigh * eigvecs + 8 * eigvals + (8 * sums if factors else 0) + work if corrected else 0
    return state, work, flops, max(8 * sums + work, decomposed, correcting, state)
