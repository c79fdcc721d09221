"""Influence computed once and queried many times: the gradient store, the influence index and its explorer.

``store`` (:class:`GradientStore`: projected training gradients on disk), ``influence_index``
(:class:`InfluenceIndex`: everything a query needs, in one folder), ``rows`` (an index's factored training rows),
``serve`` (the local explorer: a FastAPI application over an index, and its page ``explorer/index.html``).

May import: everything below the applications (``core``, ``data``, ``hf``, ``solvers``, ``engine``). Imported by the
applications and the CLI.
"""

from .influence_index import SOLVER_DIR, Display, InfluenceIndex
from .store import GradientStore

__all__ = ["InfluenceIndex", "Display", "SOLVER_DIR", "GradientStore"]
