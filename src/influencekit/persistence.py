"""What an :class:`~influencekit.Influence` keeps on disk: the fitted solver (``cache_dir``) and score folders.

Both use :mod:`influencekit.folders` (a manifest that refuses another configuration, atomic writes) with
manifests built from the fit's :class:`~influencekit.config.Provenance`. Under a process group rank 0 writes
while every rank waits, and every rank must see the same files (checked) before the next collective.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .config import Provenance
from .curvature import CurvatureOperator
from .distributed import Shard
from .folders import atomic_write, open_folder
from .solvers import Solver

__all__ = ["SolverCache", "ScoreFolder", "SOLVER_STATE", "DATA_HEAD"]

logger = logging.getLogger(__name__)

SOLVER_STATE = "solver-state.pt"  # the fitted solver's state inside `cache_dir`
DATA_HEAD = 1024  # examples hashed as the manifests' cheap data fingerprint


class SolverCache:
    """``cache_dir``: a fitted solver's ``state_dict`` beside a manifest of the configuration it belongs to."""

    def __init__(self, folder: str | os.PathLike, provenance: Provenance, data_fingerprint: str, shard: Shard) -> None:
        self.folder = Path(folder)
        self.shard = shard
        self.config = provenance.manifest(
            "influencekit fitted solver",
            ("n_train", "parameters", "dtype", "task", "solver", "damping", "theta_fingerprint"),
            data_fingerprint=data_fingerprint,
        )
        open_folder(self.folder, self.config, arg="cache_dir", what="a fitted solver", pattern=SOLVER_STATE)

    @property
    def path(self) -> Path:
        return self.folder / SOLVER_STATE

    def load(self, solver: Solver, operator: CurvatureOperator) -> bool:
        """Make ``solver`` fitted from the stored state; False when there is none yet (then fit and :meth:`store`)."""
        exists = self.path.exists()
        # a rank loading while another fits (with collectives) would hang them
        self.shard.check_same("the fitted-solver cache", {"state_file_exists": exists})
        if not exists:
            return False
        solver.load_state_dict(operator, torch.load(self.path, map_location=operator.device, weights_only=True))
        logger.info("fit: solver %r loaded from %s", solver.name, self.path)
        return True

    def store(self, solver: Solver) -> None:
        state = solver.state_dict()
        if state is None:
            logger.info("fit: solver %r keeps no state worth storing; %s holds only the manifest", solver.name, self.folder)
            return
        self.shard.first_rank(lambda: atomic_write(self.path, lambda f: torch.save(state, f)))


class ScoreFolder:
    """A score matrix kept as ``scores-<first row>.npy`` row blocks of ``rows`` test points, resumable."""

    def __init__(self, folder: str | os.PathLike, provenance: Provenance, *, n_test: int, rows: int,
                 train_fingerprint: str, test_fingerprint: str, shard: Shard) -> None:
        self.folder = Path(folder)
        self.rows = rows
        self.shard = shard
        config = provenance.manifest(
            "influencekit pairwise scores", ("n_train", "task", "solver", "damping", "dtype", "theta_fingerprint"),
            n_test=n_test, rows_per_file=rows, train_fingerprint=train_fingerprint,
            test_fingerprint=test_fingerprint, **({"precision": provenance.precision} if provenance.precision != "full" else {}),
        )
        open_folder(self.folder, config, arg="folder", what="pairwise scores", pattern="scores-*.npy")
        self.done = {lo: self.path(lo) for lo in range(0, n_test, rows) if self.path(lo).exists()}
        # every rank must skip the same blocks, or the collectives would mismatch
        shard.check_same("the score folder's finished files", {"files": sorted(self.done)})

    def path(self, first_row: int) -> Path:
        return self.folder / f"scores-{first_row:09d}.npy"

    def read(self, first_row: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self.done[first_row]))

    def write(self, first_row: int, block: torch.Tensor) -> None:
        array = block.detach().cpu().numpy()
        self.shard.first_rank(lambda: atomic_write(self.path(first_row), lambda f: np.save(f, array)))
