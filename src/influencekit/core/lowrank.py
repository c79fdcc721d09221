"""Query batching: preconditioned test gradients kept per layer as rank-r matrices, scored against layer taps.

For a layer with (out × k) weights [W | b], an example's gradient is Σ_t g_t ã_tᵀ (:mod:`~influencekit.core.layers`):
g_t the output gradients, ã_t the inputs with a 1 appended for the bias, t over positions. If a preconditioned
query's block of that layer is kept as Σ_r u_r v_rᵀ (its leading singular triplets, the singular values folded
into u), its score against the example is

    ⟨Σ_r u_r v_rᵀ, Σ_t g_t ã_tᵀ⟩ = Σ_r Σ_t (u_r · g_t)(v_r · ã_t),

r·T·(out + k) multiply-adds instead of out·k, and the gradient is never materialised. For a dense layer seen
once per example (T = 1) and a few ranks, that is tens to hundreds of times fewer flops (Linear(3136 → 300):
8·3,437 against 940,800). Where r·T·(out + k) ≥ out·k (a convolution with many positions, a small layer) the
layer is scored densely: its query block kept whole, the example's block of gradient materialised.
(Grosse et al. 2023, §3.2; Kronfluence's ``query_gradient_low_rank``.)

:class:`Factors` is one chunk's taps; :class:`LowRankQueries` the queries' per-layer blocks, with the product
against factors and against a flat vector (the L2 term of the training side). A rank at least min(out, k) keeps a
block exactly (to round-off): the scores then equal the dense ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .autodiff import ParamLayout
from .checks import check_int
from .errors import UnsupportedError
from .layers import LayerBlock, layer_blocks
from .spectrum import randomized_svd

__all__ = ["Factors", "LowRankQueries", "factor_blocks", "factored_layers", "factor_rows", "dense_block_product"]

WORK_ELEMENTS = 2**24  # largest temporary of a product, in values


def factor_blocks(model: torch.nn.Module, layout: ParamLayout) -> list[LayerBlock]:
    """The layer blocks holding the selected parameters, when they hold all of them and none is an embedding;
    else :class:`UnsupportedError` naming the parameters and the fix."""
    blocks, leftover = layer_blocks(model, layout, embeddings=True)
    embeddings = [b.name for b in blocks if b.embedding]
    if leftover or embeddings:
        names = leftover + [f"{n} (nn.Embedding)" for n in embeddings]
        raise UnsupportedError(
            "`query_rank` needs every selected parameter in an nn.Linear, nn.Conv1d, nn.Conv2d (groups=1) or "
            f"transformers Conv1D layer; {', '.join(repr(n) for n in names[:5])}{' ...' if len(names) > 5 else ''} "
            "are not. Exclude them with the task's `params=`, or score without `query_rank`."
        )
    return blocks


def factored_layers(blocks: list[LayerBlock], positions: list[int], rank: int) -> list[bool]:
    """Per block: is the rank-``rank`` product r·T·(out + k) cheaper than the dense out·k (T: ``positions``)?"""
    out = []
    for block, T in zip(blocks, positions):
        o, k = block.index.shape
        out.append(min(rank, o, k) * T * (o + k) < o * k)
    return out


@dataclass
class Factors:
    """One chunk's layer taps: per block its inputs ``a (B, T, k)`` (a 1 appended for a selected bias) and output
    gradients ``g (B, T, out)``."""

    blocks: list[LayerBlock]
    a: list[torch.Tensor]
    g: list[torch.Tensor]

    def __len__(self) -> int:
        return self.g[0].shape[0]

    def block_gradient(self, j: int) -> torch.Tensor:
        """Block ``j``'s per-example gradients ``(B, out, k)``: Σ_t g_t ã_tᵀ."""
        a, g = self.a[j], self.g[j]
        if a.shape[1] == 1:
            return g[:, 0, :, None] * a[:, 0, None, :]
        return g.transpose(1, 2) @ a

    def dense(self, n_params: int) -> torch.Tensor:
        """The per-example gradient rows ``(B, n_params)`` (the blocks cover every parameter)."""
        G = torch.zeros(len(self), n_params, dtype=self.g[0].dtype, device=self.g[0].device)
        for j, block in enumerate(self.blocks):
            G[:, block.index] = self.block_gradient(j)
        return G


