"""The solvers by name: each solver module registers its classes here as it is imported (``@register``).

:func:`~influencekit.solvers.make_solver` and CG's ``preconditioner=`` read names only from here, so no other
module spells a solver's name. Imported by every solver module; imports only :mod:`~influencekit.solvers.base`.
"""

from __future__ import annotations

from typing import TypeVar

from .base import Solver

__all__ = ["SOLVERS", "register", "preconditioner_names"]

SOLVERS: dict[str, type[Solver]] = {}

S = TypeVar("S", bound=type[Solver])


def register(cls: S) -> S:
    """Make ``cls`` available under ``cls.name`` (a class decorator)."""
    SOLVERS[cls.name] = cls
    return cls


def preconditioner_names() -> list[str]:
    """The registered solvers that apply a fixed approximate inverse (``capabilities.approximate_inverse``): what
    CG takes as a preconditioner by name."""
    return [name for name, cls in SOLVERS.items() if cls.capabilities.approximate_inverse]
