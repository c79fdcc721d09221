"""A resumable on-disk store of projected training gradients, and influence scores computed from it.

Training gradients are computed once, projected to ``dim`` dimensions (:class:`~influencekit.Projector`),
written to a folder in chunks, and queried many times (the TRAK/LoGra idea). With φ(z) = Pᵀ∇ and Φ the
``(n_train, dim)`` matrix of stored rows φ(z_i) = Pᵀ∇L(z_i, θ̂) (train side with the L2 term, as everywhere in
influencekit), the scores use the projected empirical Fisher (Gauss-Newton) curvature:

    C = (1/n) ΦᵀΦ + δ I_dim
    I_up,loss(z, z_test) ≈ −φ(z_test)ᵀ C⁻¹ φ(z),    self-influence(z) ≈ φ(z)ᵀ C⁻¹ φ(z)

with φ(z_test) = Pᵀ∇ℓ(z_test) (no L2). Because P preserves inner products in expectation, and
gᵀ(GᵀG/n + δI)⁻¹g' depends on the gradients only through inner products (Woodbury), these approximate the
same formula without projection, whose error shrinks like 1/√dim (measured in tests/index/test_store.py). δ defaults
to the task's λ plus the influence's damping: the empirical Fisher replaces ∇²ℓ, the L2 term stays.
The sign convention is that of every influencekit result (``results.CONVENTION``).

Folder layout: ``manifest.json`` (the configuration, written once, atomically), ``grads-<k>.npy`` (rows
k·chunk … of Φ), ``curvature.npy`` (ΦᵀΦ, float64), ``self-<k>.npy`` (self-influence). Every file is
written to a temporary name and renamed, so a file that exists is complete: an interrupted build resumes
at the first missing chunk and gives bit-identical results; a folder holding another configuration is
refused with both configurations printed.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.checks import check_int, check_number
from ..core.errors import CorruptFileWarning, InputError, InputTypeError, NumericalError
from ..core.folders import load_array as checked_load
from ..core.folders import open_folder
from ..core.folders import save_array as checked_save
from ..core.progress import progress_bar
from ..core.projection import Projector
from ..core.results import InfluenceScores, RankedInfluence, TopK
from ..core.topk import helpful_and_harmful
from ..data.examples import DataSource, Examples
from ..engine.scoring import Influence

__all__ = ["GradientStore"]

logger = logging.getLogger(__name__)

CURVATURE = "curvature.npy"


def save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy with its checksum (:func:`~influencekit.core.folders.save_array`; a hook the resumption
    tests
    interrupt)."""
    checked_save(path, array)


def load_array(
    path: Path, shape: tuple[int, ...], dtype: np.dtype, verified: dict[Path, tuple[int, int]] | None = None
) -> np.ndarray | None:
    """The array at ``path`` memory-mapped, or None when it is missing or fails a check (checksum, shape, dtype,
    finiteness: a :class:`~influencekit.core.errors.CorruptFileWarning` names the file and what is wrong). ``verified``
    remembers files already checked, by modification time and size, so a scoring pass reads each chunk once."""
    if not path.exists():
        return None
    stat = path.stat()
    if verified is not None and verified.get(path) == (stat.st_mtime_ns, stat.st_size):
        return np.load(path, mmap_mode="r", allow_pickle=False)
    array, problem = checked_load(path, shape, dtype, mmap=True)
    if problem is not None:
        warnings.warn(
            f"ignoring the gradient store file {problem}; it is recomputed (GradientStore.build)",
            CorruptFileWarning,
            stacklevel=3,
        )
        return None
    if verified is not None:
        verified[path] = (stat.st_mtime_ns, stat.st_size)
    return array


