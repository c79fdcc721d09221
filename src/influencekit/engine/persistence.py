"""What an :class:`~influencekit.Influence` keeps on disk: the fitted solver (``cache_dir``) and score folders.

Both use :mod:`influencekit.core.folders` (a manifest that refuses another configuration, atomic writes) with
manifests built from the fit's :class:`~influencekit.engine.config.Provenance`. Under a process group rank 0 writes
while every rank waits, and every rank must see the same files (checked) before the next collective.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..core.curvature import CurvatureOperator
from ..core.distributed import Shard
from ..core.errors import CorruptFileWarning
from ..core.folders import load_array, open_folder, save_array, verify_checked, write_checked
from ..solvers import Solver
from .config import Provenance

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
        """Make ``solver`` fitted from the stored state; False when there is none yet, or when the stored file fails its
        checksum or cannot be loaded (a :class:`~influencekit.core.errors.CorruptFileWarning` names it): then fit and
        :meth:`store`."""
        state, problem = None, None
        if self.path.exists():
            problem = verify_checked(self.path)
            if problem is None:
                try:
                    state = torch.load(self.path, map_location=operator.device, weights_only=True)
                except (
                    Exception
                ) as exc:  # a truncated or foreign file: torch's reader errors name neither the folder nor the fix
                    problem = f"it cannot be loaded ({type(exc).__name__}: {exc})"
        # a rank loading while another fits (with collectives) would hang them
        self.shard.check_same("the fitted-solver cache", {"state_file_usable": state is not None})
        if state is None:
            if problem is not None:
                warnings.warn(
                    f"ignoring the fitted-solver cache file {self.path}: {problem}; refitting the solver and "
                    "replacing it",
                    CorruptFileWarning,
                    stacklevel=4,
                )
            return False
        solver.load_state_dict(operator, state)
        logger.info("fit: solver %r loaded from %s", solver.name, self.path)
        return True

    def store(self, solver: Solver) -> None:
        state = solver.state_dict()
        if state is None:
            logger.info(
                "fit: solver %r keeps no state worth storing; %s holds only the manifest", solver.name, self.folder
            )
            return
        self.shard.first_rank(lambda: write_checked(self.path, lambda f: torch.save(state, f)))


class ScoreFolder:
    """A score matrix kept as ``scores-<first row>.npy`` row blocks of ``rows`` test points, resumable."""

    def __init__(
        self,
        folder: str | os.PathLike,
        provenance: Provenance,
        *,
        n_test: int,
        rows: int,
        train_fingerprint: str,
        test_fingerprint: str,
        shard: Shard,
    ) -> None:
        self.folder = Path(folder)
        self.rows = rows
        self.shard = shard
        config = provenance.manifest(
            "influencekit pairwise scores",
            ("n_train", "task", "solver", "damping", "dtype", "theta_fingerprint"),
            n_test=n_test,
            rows_per_file=rows,
            train_fingerprint=train_fingerprint,
            test_fingerprint=test_fingerprint,
            **({"precision": provenance.precision} if provenance.precision != "full" else {}),
        )
        open_folder(self.folder, config, arg="folder", what="pairwise scores", pattern="scores-*.npy")
        self.done: dict[int, np.ndarray] = {}  # first row -> the block, verified
        for lo in range(0, n_test, rows):
            if not self.path(lo).exists():
                continue
            array, problem = load_array(
                self.path(lo),
                (min(rows, n_test - lo), provenance.n_train),
                np.dtype(str(provenance.dtype).removeprefix("torch.")),
            )
            if problem is None:
                self.done[lo] = array
            else:  # named, and recomputed: a replaced, truncated or NaN-filled block is never returned
                warnings.warn(
                    f"ignoring the score file {problem}; recomputing its rows", CorruptFileWarning, stacklevel=4
                )
        # every rank must skip the same blocks, or the collectives would mismatch
        shard.check_same("the score folder's finished files", {"files": sorted(self.done)})

    def path(self, first_row: int) -> Path:
        return self.folder / f"scores-{first_row:09d}.npy"

    def read(self, first_row: int) -> torch.Tensor:
        return torch.from_numpy(self.done[first_row])

    def write(self, first_row: int, block: torch.Tensor) -> None:
        array = block.detach().cpu().numpy()
        self.shard.first_rank(lambda: save_array(self.path(first_row), array))
