"""One view over every form of data a user may pass: tensors, (X, y) tuples, dicts, Datasets, DataLoaders.

The engine needs three things from a training or test set: its length, a batch of given indices
(for LiSSA's random mini-batches and for ``params_influence(idx)``), and its batches in order (for
streaming gradients). :class:`Examples` provides exactly these, moves batches to the model's device,
and refuses wrong dtypes and non-finite inputs with a message that names the example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from ..core.errors import InputError, InputTypeError, UnsupportedError

__all__ = [
    "Examples",
    "Batch",
    "DataSource",
    "pad_collate",
    "length_groups",
    "grouped_stream",
    "columns",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100  # the label of positions that carry no loss (the transformers convention)

# A batch: a tensor, or a tuple/list/dict (nested) of tensors whose first dimension is the batch
Batch = Union[torch.Tensor, tuple["Batch", ...], list["Batch"], Mapping[str, "Batch"]]  # noqa: UP007 (forward references)
# What a user may pass as training or test data: tensors, (X, y) tuples, lists of examples (e.g. tokenizer
# outputs), dicts of columns, Datasets, non-shuffling DataLoaders, or Examples (see Examples)
DataSource = Union[torch.Tensor, np.ndarray, tuple, list, Mapping[str, Any], Dataset, DataLoader, "Examples"]  # noqa: UP007


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise InputTypeError(
                f"`{name}` must be a numeric array. Got a numpy array of dtype object; convert it with astype(float)."
            )
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (torch.Tensor, np.ndarray)):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputTypeError(
                f"`{name}` must be a tensor or an array. Got a {type(value).__name__} that torch cannot convert "
                f"({exc})."
            ) from None
    raise InputTypeError(
        f"`{name}` must be a tensor, a numpy array, or a tuple/dict of them. Got {type(value).__name__}."
    )


def _as_tree(name: str, value: Any) -> Any:
    """Tensors (or arrays) as they are; dicts and tuples/lists of them, nested to any depth, with each leaf converted
    (a list of numbers is one tensor, a list of tensors is a tuple)."""
    if isinstance(value, Mapping):
        return {k: _as_tree(f"{name}[{k!r}]", v) for k, v in value.items()}
    if (
        isinstance(value, (list, tuple))
        and value
        and isinstance(value[0], (torch.Tensor, np.ndarray, Mapping, list, tuple))
        and not _numeric(value)
    ):
        return tuple(_as_tree(f"{name}[{i}]", v) for i, v in enumerate(value))
    return _as_tensor(name, value)


def _numeric(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray, int, float, bool)):
        return True
    return isinstance(value, (list, tuple)) and (not value or _numeric(value[0]))


def pad_collate(items: Sequence[Mapping[str, Any]], *, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack tokenised examples (dicts of 1-D tensors or lists, 0-d labels) into one batch, padding 1-D fields to
    the longest: ``input_ids`` with ``pad_token_id``, ``labels`` with ``-100``, every other field (attention_mask,
    token_type_ids) with 0; 0-d fields are stacked; a nested dict of fields is collated the same way, recursively.
    Fields that are not numeric (e.g. the raw ``text``) are left out."""
    if not items or not all(isinstance(it, Mapping) for it in items):
        raise InputTypeError("pad_collate needs a non-empty list of dicts of tensors (tokenised examples).")
    fields = set(items[0])
    odd = next((j for j, it in enumerate(items) if set(it) != fields), None)
    if odd is not None:  # a field only some examples have would be dropped, or fail, depending on the batch's first
        raise InputError(
            f"tokenised examples must all have the same fields. Got {sorted(fields)} in the batch's first example and "
            f"{sorted(items[odd])} in its example {odd}; give every example the same keys (e.g. `labels` on all or "
            "none)."
        )
    out: dict[str, Any] = {}
    for key, first in items[0].items():
        if isinstance(first, Mapping):  # a nested dict of fields: padded the same way, one level down
            out[key] = pad_collate([it[key] for it in items], pad_token_id=pad_token_id)
            continue
        if not _numeric(first):
            continue
        values = [torch.as_tensor(it[key]) for it in items]
        if values[0].dim() == 0:
            out[key] = torch.stack(values)
            continue
        pad = pad_token_id if key == "input_ids" else (IGNORE_INDEX if key == "labels" else 0)
        out[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pad)
    return out