class GradientStore:
    """Projected training gradients on disk, and influence scores from them (module docstring: the formula).

    Create or resume one with :meth:`build`; then :meth:`scores`, :meth:`top_k` and :meth:`self_influence`
    compute projected test gradients on the fly and stream the stored chunks (memory-mapped), so neither
    the training gradients nor a score matrix has to fit in memory for :meth:`top_k`.

    Example::

        inf = ik.Influence(task, train).fit()
        store = ik.GradientStore.build(inf, "grads/", dim=4096, progress=True)   # resumes if interrupted
        store.top_k(test, k=10).harmful.indices
    """

    def __init__(
        self,
        influence: Influence,
        folder: Path,
        config: dict[str, Any],
        projector: Projector,
        damping: float,
        chunk: int,
    ) -> None:
        # use build(): this only holds what build checked
        self.influence = influence
        self.engine = engine = influence.engine
        self.folder = folder
        self.config = config
        self.projector = projector
        self.damping = damping
        self.chunk = chunk
        self.n_train = config["n_train"]
        self.dim = projector.dim
        self._np_dtype = np.dtype(str(engine.layout.dtype).removeprefix("torch."))
        self._factor: torch.Tensor | None = None
        self._verified: dict[Path, tuple[int, int]] = {}  # chunk files checked this session (mtime, size)

    # ---------------------------------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        influence: Influence,
        folder: str | os.PathLike,
        *,
        dim: int = 4096,
        kind: str = "rademacher",
        seed: int = 0,
        damping: float | None = None,
        chunk: int = 1024,
        projection_chunk: int = 4096,
        progress: bool = False,
    ) -> GradientStore:
        """Compute, project and write the training gradients of a fitted ``influence``, or resume/reopen.

        Args:
            influence: a fitted :class:`~influencekit.Influence` (its task, θ̂, training data and chunking).
            folder: the store's folder; created if missing. A folder built with the same configuration is
                reused (only missing chunks are computed); one with another configuration is refused.
            dim, kind, seed: the projection (:class:`~influencekit.Projector`).
            damping: δ of the projected curvature C = ΦᵀΦ/n + δI; ``None`` = the task's ``l2`` plus
                ``influence.damping``. Must leave C positive definite (δ > 0 when n_train < dim).
            chunk: training examples per stored file (the unit of resumption).
            projection_chunk: rows of P generated at a time (memory ``projection_chunk × dim``; no effect on results).
            progress: show a progress bar over the chunks.

        The manifest records n_train, n_params, dtype, the projection, δ, ``chunk``, the task, a sha256 of θ̂
        and of the first chunk of training data (a cheap data fingerprint; changing later examples only is
        not detected).
        """
        if not isinstance(influence, Influence):
            raise InputTypeError(
                f"`influence` must be a fitted influencekit Influence. Got {type(influence).__name__}."
            )
        engine = influence.engine  # NotFittedError before fit()
        layout = engine.layout
        chunk = check_int("chunk", chunk, low=1)
        projector = Projector(layout.n, dim, kind=kind, seed=seed, chunk=projection_chunk)
        # λ + δ of the influence's operator: the empirical Fisher replaces ∇²ℓ, the L2 term and the damping stay
        damping = engine.operator.shift if damping is None else check_number("damping", damping, low=0.0)
        config = json.loads(
            json.dumps(
                engine.provenance.manifest(
                    "influencekit gradient store",
                    ("n_train", "n_params", "dtype"),
                    **projector.describe(),
                    damping=damping,
                    chunk=chunk,
                    task=engine.provenance.task,
                    theta_fingerprint=engine.provenance.theta_fingerprint,
                    data_fingerprint=engine.data_fingerprint(engine.train, chunk),
                ),
                default=str,
            )
        )
        folder = Path(folder)
        shard = engine.shard

        def open_store() -> None:
            open_folder(folder, config, arg="folder", what="a gradient store", pattern="*.npy")

        # rank 0 creates the folder and its manifest, then every rank checks it (a shared filesystem)
        shard.check_same("the gradient store's configuration", config)
        shard.first_rank(open_store)
        shard.local(open_store)
        store = cls(influence, folder, config, projector, damping, chunk)
        store._write_gradients(progress=bool(progress))
        return store

    def _chunks(self) -> range:
        return range(0, self.n_train, self.chunk)

    def _path(self, what: str, lo: int) -> Path:
        return self.folder / f"{what}-{lo // self.chunk:06d}.npy"

    def _write_gradients(self, *, progress: bool) -> None:
        """Compute and write the missing chunks, then ΦᵀΦ.

        Under a torch.distributed process group (``influence.engine.shard``) chunk c is computed and written by rank
        c mod world_size, each rank sums ΦᵀΦ over its own chunks, the sums are all-reduced and rank 0 writes
        the file; every rank waits for the others (a failure on one stops all). The chunk files are the same
        bytes as a single process writes; ΦᵀΦ differs only by the order of summation.
        """
        engine = self.engine
        shard = engine.shard
        rank, world = shard.rank, shard.world_size
        mine = [lo for c, lo in enumerate(self._chunks()) if c % world == rank]
        curvature_missing = load_array(self.folder / CURVATURE, (self.dim, self.dim), np.dtype(np.float64)) is None
        # ranks that saw different files would enter different collectives
        shard.check_same(
            "the gradient store's files (the folder must be on a filesystem every rank shares)",
            {"curvature_missing": curvature_missing},
        )

        def write_mine() -> torch.Tensor | None:
            total = torch.zeros(self.dim, self.dim, dtype=torch.float64) if curvature_missing else None
            bar = progress_bar(
                total=sum(min(self.chunk, self.n_train - lo) for lo in mine),
                desc="projected gradients",
                enabled=progress and rank == 0,
            )
            try:
                for lo in mine:
                    hi = min(lo + self.chunk, self.n_train)
                    path = self._path("grads", lo)
                    array = load_array(path, (hi - lo, self.dim), self._np_dtype)
                    if array is None:
                        rows = [
                            self.projector.project(G)
                            for _, G in engine.gradients.stream(engine.train, side="train", start=lo, stop=hi)
                        ]
                        array = torch.cat(rows).cpu().numpy()
                        save_array(path, array)
                    if total is not None:
                        Phi = torch.from_numpy(np.array(array)).double()
                        total += Phi.T @ Phi
                    bar.update(hi - lo)
            finally:
                bar.close()
            return total

        total = shard.local(write_mine)
        if total is not None:
            shard.all_reduce(total)
            shard.first_rank(lambda: save_array(self.folder / CURVATURE, total.numpy()))

    # ------------------------------------------------------------------------------------- reading
    def gradients(self) -> Any:
        """Yield ``(offset, Φ rows)`` chunk by chunk: projected training gradients, ``(rows, dim)`` tensors on the
        CPU."""
        for lo in self._chunks():
            hi = min(lo + self.chunk, self.n_train)
            array = load_array(self._path("grads", lo), (hi - lo, self.dim), self._np_dtype, self._verified)
            if array is None:
                raise InputError(
                    f"the gradient store {str(self.folder)!r} lacks its chunk at rows {lo}:{hi}; rerun "
                    "GradientStore.build to complete it."
                )
            yield lo, torch.from_numpy(np.array(array))

    def _cholesky(self) -> torch.Tensor:
        if self._factor is None:
            stored = load_array(self.folder / CURVATURE, (self.dim, self.dim), np.dtype(np.float64))
            if stored is None:
                raise InputError(
                    f"the gradient store {str(self.folder)!r} lacks a valid {CURVATURE}; rerun GradientStore.build to "
                    "complete it."
                )
            ptp = torch.from_numpy(np.array(stored))
            C = ptp / self.n_train + self.damping * torch.eye(self.dim, dtype=torch.float64)
            L, info = torch.linalg.cholesky_ex(C)
            if int(info) != 0:
                raise NumericalError(
                    f"the projected curvature ΦᵀΦ/n + δI is not positive definite with damping δ={self.damping:g} "
                    f"(n_train={self.n_train}, dim={self.dim}); build with damping > 0."
                )
            self._factor = L
        return self._factor

    def queries(self, test: DataSource) -> tuple[Examples, torch.Tensor]:
        """The test data as Examples and C⁻¹φ(z_test) for every test point, ``(n_test, dim)`` float64 on the CPU: the
        preconditioned queries that every score of this store is the product of (with −Φ rows)."""
        engine = self.engine
        data = test if isinstance(test, Examples) else Examples(test, name="test")
        phi = torch.cat(
            [self.projector.project(G) for _, G in engine.gradients.stream(data, side="test", desc="test gradients")]
        )
        return data, torch.cholesky_solve(phi.double().cpu().T, self._cholesky()).T

    def _metadata(self, **extra: Any) -> dict[str, Any]:
        return self.engine.provenance.result_metadata(
            "I_up,loss with projected empirical-Fisher curvature (TRAK-style)",
            ("task", "dtype"),
            curvature="C = Phi^T Phi / n + damping*I in the projected space, Phi = P^T grad L(z_i)",
            **self.projector.describe(),
            damping=self.damping,
            store=str(self.folder),
            **extra,
        )

    # ---------------------------------------------------------------------------------- public API
    def scores(self, test: DataSource) -> InfluenceScores:
        """−φ(z_test)ᵀC⁻¹φ(z) for every (test, train) pair, ``(n_test, n_train)`` (computed in float64)."""
        data, Q = self.queries(test)
        out = torch.empty(len(data), self.n_train, dtype=torch.float64)
        for lo, Phi in self.gradients():
            out[:, lo : lo + len(Phi)] = -(Q @ Phi.double().T)
        layout = self.engine.layout
        return InfluenceScores(out.to(dtype=layout.dtype, device=layout.device), self.n_train, self._metadata())

    def top_k(self, test: DataSource, k: int = 10) -> RankedInfluence:
        """The ``k`` most helpful and most harmful training points per test point, streamed over the stored chunks."""
        k = check_int("k", k, low=1, high=self.n_train)
        data, Q = self.queries(test)
        helpful, harmful = helpful_and_harmful(Q, self.gradients(), k, lambda Q, Phi: -(Q @ Phi.double().T))
        layout = self.engine.layout

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=layout.device, dtype=layout.dtype if t.is_floating_point() else t.dtype)

        return RankedInfluence(
            TopK(move(helpful.indices), move(-helpful.values)),
            TopK(move(harmful.indices), move(harmful.values)),
            self.n_train,
            self._metadata(k=k),
        )

    def self_influence(self, *, progress: bool = False) -> torch.Tensor:
        """φ(z)ᵀC⁻¹φ(z) for every training point, ``(n_train,)``; written chunk by chunk (resumable)."""
        L = self._cholesky()
        out = torch.empty(self.n_train, dtype=torch.float64)
        bar = progress_bar(total=self.n_train, desc="self-influence", enabled=progress)
        try:
            for lo, Phi in self.gradients():
                path = self._path("self", lo)
                values = load_array(path, (len(Phi),), np.dtype(np.float64))
                if values is None:
                    Phi = Phi.double()
                    values = (torch.cholesky_solve(Phi.T, L).T * Phi).sum(1).numpy()
                    save_array(path, values)
                out[lo : lo + len(Phi)] = torch.from_numpy(np.array(values))
                bar.update(len(Phi))
        finally:
            bar.close()
        layout = self.engine.layout
        return out.to(dtype=layout.dtype, device=layout.device)
