"""Data: the adapter that turns what a user passes into indexable examples, and bundled loaders."""

from .bundled import load_digits_split
from .examples import Examples

__all__ = ["Examples", "load_digits_split"]
