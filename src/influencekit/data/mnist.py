"""MNIST from IDX files in a folder the user gives (gzip-compressed or not); nothing is downloaded.

The IDX format (LeCun et al.): big-endian header ``>II`` = (magic, n) for labels (magic 0x801) and
``>IIII`` = (magic, n, rows, cols) for images (magic 0x803), then unsigned bytes.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["read_idx", "load_mnist"]

_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into a uint8 array: ``(n,)`` labels or ``(n, rows, cols)`` images."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 8:
        raise InputError(f"`{path}` is not an IDX file: it has only {len(data)} bytes.")
    magic, n = struct.unpack(">II", data[:8])
    if magic == 0x801:
        body, shape = data[8:], (n,)
    elif magic == 0x803:
        if len(data) < 16:
            raise InputError(f"`{path}` is not an IDX image file: its header is cut short.")
        _, _, rows, cols = struct.unpack(">IIII", data[:16])
        body, shape = data[16:], (n, rows, cols)
    else:
        raise InputError(f"`{path}` is not an MNIST IDX file: magic number {magic:#x}, expected 0x801 (labels) or 0x803 (images).")
    expected = int(np.prod(shape))
    if len(body) != expected:
        raise InputError(f"`{path}` is truncated or corrupt: its header promises {expected} values, the file holds {len(body)}.")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist(folder: str | Path, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """MNIST images ``(n, 28, 28)`` uint8 and labels ``(n,)`` uint8 of ``split`` ("train" or "test") from ``folder``.

    Raises :class:`InputError` naming the files expected when they are missing.
    """
    if split not in _SPLITS:
        raise InputError(f"`split` must be 'train' or 'test'. Got {split!r}.")
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"`folder` must be a directory holding MNIST IDX files. Got {str(folder)!r}, which is not a directory.")
    stems = _SPLITS[split]
    found = [_find(folder, s) for s in stems]
    missing = [s for s, f in zip(stems, found) if f is None]
    if missing:
        raise InputError(
            f"`folder` {str(folder)!r} lacks the MNIST {split} files {', '.join(m + '.gz' for m in missing)} "
            "(plain or gzip-compressed IDX, as distributed by LeCun et al.)."
        )
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InputError(f"the MNIST {split} files in {str(folder)!r} do not match: {images.shape} images, {labels.shape} labels.")
    return images, labels
