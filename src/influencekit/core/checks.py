"""Argument validation with one message template.

The template follows scikit-learn's: "`name` must be <allowed>. Got <value>." followed by the fix
when there is one. Library code never uses ``assert`` for user input.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .errors import InputError, InputTypeError

__all__ = [
    "check_choice",
    "check_number",
    "check_int",
    "parse_bytes",
    "check_indices",
]


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_choice(name: str, value: Any, choices: Iterable[Any], *, extra: str = "") -> Any:
    """Return ``value`` if it is one of ``choices``; else InputError "`name` must be one of 'a', 'b'<extra>. Got
    ..."."""
    options = tuple(choices)
    # equal and of the choice's type (a str Enum matches its string), but True is not the choice 1
    if not any(
        value is c or (isinstance(value, type(c)) and isinstance(value, bool) == isinstance(c, bool) and value == c)
        for c in options
    ):
        raise InputError(f"`{name}` must be one of {', '.join(repr(c) for c in options)}{extra}. Got {_fmt(value)}.")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as a float after checking that it is a finite real in the given interval."""
    interval = (
        ("[" if low_inclusive else "(")
        + ("-inf" if low is None else f"{low:g}")
        + ", "
        + ("inf" if high is None else f"{high:g}")
        + ("]" if high_inclusive else ")")
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(
            f"`{name}` must be a float in {interval}. Got {_fmt(value)} of type {type(value).__name__}."
        )
    value = float(value)
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        raise InputError(f"`{name}` must be a float in {interval}. Got {_fmt(value)}.")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int after checking that it is an integer in ``[low, high]``."""
    interval = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(
            f"`{name}` must be an int in {interval}. Got {_fmt(value)} of type {type(value).__name__}."
        )
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"`{name}` must be an int in {interval}. Got {value}.")
    return value


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(name: str, value: Any) -> int:
    """Parse a memory size given as an int number of bytes or a string such as ``"512MB"`` or ``"2GiB"``."""
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("kmgib")
        unit = text[len(number) :]
        if unit in _UNITS and number:
            try:
                amount = float(number)
            except ValueError:
                amount = -1.0
            if amount > 0 and math.isfinite(amount * _UNITS[unit]):
                return int(amount * _UNITS[unit])
        raise InputError(
            f"`{name}` must be a positive number of bytes or a string like '512MB' or '2GiB'. Got {_fmt(value)}."
        )
    return check_int(name, value, low=1)


def check_indices(name: str, idx: Any, n: int, *, what: str = "training", unique: bool = False) -> list[int]:
    """Validate indices into a data set of ``n`` points: ints in [0, n-1], at least one (and no repeats
    when ``unique``). Accepts an int, a sequence of ints, or an integer tensor/array; refuses floats,
    booleans and strings rather than truncating them."""
    if isinstance(idx, torch.Tensor):
        idx = idx.detach().cpu().numpy()
    if isinstance(idx, np.ndarray):
        if idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer):
            raise InputTypeError(f"`{name}` must hold integer indices. Got an array of dtype {idx.dtype}.")
        out = [int(i) for i in idx.reshape(-1)]
    elif isinstance(idx, numbers.Integral) and not isinstance(idx, bool):
        out = [int(idx)]
    elif isinstance(idx, (str, bytes)) or not isinstance(idx, Iterable):
        raise InputTypeError(f"`{name}` must be an int or a sequence of ints. Got {type(idx).__name__}.")
    else:
        out = list(idx)
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in out):
            raise InputTypeError(f"`{name}` must be an int or a sequence of ints. Got {out[:5]!r}.")
        out = [int(i) for i in out]
    if not out:
        raise InputError(f"`{name}` must name at least one {what} point. Got an empty selection.")
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise InputError(f"`{name}` must hold indices in [0, {n - 1}] (the {what} set has {n} points). Got {bad[:5]}.")
    if unique and len(set(out)) != len(out):
        dup = sorted(i for i, count in Counter(out).items() if count > 1)
        raise InputError(f"`{name}` must not repeat an index. Got {dup[:5]} more than once.")
    return out
