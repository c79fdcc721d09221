"""Seeded random projections of per-example gradients (Johnson–Lindenstrauss; the TRAK/LoGra idea).

A :class:`Projector` maps gradients g ∈ R^p (rows of a ``(B, n_params)`` block) to φ = Pᵀg ∈ R^k with a random
matrix P ∈ R^{p×k} whose entries are i.i.d. with mean 0 and variance 1/k:

    kind="gaussian":    P_ij ~ N(0, 1/k)
    kind="rademacher":  P_ij = ±1/√k with probability 1/2 each

so that E[PPᵀ] = I and inner products are preserved in expectation, E[φ(x)ᵀφ(y)] = xᵀy. For a fixed x and
0 < ε < 1, both kinds satisfy (Dasgupta & Gupta 2003; Achlioptas 2003, Theorem 1.1)

    Pr[ |‖Pᵀx‖² / ‖x‖² − 1| > ε ] ≤ 2 exp(−(ε²/2 − ε³/3) k/2),

which :func:`jl_failure_bound` returns and tests/core/test_projection.py checks over many seeds.

P is never materialised: it is defined in fixed blocks of ``UNIT`` rows (parameters), block b drawn from its
own generator seeded by (seed, b), and generated block by block on the gradients' device while the product
is accumulated, block after block, in a fixed order. The projection is therefore a function of
(n_params, dim, kind, seed, dtype, device type) only: ``chunk`` (rows of P generated per step, the memory
knob: ``chunk × dim`` numbers) does not change a single bit of the result. Pure torch: no custom CUDA kernel.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .checks import check_choice, check_int
from .errors import InputError, InputTypeError

__all__ = ["Projector", "jl_failure_bound"]

UNIT = 256  # rows of P per generator: part of P's definition (changing it changes every projection)
_KINDS = ("rademacher", "gaussian")


def jl_failure_bound(dim: int, eps: float) -> float:
    """2 exp(−(ε²/2 − ε³/3)·dim/2): the probability that a projection to ``dim`` dimensions distorts the
    squared norm of one fixed vector by a relative error above ε (Gaussian or Rademacher entries)."""
    return min(1.0, 2.0 * math.exp(-(eps**2 / 2 - eps**3 / 3) * dim / 2))


def _unit_seed(seed: int, block: int) -> int:
    # a hash, not seed + block, so that neighbouring seeds do not share shifted copies of the same blocks
    digest = hashlib.blake2b(f"influencekit-projection:{seed}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Projector:
    """A seeded random projection R^{n_params} → R^{dim} applied to blocks of per-example gradients.

    Args:
        n_params: the length p of the vectors to project.
        dim: the projection dimension k (the accuracy/speed knob: relative distortion of a squared norm
            is about √(2/k)).
        kind: ``"rademacher"`` (±1/√k, default) or ``"gaussian"`` (N(0, 1/k)).
        seed: any int ≥ 0; the same seed gives the same P.
        chunk: rows of P generated per step (rounded up to a multiple of ``UNIT`` = 256); memory is
            ``chunk × dim`` numbers. Changes speed and memory only, never the result.

    Example::

        proj = ik.Projector(n_params=inf.n_params, dim=4096, seed=0)
        phi = proj.project(G)          # (B, n_params) -> (B, 4096), phi[i] @ phi[j] ≈ G[i] @ G[j]
    """

    def __init__(self, n_params: int, dim: int, *, kind: str = "rademacher", seed: int = 0, chunk: int = 4096) -> None:
        self.n_params = check_int("n_params", n_params, low=1)
        self.dim = check_int("dim", dim, low=1)
        self.kind = check_choice("kind", kind, _KINDS)
        self.seed = check_int("seed", seed, low=0)
        self.chunk = UNIT * math.ceil(check_int("chunk", chunk, low=1) / UNIT)

    def describe(self) -> dict[str, object]:
        """The settings that define P (for manifests and result metadata)."""
        return {"projection": self.kind, "dim": self.dim, "seed": self.seed, "n_params": self.n_params, "unit": UNIT}

    def _block(self, b: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
        rows = min(UNIT, self.n_params - b * UNIT)
        gen.manual_seed(_unit_seed(self.seed, b))
        if self.kind == "gaussian":
            return torch.randn(rows, self.dim, generator=gen, dtype=dtype, device=device).mul_(
                1.0 / math.sqrt(self.dim)
            )
        signs = torch.randint(0, 2, (rows, self.dim), generator=gen, device=device).to(dtype)
        return signs.mul_(2.0 / math.sqrt(self.dim)).sub_(1.0 / math.sqrt(self.dim))

    def matrix(
        self,
        start: int = 0,
        stop: int | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Rows ``start:stop`` of P, ``(stop − start, dim)`` (for inspection and tests; ``project`` never builds P)."""
        stop = self.n_params if stop is None else stop
        if not 0 <= start < stop <= self.n_params:
            raise InputError(
                f"`start`/`stop` must satisfy 0 <= start < stop <= n_params = {self.n_params}. Got {start}, {stop}."
            )
        device = torch.device(device)
        gen = torch.Generator(device=device)
        blocks = [self._block(b, dtype, device, gen) for b in range(start // UNIT, (stop - 1) // UNIT + 1)]
        first = (start // UNIT) * UNIT
        return torch.cat(blocks)[start - first : stop - first]

    def project(self, G: torch.Tensor) -> torch.Tensor:
        """φ = G P, ``(B, n_params) -> (B, dim)``, in G's dtype and on its device.

        Accumulated block by block of ``UNIT`` parameters in a fixed order, so that ``chunk`` does not
        change the result; each row depends on that row of G only (up to the BLAS's choice of kernel for
        the batch size B, which the tests bound at round-off).
        """
        if not isinstance(G, torch.Tensor) or not G.is_floating_point():
            raise InputTypeError(
                f"`G` must be a floating-point torch.Tensor of shape (B, {self.n_params}). Got {type(G).__name__}."
            )
        if G.ndim != 2 or G.shape[1] != self.n_params:
            raise InputError(f"`G` must have shape (B, n_params={self.n_params}). Got {tuple(G.shape)}.")
        out = torch.zeros(G.shape[0], self.dim, dtype=G.dtype, device=G.device)
        gen = torch.Generator(device=G.device)
        per_step = self.chunk // UNIT
        n_blocks = math.ceil(self.n_params / UNIT)
        for first in range(0, n_blocks, per_step):
            blocks = [self._block(b, G.dtype, G.device, gen) for b in range(first, min(first + per_step, n_blocks))]
            for j, P in enumerate(blocks):
                lo = (first + j) * UNIT
                out.addmm_(G[:, lo : lo + len(P)], P)
        return out
