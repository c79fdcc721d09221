"""MNIST IDX reading: a synthetic file round trip always, the real files where ../shared/data is present."""

import gzip
import hashlib
import struct

import numpy as np
import pytest

import influencekit as ik
from influencekit_paper.data.mnist import load_mnist, read_idx
from problems import SHARED_DATA

SHARED_MNIST = SHARED_DATA / "mnist"


def _write_idx(path, array, magic):
    header = struct.pack(">II", magic, len(array)) + (struct.pack(">II", *array.shape[1:]) if array.ndim == 3 else b"")
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_round_trip_of_synthetic_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x803)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 0x801)
    got_images, got_labels = load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(
        ik.InputError, match=r"lacks the MNIST test files t10k-images-idx3-ubyte\.gz, t10k-labels-idx1-ubyte\.gz"
    ):
        load_mnist(tmp_path, "test")
    with pytest.raises(ik.InputError, match=r"is not a directory"):
        load_mnist(tmp_path / "nowhere")


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">IIII", 0x803, 5, 28, 28) + b"\x00" * 100)
    with pytest.raises(ik.InputError, match=r"truncated or corrupt"):
        read_idx(path)
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">II", 0x1234, 5) + b"\x00" * 5)
    with pytest.raises(ik.InputError, match=r"magic number 0x1234"):
        read_idx(path)


@pytest.mark.skipif(
    not SHARED_MNIST.is_dir(), reason="../shared/data/mnist is absent (real MNIST files are read from there)"
)
def test_real_mnist_test_set_matches_its_canonical_checksums():
    images, labels = load_mnist(SHARED_MNIST, "test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    counts = np.bincount(labels, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # SOURCES.md
    raw = gzip.open(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz").read()
    assert hashlib.md5(raw).hexdigest() == "27ae3e4e09519cfbb04c329615203637"
