"""Figures and reports (matplotlib, Agg backend: never opens a window).

May import: ``influencekit.core``. Imported by the applications and the paper's package."""

from .figures import plot_influential_images

__all__ = ["plot_influential_images"]