@dataclass
class LowRankQueries:
    """Preconditioned queries per layer block: ``U[j] (q, r, out)`` and ``V[j] (q, r, k)`` (the singular values in
    U) where the block is factored, else ``M[j] (q, out, k)``, the block whole."""

    blocks: list[LayerBlock]
    rank: int
    U: list[torch.Tensor | None]
    V: list[torch.Tensor | None]
    M: list[torch.Tensor | None]
    _dots: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dense(
        cls, X: torch.Tensor, blocks: list[LayerBlock], factored: list[bool], rank: int, *, seed: int = 0
    ) -> LowRankQueries:
        """Factor the blocks of preconditioned queries ``X (q, n_params)`` marked in ``factored`` at ``rank``."""
        check_int("query_rank", rank, low=1)
        U: list[torch.Tensor | None] = []
        V: list[torch.Tensor | None] = []
        M: list[torch.Tensor | None] = []
        for block, f in zip(blocks, factored):
            B = X[:, block.index]  # (q, out, k)
            if not f:
                U.append(None), V.append(None), M.append(B)
                continue
            u, v = factor_rows(B, rank, seed=seed)
            U.append(u), V.append(v), M.append(None)
        return cls(blocks, rank, U, V, M)

    @classmethod
    def cat(cls, parts: list[LowRankQueries]) -> LowRankQueries:
        """The queries of ``parts`` one after the other."""
        first = parts[0]

        def join(lists: list[list[torch.Tensor | None]]) -> list[torch.Tensor | None]:
            return [None if items[0] is None else torch.cat(items) for items in zip(*lists)]

        return cls(
            first.blocks, first.rank, join([p.U for p in parts]), join([p.V for p in parts]), join([p.M for p in parts])
        )

    def __len__(self) -> int:
        first = self.U[0] if self.U[0] is not None else self.M[0]
        return first.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.U, *self.V, *self.M) if t is not None)

    def describe(self) -> dict[str, object]:
        """Which layers are factored at which rank and which are scored densely (for result metadata)."""
        return {
            "query_rank": self.rank,
            "factored": [b.name for b, u in zip(self.blocks, self.U) if u is not None],
            "dense": [b.name for b, m in zip(self.blocks, self.M) if m is not None],
        }

    def product(self, f: Factors) -> torch.Tensor:
        """⟨query, ∇ℓ(z)⟩ for every query and example of ``f``: ``(q, B)``."""
        q, B = len(self), len(f)
        S = torch.zeros(q, B, dtype=f.g[0].dtype, device=f.g[0].device)
        for j in range(len(self.blocks)):
            U, V, M = self.U[j], self.V[j], self.M[j]
            if M is not None:
                S += M.reshape(q, -1) @ f.block_gradient(j).reshape(B, -1).T
                continue
            a, g = f.a[j], f.g[j]
            T, r = a.shape[1], U.shape[1]
            a2, g2 = a.reshape(B * T, -1), g.reshape(B * T, -1)
            step = max(1, WORK_ELEMENTS // (B * T * r))
            for lo in range(0, q, step):
                u, v = U[lo : lo + step], V[lo : lo + step]
                n = u.shape[0]
                prod = (g2 @ u.reshape(n * r, -1).T) * (a2 @ v.reshape(n * r, -1).T)  # (B·T, n·r)
                S[lo : lo + n] += prod.reshape(B, T, n, r).sum(dim=(1, 3)).T
        return S

    def dot(self, w: torch.Tensor) -> torch.Tensor:
        """⟨query, w⟩ for a flat parameter vector ``w``: ``(q,)``; kept per ``w`` (the L2 term λθ̂ is the same for every
        chunk of training examples, and a factored block costs r·out·k per query)."""
        kept = self._dots.get(id(w))
        if kept is not None and kept[0] is w:
            return kept[1]
        out = torch.zeros(len(self), dtype=w.dtype, device=w.device)
        for j, block in enumerate(self.blocks):
            W = w[block.index]  # (out, k)
            if self.M[j] is not None:
                out += self.M[j].reshape(len(self), -1) @ W.reshape(-1)
            else:
                out += ((self.U[j] @ W) * self.V[j]).sum(dim=(1, 2))
        self._dots[id(w)] = (w, out)
        return out


def factor_rows(B: torch.Tensor, rank: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U (q, r, out), V (q, r, k))`` with Σ_r U_r V_rᵀ the rank-``rank`` truncated SVD of each ``B (q, out, k)``,
    computed in blocks of matrices so that the work stays within :data:`WORK_ELEMENTS` values."""
    q, o, k = B.shape
    r = min(rank, o, k)
    U = torch.empty(q, r, o, dtype=B.dtype, device=B.device)
    V = torch.empty(q, r, k, dtype=B.dtype, device=B.device)
    step = max(1, WORK_ELEMENTS // (o * k))
    for lo in range(0, q, step):
        u, s, v = randomized_svd(B[lo : lo + step], rank, seed=seed)
        U[lo : lo + step] = (u * s[:, None, :]).mT
        V[lo : lo + step] = v.mT
    return U, V


def dense_block_product(M: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """⟨M_i, Σ_t g_t ã_tᵀ⟩ for whole query blocks ``M (q, out, k)`` against examples' taps ``a (B, T, k)``,
    ``g (B, T, out)``: ``(q, B)``, as Σ_t g_t · (M ã_t), never materialising the examples' ``(B, out, k)`` gradients
    (q·B·T·out·k multiply-adds: a dense dot product's count for T = 1), in blocks of queries whose temporary stays
    within :data:`WORK_ELEMENTS` values."""
    q, (B, T, k) = M.shape[0], a.shape
    a2, g2 = a.reshape(B * T, k), g.reshape(B * T, -1)
    out = torch.empty(q, B, dtype=a.dtype, device=a.device)
    step = max(1, WORK_ELEMENTS // max(1, B * T * k))
    for lo in range(0, q, step):
        t = g2 @ M[lo : lo + step]  # (n, B·T, k): the rows g_tᵀ M_i
        out[lo : lo + step] = (t * a2).sum(dim=-1).reshape(-1, B, T).sum(dim=-1)
    return out
