"""The module paths of influencekit 0.1's flat layout, kept as deprecated aliases of their new homes.

``import influencekit.scoring`` (or ``from influencekit.store import GradientStore``) still works: the import hook
below answers each old path with the module at its new path (the same module object) and a DeprecationWarning that
names the new path. The public API (``import influencekit as ik``; ``ik.hf``, ``ik.solvers``, ``ik.validation``) is
unchanged; this only keeps old import lines working.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

# old dotted path -> new dotted path
MOVED: dict[str, str] = {
    **{
        f"influencekit.{m}": f"influencekit.core.{m}"
        for m in (
            "errors",
            "progress",
            "checks",
            "folders",
            "memory",
            "autodiff",
            "distributed",
            "spectrum",
            "projection",
            "results",
            "task",
            "layers",
            "lowrank",
            "topk",
            "curvature",
        )
    },
    **{
        f"influencekit.{m}": f"influencekit.engine.{m}"
        for m in (
            "hessian",
            "last_layer",
            "gradients",
            "config",
            "persistence",
            "pairwise",
            "perturbation",
            "groups",
            "training",
            "planner",
            "scoring",
        )
    },
    "influencekit.prefix": "influencekit.hf.prefix",
    "influencekit.store": "influencekit.index.store",
    "influencekit.index_rows": "influencekit.index.rows",
    "influencekit.serve": "influencekit.index.serve",
    "influencekit.sklearn_interop": "influencekit.models.sklearn",
    "influencekit.experiments": "influencekit_paper",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already imported."""


class _MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            old_package = next((old for old in MOVED if fullname.startswith(old + ".")), None)
            if old_package is None:
                return None
            new = MOVED[old_package] + fullname[len(old_package) :]
        warnings.warn(
            f"`{fullname}` moved to `{new}`; import it from there (the old path will be removed).",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.machinery.ModuleSpec(fullname, _Alias(new), is_package=False)


def install() -> None:
    """Put the alias hook on ``sys.meta_path`` once."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
