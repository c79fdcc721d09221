"""Exceptions and warnings raised by influencekit.

Every error message names the argument, what is allowed, what was received and the fix.
User mistakes are ``ValueError``/``TypeError`` subclasses so that ordinary ``except ValueError``
code keeps working; numerical trouble has its own classes so that it can be caught precisely.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

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
    "setting_hint",
    "command_line_settings",
]


class InfluenceKitError(Exception):
    """Base class of every exception raised on purpose by influencekit."""


class InputError(InfluenceKitError, ValueError):
    """An argument or a piece of data has a wrong value, shape, dtype or device."""


class InputTypeError(InfluenceKitError, TypeError):
    """An argument has a type influencekit cannot use."""


class NotFittedError(InfluenceKitError, RuntimeError, AttributeError):
    """A method or fitted attribute that needs ``fit()`` was used before it (an AttributeError too, so that
    ``hasattr(inf, "solver_")`` is False before the fit)."""


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
    """A stored file failed its checks (checksum, shape, dtype, finiteness) and is being recomputed; the message names
    it."""


# Advice in messages names a setting the way the user can change it: in Python a keyword of Influence or an entry
# of `solver_options`; under the command line the flag of the running command, or, when the command has none,
# says that the setting is reached from Python only. The command line sets the flags it offers.
_CLI_FLAGS: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar(
    "influencekit_cli_flags", default=None
)


@contextlib.contextmanager
def command_line_settings(flags: frozenset[str] | set[str]) -> Iterator[None]:
    """Within the block, :func:`setting_hint` phrases advice for a command offering ``flags`` (e.g.
    ``{"--damping", "--solver-option"}``)."""
    token = _CLI_FLAGS.set(frozenset(flags))
    try:
        yield
    finally:
        _CLI_FLAGS.reset(token)


def setting_hint(name: str, value: object = None, *, scope: str = "solver") -> str:
    """How to set ``name`` (to ``value`` when given) where the user is.

    ``scope="solver"``: a solver option (Python ``solver_options={'depth': 2000}``, command line
    ``--solver-option depth=2000``); ``scope="influence"``: a keyword of :class:`~influencekit.Influence`
    (Python ``damping=0.1``, command line ``--damping 0.1``)."""
    flags = _CLI_FLAGS.get()
    shown = "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
    if scope == "solver":
        python = f"solver_options={{'{name}': {shown}}}" if shown else f"solver_options['{name}']"
        flag, cli = "--solver-option", f"--solver-option {name}={shown or '...'}"
    else:
        python = f"{name}={shown}" if shown else name
        flag = "--" + name.replace("_", "-")
        cli = f"{flag} {shown}" if shown else flag
    if flags is None:
        return f"`{python}`"
    if flag in flags:
        return f"`{cli}`"
    return f"`{python}` (from Python; this command has no {flag})"
