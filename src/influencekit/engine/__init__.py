"""The engine: the curvature operator and gradient source, the fitted state, and Influence on top of them.

``hessian`` (the damped curvature operator), ``last_layer``, ``gradients`` (per-example gradients of both sides),
``config`` (checked arguments, provenance, chunk sizes), ``persistence`` (solver cache, score folders),
``pairwise`` (the streamed training side of the score products), ``fitted`` (:class:`FittedEngine`, what ``fit()``
builds), ``perturbation``, ``groups``, ``training``, ``planner``, ``choice`` (a solver chosen by estimated cost),
and ``scoring`` (:class:`Influence`, the façade).

May import: ``influencekit.core``, ``influencekit.data``, ``influencekit.hf``, ``influencekit.report`` and
``influencekit.solvers``. Imported by ``index``, ``models``, ``validation``, ``applications`` and the CLI.
"""

from .fitted import FittedEngine, fit_engine
from .scoring import Influence

__all__ = ["FittedEngine", "fit_engine", "Influence"]
