"""Exceptions and warnings raised by influencekit.

Every error message names the argument, what is allowed, what was received and the fix.
User mistakes are ``ValueError``/``TypeError`` subclasses so that ordinary ``except ValueError``
code keeps working; numerical trouble has its own classes so that it can be caught precisely.
"""

from __future__ import annotations

__all__ = [
    "InfluenceKitError",
    "InputError",
    "InputTypeError",
    "NotFittedError",
    "UnsupportedError",
    "NumericalError",
    "SolverDivergenceError",
    "DistributedError",
    "InfluenceKitWarning",
    "ConvergenceWarning",
    "CurvatureWarning",
    "StationarityWarning",
]


class InfluenceKitError(Exception):
    """Base class of every exception raised on purpose by influencekit."""


class InputError(InfluenceKitError, ValueError):
    """An argument or a piece of data has a wrong value, shape, dtype or device."""


class InputTypeError(InfluenceKitError, TypeError):
    """An argument has a type influencekit cannot use."""


class NotFittedError(InfluenceKitError, RuntimeError):
    """A method that needs ``fit()`` was called before it."""


class UnsupportedError(InfluenceKitError, ValueError):
    """The request is valid in general but not for this model, solver or size (the message says which to use)."""


class NumericalError(InfluenceKitError, ArithmeticError):
    """A non-finite loss, gradient or Hessian product, or a singular system."""


class SolverDivergenceError(NumericalError):
    """An iterative inverse-Hessian solver diverged (the message names the setting to change)."""


class DistributedError(InfluenceKitError, RuntimeError):
    """The ranks of a torch.distributed group disagree, or another rank failed (the message names it)."""


class InfluenceKitWarning(UserWarning):
    """Base class of influencekit's warnings."""


class ConvergenceWarning(InfluenceKitWarning):
    """An iterative solver stopped before reaching its tolerance."""


class CurvatureWarning(InfluenceKitWarning):
    """The Hessian (plus damping) is not positive definite: influence of a non-convex model needs damping."""


class StationarityWarning(InfluenceKitWarning):
    """The parameters are far from a stationary point of the training objective."""


class CorruptFileWarning(InfluenceKitWarning):
    """A stored file failed its checks (checksum, shape, dtype, finiteness) and is being recomputed; the message names it."""
