"""Data: the adapter that turns what a user passes into indexable examples, and bundled loaders.

May import: ``influencekit.core``'s foundations (errors, checks, progress). Imported by everything above it."""

from .bundled import load_digits_split
from .examples import Examples

__all__ = ["Examples", "load_digits_split"]
