"""Result folders that survive interruption: atomic file writes, a JSON manifest of the configuration, fingerprints.

Every long computation that writes to disk (leave-one-out retrainings, the gradient store) keeps one
``manifest.json`` describing what produced the files. Opening a folder either creates the manifest or
checks that the stored one equals the requested configuration, and refuses — printing both — when it
does not, so results of different configurations are never mixed. Each result file is written to a
temporary name, flushed and renamed, so an interrupted run never leaves a half-written file that looks
complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from .errors import InputError

__all__ = [
    "MANIFEST",
    "atomic_write",
    "fingerprint",
    "open_folder",
    "write_checked",
    "verify_checked",
    "save_array",
    "load_array",
]

MANIFEST = "manifest.json"


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` by calling ``write(binary_file)`` on a temporary file in the same folder, then rename it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def fingerprint(tensors: Any) -> str:
    """sha256 of every tensor leaf's dtype, shape and bytes (non-tensor leaves by repr)."""
    h = hashlib.sha256()
    leaves, spec = tree_flatten(tensors)
    h.update(repr(spec).encode())
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()


def short(config: dict[str, Any]) -> str:
    """One-line JSON of a configuration with long lists cut to their first 10 entries."""

    def shorten(v: Any) -> Any:
        return v if not (isinstance(v, list) and len(v) > 12) else [*v[:10], f"... ({len(v)} in all)"]

    return json.dumps({k: shorten(v) for k, v in config.items()}, sort_keys=True)


def open_folder(
    folder: str | os.PathLike, config: dict[str, Any], *, arg: str, what: str, pattern: str
) -> dict[str, Any]:
    """Create ``folder`` with a manifest of ``config``, or check the manifest already there equals it.

    Args:
        folder: the folder (created if missing).
        config: JSON-serialisable configuration (values that are not are stored as ``str``).
        arg: the argument name to quote in errors (e.g. ``"cache_dir"``).
        what: what the folder holds, for errors (e.g. ``"leave-one-out results"``).
        pattern: glob of the result files; such files without a manifest are refused.

    Returns:
        ``config`` as stored (after the JSON round trip).
    """
    folder = Path(folder)
    config = json.loads(json.dumps(config, default=str))
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / MANIFEST
    if manifest.exists():
        try:
            stored = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(
                f"`{arg}` {str(folder)!r} has an unreadable {MANIFEST} ({exc}); delete it or use another folder."
            ) from None
        if stored != config:
            keys = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
            raise InputError(
                f"`{arg}` {str(folder)!r} holds {what} of a different configuration (differs in: {', '.join(keys)}); "
                f"refusing to mix them. Use another folder, or delete this one.\n"
                f"  stored:    {short(stored)}\n  requested: {short(config)}"
            )
    else:
        if any(folder.glob(pattern)):
            raise InputError(
                f"`{arg}` {str(folder)!r} holds {pattern} files but no {MANIFEST}, so their configuration is unknown; "
                "use another folder, or delete those files."
            )
        text = json.dumps(config, sort_keys=True, indent=1).encode()
        atomic_write(manifest, lambda f: f.write(text))
    return config


# ------------------------------------------------------------------------------------------ checked files
def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checked(path: Path, write: Callable[[Any], None]) -> None:
    """:func:`atomic_write` ``path``, then its sha256 beside it (``<name>.sha256``, also atomic). A file without its
    checksum — a run killed between the two writes, a file copied in by hand — fails :func:`verify_checked`."""
    checksum = _checksum_path(path)
    checksum.unlink(missing_ok=True)  # the old checksum must not vouch for the new bytes while they are written
    atomic_write(path, write)
    digest = _file_sha256(path)
    atomic_write(checksum, lambda f: f.write(digest.encode()))


def verify_checked(path: Path) -> str | None:
    """Why the file written by :func:`write_checked` at ``path`` cannot be trusted, or None when its checksum
    matches."""
    checksum = _checksum_path(path)
    if not checksum.is_file():
        return "its checksum file is missing (written by an interrupted run, or not by influencekit)"
    try:
        expected, found = checksum.read_text().strip(), _file_sha256(path)
    except OSError as exc:
        return f"it cannot be read ({exc})"
    if expected != found:
        return f"its contents changed after it was written (sha256 {found[:12]}..., recorded {expected[:12]}...)"
    return None


def save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy (no pickle) with :func:`write_checked`."""
    write_checked(path, lambda f: np.save(f, array, allow_pickle=False))


def load_array(
    path: Path, shape: tuple[int, ...], dtype: Any, *, mmap: bool = False
) -> tuple[np.ndarray | None, str | None]:
    """``(array, None)`` for a file written by :func:`save_array` that passes every check — checksum, shape, dtype,
    finiteness — else ``(None, what is wrong)``, the path and expected-vs-found spelled out. Never raises for a bad
    file."""
    problem = verify_checked(path)
    if problem is None:
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            problem = f"it is not a readable .npy file ({exc})"
        else:
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                problem = (
                    f"it holds shape {tuple(array.shape)} {array.dtype}, expected {tuple(shape)} {np.dtype(dtype)}"
                )
            elif not np.isfinite(array).all():
                problem = f"it holds {int((~np.isfinite(array)).sum())} NaN/inf values"
            else:
                return array, None
    return None, f"{path}: {problem}"
