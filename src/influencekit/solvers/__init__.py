"""Inverse-Hessian solvers, chosen by name (``"exact" | "cg" | "lissa" | "arnoldi" | "kfac" | "ekfac"``, the
registry of ``registry.py``) or passed as an instance.

May import: ``influencekit.core`` and ``influencekit.data`` (a solver sees the objective only through the
``core.curvature.CurvatureOperator`` protocol). Imported by the engine and everything above it."""

from __future__ import annotations

import inspect
from typing import Any

from ..core.checks import check_choice
from ..core.errors import InputError, InputTypeError
from .arnoldi import ArnoldiSolver
from .base import Capabilities, Solution, Solver, SolveReport
from .cg import CGSolver
from .costs import CostProbe, SolverCost
from .exact import ExactSolver
from .kfac import EKFACSolver, KFACSolver
from .lissa import LissaSolver
from .registry import SOLVERS

__all__ = [
    "Solver",
    "SolveReport",
    "Solution",
    "Capabilities",
    "CostProbe",
    "SolverCost",
    "ExactSolver",
    "CGSolver",
    "LissaSolver",
    "ArnoldiSolver",
    "KFACSolver",
    "EKFACSolver",
    "make_solver",
    "SOLVERS",
]

# every solver module registered its classes as it was imported (above); listed in the documented order
for _name in ("exact", "cg", "lissa", "arnoldi", "kfac", "ekfac"):
    SOLVERS[_name] = SOLVERS.pop(_name)


def make_solver(solver: Any, **options: Any) -> Solver:
    """A solver from its name (with ``options`` passed to its constructor) or a ready instance."""
    if isinstance(solver, Solver):
        if options:
            raise InputError(
                f"`solver_options` apply only when `solver` is a name. Got an instance and options {sorted(options)}."
            )
        return solver
    if isinstance(solver, str):
        check_choice("solver", solver, SOLVERS, extra=" or a Solver instance")
        cls = SOLVERS[solver]
        allowed = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise InputError(
                f"`solver_options` for solver {solver!r} must use the options {', '.join(allowed)}. Got unknown "
                f"{unknown}."
            )
        return cls(**options)
    raise InputTypeError(f"`solver` must be a name or a Solver instance. Got {type(solver).__name__}.")
