"""Figures and reports (matplotlib, Agg backend: never opens a window)."""

from .figures import plot_influential_images

__all__ = ["plot_influential_images"]