class _Items(Dataset):
    """A list of examples, or any object with ``__len__`` and ``__getitem__`` (a Hugging Face ``datasets.Dataset``)."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[int(i)]


class Examples:
    """An indexable sequence of examples built from tensors, tuples, dicts, a Dataset or a DataLoader.

    Args:
        source: a tensor ``(n, ...)``; a tuple/list of tensors or arrays with a common first dimension,
            e.g. ``(X, y)``; a dict of such; a map-style ``torch.utils.data.Dataset``; or a ``DataLoader``
            over one that does not shuffle (its ``collate_fn`` is used, its batch size is not); a list of examples
            that are dicts (tokenised text: padded per batch by :func:`pad_collate`); or a Hugging Face
            ``datasets.Dataset`` (any object with ``column_names``, ``__len__`` and ``__getitem__``).
        name: how error messages call this data ("train", "test").
    """

    def __init__(self, source: Any, *, name: str = "data") -> None:
        self.name = name
        self._lengths: dict[str, np.ndarray | None] = {}
        self._tensors: Any = None
        self._dataset: Dataset | None = None
        self._collate = default_collate
        if isinstance(source, Examples):
            self._tensors, self._dataset, self._collate = source._tensors, source._dataset, source._collate
            self._n = len(source)
            return
        if isinstance(source, DataLoader):
            if isinstance(source.dataset, IterableDataset):
                raise UnsupportedError(
                    f"`{name}` is a DataLoader over an IterableDataset, which cannot be indexed. "
                    "Pass a map-style Dataset (one with __len__ and __getitem__) that loads examples lazily."
                )
            if not isinstance(source.sampler, SequentialSampler):
                raise InputError(
                    f"`{name}` must be a DataLoader that keeps the dataset order (shuffle=False, no sampler). "
                    f"Got a DataLoader with a {type(source.sampler).__name__}; influence scores are indexed by "
                    "position in the dataset, so pass DataLoader(dataset, shuffle=False) or the dataset itself."
                )
            self._dataset = source.dataset
            self._collate = source.collate_fn or default_collate
        elif isinstance(source, IterableDataset):
            raise UnsupportedError(
                f"`{name}` is an IterableDataset, which cannot be indexed. Pass a map-style Dataset "
                "(one with __len__ and __getitem__) that loads examples lazily."
            )
        elif isinstance(source, Dataset):
            self._dataset = source
        elif hasattr(source, "column_names") and hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            self._dataset, self._collate = _Items(source), pad_collate  # a datasets.Dataset (Arrow, memory-mapped)
        elif isinstance(source, Sequence) and not isinstance(source, str) and source and isinstance(source[0], Mapping):
            self._dataset, self._collate = _Items(source), pad_collate  # tokenised examples, one dict each
        elif isinstance(source, (torch.Tensor, np.ndarray)):
            self._tensors = _as_tensor(name, source)
        elif isinstance(
            source, Mapping
        ):  # a dict of tensors, possibly nested ({"inputs": {"input_ids": ...}, "labels": ...})
            self._tensors = _as_tree(name, source)
        elif isinstance(source, Sequence) and not isinstance(source, str):
            self._tensors = tuple(_as_tensor(f"{name}[{i}]", v) for i, v in enumerate(source))
        else:
            raise InputTypeError(
                f"`{name}` must be a tensor, an (X, y) tuple, a dict of tensors, a map-style torch Dataset "
                f"or a DataLoader. Got {type(source).__name__}."
            )

        if self._dataset is not None:
            if not hasattr(self._dataset, "__len__"):
                raise InputTypeError(
                    f"`{name}` must be a Dataset with __len__. Got {type(self._dataset).__name__} without it."
                )
            self._n = len(self._dataset)  # type: ignore[arg-type]
        else:
            leaves, _ = tree_flatten(self._tensors)
            if not leaves:
                raise InputError(f"`{name}` must hold at least one tensor. Got an empty {type(source).__name__}.")
            lengths = []
            for leaf in leaves:
                if leaf.dim() == 0:
                    raise InputError(f"`{name}` must hold tensors with a first (example) dimension. Got a 0-d tensor.")
                lengths.append(leaf.shape[0])
            if len(set(lengths)) != 1:
                raise InputError(
                    f"`{name}` must hold tensors with the same number of examples (first dimension). "
                    f"Got lengths {lengths}; check that X and y come from the same split."
                )
            self._n = lengths[0]
        if self._n == 0:
            raise InputError(f"`{name}` must hold at least one example. Got an empty data set.")

    def __len__(self) -> int:
        return self._n

    def batch(self, indices: torch.Tensor | Sequence[int] | slice) -> Batch:
        """The examples at ``indices`` as one batch (a tensor or a tuple/dict of tensors)."""
        if isinstance(indices, slice):
            if self._tensors is not None:
                return tree_map(lambda t: t[indices], self._tensors)
            indices = range(*indices.indices(self._n))
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        indices = list(indices)
        for i in indices:
            if not -self._n <= i < self._n:
                raise InputError(f"index into `{self.name}` must be in [0, {self._n - 1}]. Got {i}.")
        if self._tensors is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            return tree_map(lambda t: t[idx.to(t.device)], self._tensors)
        items = [self._dataset[i] for i in indices]  # type: ignore[index]
        batch = self._collate(items)
        return tree_map(lambda v: _as_tensor(self.name, v) if isinstance(v, np.ndarray) else v, batch)

    def lengths(self, field: str = "input_ids") -> np.ndarray | None:
        """Each example's length: the size of its 1-D ``field`` (token ids), where examples are dicts padded per
        batch (a list of tokenised examples, a ``datasets.Dataset``, a :class:`~influencekit.hf.PrefixCache`); None
        for data stored as tensors (padded to one length already) or whose examples lack the field. Read once per
        field (every pass over the data asks again: a ``datasets.Dataset`` would read its column each time)."""
        if field not in self._lengths:
            self._lengths[field] = self._read_lengths(field)
        return self._lengths[field]

    def _read_lengths(self, field: str) -> np.ndarray | None:
        if not isinstance(self._dataset, _Items):
            return None
        items = self._dataset.items
        if hasattr(items, "column_names"):  # a datasets.Dataset: one column read
            if field not in items.column_names:
                return None
            return np.fromiter((len(v) for v in items[field]), dtype=np.int64, count=self._n)
        own = getattr(items, "example_lengths", None)
        if callable(own):
            return own(field)
        if not all(isinstance(item, Mapping) and field in item for item in items):
            return None
        return np.fromiter((len(item[field]) for item in items), dtype=np.int64, count=self._n)

    def batches(self, batch_size: int, *, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Batch]]:
        """Yield ``(offset, batch)`` over examples ``start:stop`` in order, ``batch_size`` at a time."""
        stop = self._n if stop is None else stop
        for lo in range(start, stop, batch_size):
            yield lo, self.batch(slice(lo, min(lo + batch_size, stop)))


def batch_size_of(batch: Batch) -> int:
    """The number of examples in a batch (the first dimension of its first tensor)."""
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise InputError("a batch must contain at least one tensor with a batch dimension. Got none.")


BatchCheck = Callable[[Batch, str, int], None]  # (batch, data name, offset) -> None, raises on bad data


def prepare_batch(
    batch: Batch, *, name: str, offset: int, dtype: torch.dtype, device: torch.device, check: BatchCheck | None = None
) -> Batch:
    """Move a batch to ``device``, and refuse floating tensors of another dtype or with NaN/inf.

    ``offset`` is the position of the batch's first example in its data set, so that errors name the
    example at fault. ``check`` is the task's own validation (e.g. label ranges), run on the moved batch.
    """

    def visit(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        if leaf.is_floating_point():
            if leaf.dtype != dtype:
                raise InputError(
                    f"`{name}` must hold floating tensors of the model's dtype {dtype}. Got {leaf.dtype}. "
                    f"Convert the data with .to({dtype}) or the model with .to({leaf.dtype})."
                )
            # a finite sum proves every entry finite, ~15x faster than isfinite().all() on CPU; the exact
            # per-entry check runs only when the sum is not finite (NaN/inf, or a finite overflow)
            finite = (
                None
                if bool(torch.isfinite(leaf.sum()))
                else torch.isfinite(leaf.reshape(leaf.shape[0], -1) if leaf.dim() > 0 else leaf.reshape(1, 1))
            )
            if finite is not None and not bool(finite.all()):
                bad_rows = (~finite).any(dim=1).nonzero().flatten().tolist()
                raise InputError(
                    f"`{name}` must hold only finite values. Got NaN/inf in example(s) "
                    f"{[offset + r for r in bad_rows[:5]]}{' ...' if len(bad_rows) > 5 else ''}; "
                    "remove or impute them before computing influence."
                )
        return leaf.to(device, non_blocking=True)

    batch = tree_map(visit, batch)
    if check is not None:
        check(batch, name, offset)
    return batch


def stream(
    data: Examples,
    batch_size: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    start: int = 0,
    stop: int | None = None,
    check: BatchCheck | None = None,
) -> Iterator[tuple[int, Batch]]:
    """Yield ``(offset, batch)`` with each batch checked and moved by :func:`prepare_batch`."""
    for lo, batch in data.batches(batch_size, start=start, stop=stop):
        yield lo, prepare_batch(batch, name=data.name, offset=lo, dtype=dtype, device=device, check=check)


def length_groups(lengths: np.ndarray, batch_size: int, *, start: int = 0, stop: int | None = None) -> list[list[int]]:
    """The examples ``start .. stop-1`` as batches of similar lengths (a batch is padded to its longest example):
    sorted by length, longest first (the largest batch comes first, so a memory limit shows at once), ties in
    index order; each batch is a list of global indices in increasing order."""
    stop = len(lengths) if stop is None else stop
    order = start + np.argsort(-lengths[start:stop], kind="stable")
    return [sorted(order[lo : lo + batch_size].tolist()) for lo in range(0, len(order), batch_size)]


def grouped_stream(
    data: Examples,
    batch_size: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    start: int = 0,
    stop: int | None = None,
    check: BatchCheck | None = None,
) -> Iterator[tuple[Sequence[int], Batch]]:
    """``(indices, batch)`` over ``data[start:stop]``, each example once, for passes whose order does not matter:
    where the examples have unequal lengths (token sequences padded per batch: :meth:`Examples.lengths`), in batches
    of similar lengths (:func:`length_groups`: less padding to run through the model; errors name a batch's first
    index), else in order (``indices`` a range)."""
    stop = len(data) if stop is None else stop
    lengths = data.lengths()
    mine = None if lengths is None else lengths[start:stop]
    if mine is None or len(mine) == 0 or mine.min() == mine.max():
        for lo, batch in stream(data, batch_size, dtype=dtype, device=device, start=start, stop=stop, check=check):
            yield range(lo, lo + batch_size_of(batch)), batch
        return
    for indices in length_groups(lengths, batch_size, start=start, stop=stop):
        yield indices, take(data, indices, dtype=dtype, device=device, check=check)


def columns(indices: Sequence[int], start: int = 0) -> slice | torch.Tensor:
    """Where the examples ``indices`` of a :func:`grouped_stream` batch go in a block whose first column is example
    ``start``: a slice for a range (a view), else an index tensor."""
    if isinstance(indices, range):
        return slice(indices.start - start, indices.stop - start)
    return torch.as_tensor(list(indices), dtype=torch.long) - start


def take(
    data: Examples,
    indices: torch.Tensor | Sequence[int],
    *,
    dtype: torch.dtype,
    device: torch.device,
    check: BatchCheck | None = None,
) -> Batch:
    """The examples at ``indices``, checked and moved by :func:`prepare_batch` (errors name the first index)."""
    indices = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    batch = data.batch(indices)
    return prepare_batch(
        batch, name=data.name, offset=indices[0] if indices else 0, dtype=dtype, device=device, check=check
    )
