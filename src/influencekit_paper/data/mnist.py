"""MNIST from IDX files in a folder the user gives (gzip-compressed or not); nothing is downloaded.

The IDX format (LeCun et al.): big-endian header ``>II`` = (magic, n) for labels (magic 0x801) and
``>IIII`` = (magic, n, rows, cols) for images (magic 0x803), then unsigned bytes.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from influencekit.core.errors import InputError

__all__ = ["read_idx", "load_mnist", "load_mnist_split", "MnistSplit"]

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
        raise InputError(
            f"`{path}` is not an MNIST IDX file: magic number {magic:#x}, expected 0x801 (labels) or 0x803 (images)."
        )
    expected = int(np.prod(shape))
    if len(body) != expected:
        raise InputError(
            f"`{path}` is truncated or corrupt: its header promises {expected} values, the file holds {len(body)}."
        )
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
        raise InputError(
            f"`folder` must be a directory holding MNIST IDX files. Got {str(folder)!r}, which is not a directory."
        )
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
        raise InputError(
            f"the MNIST {split} files in {str(folder)!r} do not match: {images.shape} images, {labels.shape} labels."
        )
    return images, labels


@dataclass(frozen=True)
class MnistSplit:
    """Training and test arrays drawn from MNIST, with a sentence saying where they came from.

    Attributes:
        train: ``(images (n, 28, 28) uint8, labels (n,) uint8)``.
        test: the same for the test side.
        source: e.g. "the 60,000-image training file and the 10,000-image test file", or, when only the
            test file is present, "the 10,000-image test file split at random into 8,000 train / 2,000 test".
    """

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    source: str


def load_mnist_split(
    folder: str | Path,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    classes: tuple[int, ...] | None = None,
    seed: int = 0,
) -> MnistSplit:
    """MNIST training and test sets from ``folder``, restricted to ``classes`` if given, subsampled with ``seed``.

    With both official files present, the training set comes from the training file and the test set from
    the test file. With only the 10,000-image test file (``t10k-*``) present, it is shuffled with ``seed``
    and split: the first ``n_train`` (default 80%) for training, the rest (at most ``n_test``) for testing;
    ``source`` says so, and the experiments print it.

    Raises :class:`InputError` naming the expected files when the test file is missing too, or when the
    folder holds fewer examples than asked for.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)

    def restrict(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if classes is None:
            return images, labels
        keep = np.isin(labels, np.asarray(classes, dtype=np.int64))
        return images[keep], labels[keep]

    def pick(images: np.ndarray, labels: np.ndarray, k: int | None, what: str) -> tuple[np.ndarray, np.ndarray]:
        if k is None:
            return images, labels
        if k > len(labels):
            raise InputError(
                f"`{what}` = {k} but the MNIST data in {str(folder)!r} has only {len(labels)} such images."
            )
        idx = np.sort(rng.choice(len(labels), k, replace=False))
        return images[idx], labels[idx]

    if n_train is not None and n_train < 1:
        raise InputError(f"`n_train` must be at least 1. Got {n_train}.")
    if n_test is not None and n_test < 1:
        raise InputError(f"`n_test` must be at least 1. Got {n_test}.")
    what = "" if classes is None else f" (digits {', '.join(map(str, classes))})"
    has_train = all(_find(folder, s) is not None for s in _SPLITS["train"]) if folder.is_dir() else False
    test_images, test_labels = restrict(*load_mnist(folder, "test"))
    if has_train:
        train = pick(*restrict(*load_mnist(folder, "train")), n_train, "n_train")
        test = pick(test_images, test_labels, n_test, "n_test")
        source = f"the MNIST training file ({len(train[1]):,} images{what}) and test file ({len(test[1]):,} images)"
        return MnistSplit(train, test, source)
    n = len(test_labels)
    k = int(round(0.8 * n)) if n_train is None else n_train
    if k >= n:
        raise InputError(
            f"only the MNIST test file is in {str(folder)!r} ({n} images{what}), so training and test images are split "
            f"from it; `n_train` = {k} leaves no test image. Ask for fewer, or add train-images-idx3-ubyte.gz and "
            "train-labels-idx1-ubyte.gz."
        )
    order = rng.permutation(n)
    tr, te = order[:k], order[k:] if n_test is None else order[k : k + n_test]
    source = (
        f"only the 10,000-image MNIST test file was found, so its {n:,} images{what} were shuffled (seed {seed}) and "
        f"split into {len(tr):,} training / {len(te):,} test images"
    )
    return MnistSplit((test_images[tr], test_labels[tr]), (test_images[te], test_labels[te]), source)
