"""Checked numeric vectors and correlations that are NaN where undefined, shared by the validation modules.

The bottom of ``validation/``: it imports nothing from the modules above it (:mod:`.metrics`, :mod:`.loo`,
:mod:`.plot`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..core.errors import InputError, InputTypeError

__all__ = ["as_vector", "correlation_or_nan"]


def as_vector(name: str, x: Any) -> np.ndarray:
    """``x`` as a 1-D float64 array of finite real numbers; InputTypeError/InputError naming ``name`` otherwise."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise InputTypeError(f"`{name}` must be a 1-D array of real numbers. Got a complex tensor.")
        x = x.detach().cpu().to(torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputTypeError(f"`{name}` must be a 1-D array of real numbers. Got {type(x).__name__} ({exc}).") from None
    if arr.ndim != 1:
        raise InputError(
            f"`{name}` must be a 1-D array of real numbers. Got shape {arr.shape}; flatten it with .ravel()."
        )
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr))
        raise InputError(f"`{name}` must hold only finite values. Got NaN/inf at position(s) {bad[:5].tolist()}.")
    return arr


def correlation_or_nan(fn: Callable[[Any, Any], float], a: np.ndarray, b: np.ndarray) -> float:
    """``fn(a, b)``, or NaN where it is undefined (fewer than 2 points, a constant input)."""
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return fn(a, b)
