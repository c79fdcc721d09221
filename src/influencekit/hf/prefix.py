"""The frozen prefix of a model, computed once: influence over the last blocks re-runs only those blocks.

When a task selects only the last parameters of a network (``params=["encoder.layer.5.*", "head"]``), every
module upstream of them (embeddings, the first blocks) computes the same outputs at every gradient, HVP and
factor pass. :class:`PrefixCache` runs the model once over a data set, keeps those outputs per example, and
returns the examples with them attached; the task's forward then replaces each cached module's computation by
its stored output, so only the selected part (and the glue code between modules, e.g. mask building) runs.

Which modules are cached is found on the first examples, by autograd itself: a module is *frozen* when it is
called once per forward, holds no selected parameter and none of its outputs requires grad with the selected
parameters live; the cached modules are the outermost frozen ones. Of their outputs only those that reach a
module that still runs are stored (BERT with its last block selected: the output of block 4, not those of the
embeddings and blocks 0–3, which only feed modules that are skipped too); the others are replayed as zeros. The
plan is then checked on those first examples — the loss and its gradient with the cache equal those without it
to round-off — and every output is stored if that fails (an output used by code outside modules), or the cache
is refused if it still fails. A model whose outputs change between calls (dropout: ``model.train()``) is refused.

Per example, an output with the sequence dimension keeps the example's own positions, so examples are padded
per batch as usual (:func:`~influencekit.data.examples.pad_collate`) and the cache serves any batching.

With ``folder=`` the outputs go to disk instead of memory (for a large data set): one checked ``.npy`` file per
stored output and batch of ``batch_size`` examples (the examples' rows concatenated) beside the batch's lengths,
and a manifest of the plan, the frozen weights' fingerprint, the data's fingerprint and the batch size. The
files are memory-mapped when read; an interrupted build resumes at the first missing batch, a damaged file is
named and recomputed, and a folder of another model, data or plan is refused.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..core.checks import check_int
from ..core.errors import CorruptFileWarning, InputError, InputTypeError, UnsupportedError
from ..core.folders import fingerprint, load_array, open_folder, save_array, verify_checked
from ..core.progress import progress_bar
from ..core.task import Task
from ..data.examples import DataSource, Examples, grouped_stream, take

__all__ = ["PrefixCache", "PrefixPlan", "PREFIX_KEY", "is_prefix_key"]

PREFIX_KEY = "ik.prefix"  # batch keys "ik.prefix/<module>/<leaf>" hold the cached outputs
PLAN_EXAMPLES = 4  # examples of the first batch that find and check the plan


def is_prefix_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(PREFIX_KEY + "/")


@dataclass(frozen=True)
class _Leaf:
    key: str | None  # the batch key of a stored tensor, or None: a constant (``value``) or a zero placeholder
    value: Any = None  # a non-tensor leaf's value
    tensor: bool = True
    sequence: bool = False  # the tensor's dim 1 is the sequence
    rest: tuple[int, ...] = ()  # the tensor's dims after batch (and sequence)
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class _Module:
    name: str
    spec: Any  # the output's pytree structure
    leaves: tuple[_Leaf, ...]


@dataclass(frozen=True)
class PrefixPlan:
    """Which modules of a model are replayed from the cache, and which of their output leaves are stored."""

    modules: tuple[_Module, ...]

    @property
    def stored(self) -> list[str]:
        return [leaf.key for m in self.modules for leaf in m.leaves if leaf.key is not None]

    def describe(self) -> dict[str, Any]:
        return {"modules": [m.name for m in self.modules], "stored": self.stored}

    @contextmanager
    def replay(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> Iterator[None]:
        """Within the block, each cached module of ``model`` returns its stored output for ``batch``."""
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise InputError("a batch with cached prefix outputs needs `input_ids` of shape (B, T) next to them.")
        B, T = ids.shape
        modules = dict(model.named_modules())
        patched = []
        try:
            for m in self.modules:
                output = tree_unflatten([_replayed(leaf, batch, B, T, ids.device) for leaf in m.leaves], m.spec)
                module = modules[m.name]
                if "forward" in vars(module):  # an enclosing replay (of the same batch) is active
                    continue
                module.forward = _returning(output)
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward


def _returning(output: Any) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return output

    return forward


def _replayed(leaf: _Leaf, batch: Mapping[str, Any], B: int, T: int, device: torch.device) -> Any:
    if not leaf.tensor:
        return leaf.value
    if leaf.key is not None:
        if leaf.key not in batch:
            raise InputError(
                f"the batch lacks the cached prefix output {leaf.key!r}: build every data set's cache from the same "
                "task."
            )
        return batch[leaf.key]
    return torch.zeros((B, T, *leaf.rest) if leaf.sequence else (B, *leaf.rest), dtype=leaf.dtype, device=device)


def _leaves(value: Any) -> list[Any]:
    return tree_flatten(value)[0]


class _Recorder:
    """Forward hooks on every module: call counts and outputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: dict[str, int] = {}
        self.outputs: dict[str, Any] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name:
                self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._post(name), with_kwargs=True))

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            self.outputs[name] = output

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _inside(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(ancestor + ".")


def _frozen_outputs(output: Any, B: int) -> bool:
    """The output can be cached: tensors (and constants), none requiring grad, each with the batch first."""
    leaves = _leaves(output)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if not tensors or any(t.requires_grad or t.dim() == 0 or t.shape[0] != B for t in tensors):
        return False
    return all(isinstance(x, torch.Tensor) or x is None or isinstance(x, (bool, int, float, str)) for x in leaves)


def _shorter(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` without its last position (to see which outputs follow the sequence length)."""
    B, T = batch["input_ids"].shape
    return {
        k: v[:, : T - 1] if isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (B, T) else v
        for k, v in batch.items()
    }


def _sequence_dims(
    names: Sequence[str], short: Mapping[str, Any], long: Mapping[str, Any]
) -> dict[str, list[bool]] | None:
    """Per module whose output shapes follow the batch's length: which leaves have the sequence at dim 1 (T → T − 1)."""
    found = {}
    for name in names:
        a, b = _leaves(short[name]), _leaves(long.get(name))
        if len(a) != len(b):
            continue
        flags = []
        for x, y in zip(a, b):
            if not isinstance(x, torch.Tensor):
                flags.append(False)
            elif tuple(x.shape) == tuple(y.shape):
                flags.append(False)
            elif x.dim() >= 2 and tuple(y.shape) == (x.shape[0], x.shape[1] - 1, *x.shape[2:]):
                flags.append(True)
            else:
                break
        else:
            found[name] = flags
    return found


def find_plan(task: Task, params: dict[str, torch.Tensor], batch: Mapping[str, Any]) -> PrefixPlan:
    """The cached modules and stored outputs for ``task`` with ``params`` selected, found and checked on ``batch``."""
    model = task.model
    B, T = batch["input_ids"].shape
    if T < 2:
        raise InputError(
            "the prefix cache needs the first examples to have at least 2 tokens (to find the sequence dimension of "
            "the cached outputs)."
        )
    live = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    recorder = _Recorder(model)
    try:
        with torch.enable_grad():  # the recorded forward is also the reference every replay must reproduce
            loss = task.loss(live, batch)
            reference = loss.detach(), torch.autograd.grad(loss.sum(), list(live.values()), allow_unused=True)
    finally:
        recorder.close()
    owners = {name for name in dict(model.named_modules()) if name and any(_inside(p, name) for p in params)}
    frozen = [
        name
        for name, out in recorder.outputs.items()
        if recorder.calls.get(name) == 1 and name not in owners and _frozen_outputs(out, B)
    ]
    outermost = [n for n in frozen if not any(_inside(n, other) and n != other for other in frozen)]
    shorter = _Recorder(model)
    try:
        with torch.no_grad():
            task.loss(live, _shorter(batch))
    finally:
        shorter.close()
    sequence = _sequence_dims(outermost, recorder.outputs, shorter.outputs)
    outermost = [n for n in outermost if n in sequence]
    if not outermost:
        raise UnsupportedError(
            "no module upstream of the selected parameters can be cached: every module either holds a selected "
            "parameter, runs more than once per forward, or returns outputs that depend on the selected parameters. "
            "Cache a prefix only when `params=` selects the last part of the model (e.g. its last blocks and head)."
        )
    stored = {name: [isinstance(v, torch.Tensor) for v in _leaves(recorder.outputs[name])] for name in outermost}
    if not _replays_exactly(
        task, live, batch, _plan_of(outermost, recorder.outputs, sequence, stored), recorder.outputs, reference
    ):
        raise UnsupportedError(
            "the model's outputs differ when its frozen modules are replayed from their own recorded outputs: the "
            "model is "
            "not deterministic (put it in eval mode: model.eval()) or its modules keep state between calls. Run "
            "without the prefix cache."
        )
    for name in outermost:  # keep an output only if the loss or its gradient changes without it
        trial = {**stored, name: [False] * len(stored[name])}
        if _replays_exactly(
            task, live, batch, _plan_of(outermost, recorder.outputs, sequence, trial), recorder.outputs, reference
        ):
            stored = trial
    return _plan_of(outermost, recorder.outputs, sequence, stored)


def _plan_of(
    names: Sequence[str],
    outputs: Mapping[str, Any],
    sequence_dims: Mapping[str, list[bool]],
    stored: Mapping[str, list[bool]],
) -> PrefixPlan:
    modules = []
    for name in names:
        values, spec = tree_flatten(outputs[name])
        leaves = []
        for j, v in enumerate(values):
            if not isinstance(v, torch.Tensor):
                leaves.append(_Leaf(None, value=v, tensor=False))
                continue
            sequence = sequence_dims[name][j]
            key = f"{PREFIX_KEY}/{name}/{j}" if stored[name][j] else None
            leaves.append(
                _Leaf(key, sequence=sequence, rest=tuple(v.shape[2:] if sequence else v.shape[1:]), dtype=v.dtype)
            )
        modules.append(_Module(name, spec, tuple(leaves)))
    return PrefixPlan(tuple(modules))


def _stored_values(plan: PrefixPlan, outputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    values = {}
    for m in plan.modules:
        for leaf, v in zip(m.leaves, _leaves(outputs[m.name])):
            if leaf.key is not None:
                values[leaf.key] = v.detach()
    return values


def _replays_exactly(
    task: Task,
    live: dict[str, torch.Tensor],
    batch: Mapping[str, Any],
    plan: PrefixPlan,
    outputs: Mapping[str, Any],
    reference: tuple[torch.Tensor, tuple[torch.Tensor | None, ...]],
) -> bool:
    """The loss and its gradient on ``batch`` with ``plan`` replayed equal ``reference`` (the full model's) to
    round-off."""
    full, g_full = reference
    with torch.enable_grad():
        replayed = {**batch, **_stored_values(plan, outputs)}
        with plan.replay(task.model, replayed):
            cached = task.loss(live, replayed)
        g_cached = torch.autograd.grad(cached.sum(), list(live.values()), allow_unused=True)
    tol = 1e3 * torch.finfo(full.dtype).eps if full.is_floating_point() else 0.0

    def close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        if a is None or b is None:
            return a is None and b is None
        scale = max(float(b.abs().max()), 1e-30)
        return math.isfinite(scale) and float((a - b).abs().max()) <= tol * scale

    return close(cached.detach(), full) and all(close(a, b) for a, b in zip(g_cached, g_full))


class PrefixCache(Sequence):
    """Examples with the outputs of a model's frozen prefix attached, computed in one pass (see the module docstring).

    Use it in place of the data set, for the training and the test side alike::

        task = ik.hf.SequenceClassificationTask(model, params=["encoder.encoder.layer.5.*", "head"])
        train = ik.hf.cache_prefix(task, train)
        inf = ik.Influence(task, train, solver="ekfac").fit()
        inf.scores(ik.hf.cache_prefix(task, test))

    The cache holds the frozen weights' outputs: it is stale once those weights change (build it again). Its
    memory is about ``n × mean length × hidden × bytes per value`` per stored output (``stored_bytes``).

    Args:
        task: a :class:`~influencekit.hf.HFTask` (its ``params=`` selection decides the prefix).
        data: tokenised examples: a list of dicts of 1-D tensors, a ``datasets.Dataset``, or a dict of ``(n, T)``
        tensors.
        batch_size: examples per forward pass.
        folder: keep the outputs on disk there (module docstring) instead of in memory.
        progress: show a progress bar.
    """

    def __init__(
        self,
        task: Task,
        data: DataSource,
        *,
        batch_size: int = 16,
        folder: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> None:
        if not callable(getattr(task, "use_prefix_plan", None)):  # an ik.hf task (hf builds on this module)
            raise InputTypeError(
                f"`task` must be an ik.hf task (SequenceClassificationTask, ...). Got {type(task).__name__}."
            )
        if isinstance(data, PrefixCache):
            raise InputError("`data` is already a PrefixCache; pass the examples it was built from.")
        batch_size = check_int("batch_size", batch_size, low=1)
        if task.model.training:
            raise InputError(
                "the prefix cache keeps one forward of the frozen modules per example: put the model in eval mode "
                "(model.eval()) first, so that dropout does not make the stored outputs random."
            )
        self.examples = examples = Examples(data, name="data")
        params = {k: v.detach() for k, v in task.params().items()}
        p0 = next(iter(params.values()))
        self._items = self._raw_items(data, examples)
        first = take(
            examples, range(min(PLAN_EXAMPLES, len(examples))), dtype=p0.dtype, device=p0.device, check=task.check_batch
        )
        self.plan = find_plan(task, params, first)
        task.use_prefix_plan(self.plan)
        self.values: list[dict[str, torch.Tensor]] = []
        self.batch_size = batch_size
        self.disk = None if folder is None else _DiskValues(Path(folder), task, params, examples, self.plan, batch_size)
        hooks = []
        captured: dict[str, Any] = {}
        modules = dict(task.model.named_modules())
        for m in self.plan.modules:
            hooks.append(
                modules[m.name].register_forward_hook(lambda mod, a, out, name=m.name: captured.__setitem__(name, out))
            )
        bar = progress_bar(total=len(examples), desc="prefix cache", enabled=progress)
        try:
            with torch.no_grad():
                if self.disk is None:  # in memory: batches of similar lengths (less padding), stored by index
                    self.values = [{} for _ in range(len(examples))]
                    for indices, batch in grouped_stream(
                        examples, batch_size, dtype=p0.dtype, device=p0.device, check=task.check_batch
                    ):
                        for i, row in zip(indices, self._rows(task, params, batch, captured, indices)):
                            self.values[i] = row
                        bar.update(len(indices))
                else:  # on disk: in order, a file per batch (an interrupted build resumes at the first missing one)
                    for lo in range(0, len(examples), batch_size):
                        indices = range(lo, min(lo + batch_size, len(examples)))
                        if not self.disk.done(lo):
                            batch = take(examples, indices, dtype=p0.dtype, device=p0.device, check=task.check_batch)
                            self.disk.write(lo, self._rows(task, params, batch, captured, indices))
                        bar.update(len(indices))
        finally:
            bar.close()
            for h in hooks:
                h.remove()

    def _rows(
        self,
        task: Task,
        params: dict[str, torch.Tensor],
        batch: Any,
        captured: dict[str, Any],
        indices: Sequence[int],
    ) -> list[dict[str, torch.Tensor]]:
        """The stored outputs of one batch's examples (``indices``), each cut to its own length."""
        captured.clear()
        task.outputs(params, batch)
        return [self._per_example(captured, j, len(self._items[i]["input_ids"])) for j, i in enumerate(indices)]

    @staticmethod
    def _raw_items(data: DataSource, examples: Examples) -> Any:
        if isinstance(data, Mapping):
            if "input_ids" not in data:
                raise InputError(
                    f"the prefix cache needs tokenised examples with `input_ids`. Got keys {sorted(data)}."
                )
            n = len(examples)
            return [{k: v[i] for k, v in data.items()} for i in range(n)]
        first = data[0] if len(data) else None
        if not isinstance(first, Mapping) or "input_ids" not in first:
            raise InputTypeError(
                "the prefix cache needs tokenised examples (dicts with `input_ids`): a list of dicts, a "
                "datasets.Dataset or a dict of tensors."
            )
        return data

    def _per_example(self, captured: Mapping[str, Any], i: int, length: int) -> dict[str, torch.Tensor]:
        out = {}
        for m in self.plan.modules:
            for leaf, v in zip(m.leaves, _leaves(captured[m.name])):
                if leaf.key is not None:
                    row = v[i]
                    out[leaf.key] = (row[:length] if leaf.sequence else row).clone()
        return out

    @property
    def stored_bytes(self) -> int:
        """Bytes of the stored outputs (in memory, or in the folder's data files)."""
        if self.disk is not None:
            return self.disk.stored_bytes()
        return sum(t.numel() * t.element_size() for v in self.values for t in v.values())

    def example_lengths(self, field: str) -> np.ndarray | None:
        """Each example's length in ``field`` (its token ids), read without loading the stored outputs
        (:meth:`~influencekit.data.Examples.lengths`); None where an example lacks the field."""
        if not all(field in item for item in self._items):
            return None
        return np.fromiter((len(item[field]) for item in self._items), dtype=np.int64, count=len(self))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if isinstance(i, slice):
            raise InputTypeError("index a PrefixCache with one integer at a time.")
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"PrefixCache index {i} out of range for {len(self)} examples")
        i %= len(self)
        values = self.values[i] if self.disk is None else self.disk.read(i)
        return {**self._items[i], **values}


class _DiskValues:
    """A :class:`PrefixCache`'s stored outputs in a folder: per batch of examples, one checked array per stored key
    (the examples' rows concatenated) and the examples' row counts."""

    def __init__(
        self,
        folder: Path,
        task: Task,
        params: Mapping[str, torch.Tensor],
        examples: Examples,
        plan: PrefixPlan,
        batch_size: int,
    ) -> None:
        self.folder, self.batch_size, self.n = folder, batch_size, len(examples)
        self.keys = list(plan.stored)
        sequence = {leaf.key: leaf.sequence for m in plan.modules for leaf in m.leaves if leaf.key is not None}
        self.sequence = [bool(sequence.get(k, False)) for k in self.keys]
        head = examples.batch(range(min(PLAN_EXAMPLES, len(examples))))
        config = {
            "what": "influencekit prefix cache",
            "plan": plan.describe(),
            "n": self.n,
            "batch_size": batch_size,
            "weights": fingerprint({k: v for k, v in task.model.state_dict().items()}),
            "data": fingerprint(head),
            "selected": sorted(params),
        }
        open_folder(folder, config, arg="folder", what="a prefix cache", pattern="*-lengths.npy")
        self._open: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}

    def _path(self, lo: int, what: str) -> Path:
        return self.folder / f"{lo:09d}-{what}.npy"

    def done(self, lo: int) -> bool:
        """Whether batch ``lo`` is on disk and every one of its files passes its checks (else it is recomputed)."""
        count = min(self.batch_size, self.n - lo)
        lengths, problem = load_array(self._path(lo, "lengths"), (count, len(self.keys)), np.int64)
        if problem is None:
            for j in range(len(self.keys)):
                problem = verify_checked(self._path(lo, str(j)))
                if problem is not None:
                    problem = f"{self._path(lo, str(j))}: {problem}"
                    break
        if problem is None:
            return True
        if self._path(lo, "lengths").exists():
            warnings.warn(
                f"ignoring the prefix cache file {problem}; recomputing its batch", CorruptFileWarning, stacklevel=4
            )
        return False

    def write(self, lo: int, rows: list[dict[str, torch.Tensor]]) -> None:
        """One batch: per stored key its examples' rows concatenated (an output without the sequence dimension is one
        row per example), then the row counts ``(examples, keys)``, last: a batch counts as written once they are."""
        lengths = np.zeros((len(rows), len(self.keys)), dtype=np.int64)
        for j, key in enumerate(self.keys):
            parts = [r[key] if self.sequence[j] else r[key][None] for r in rows]
            lengths[:, j] = [len(t) for t in parts]
            save_array(self._path(lo, str(j)), torch.cat(parts).cpu().numpy())
        save_array(self._path(lo, "lengths"), lengths)

    def read(self, i: int) -> dict[str, torch.Tensor]:
        lo = (i // self.batch_size) * self.batch_size
        if lo not in self._open:
            if len(self._open) > 8:
                self._open.clear()
            lengths = np.load(self._path(lo, "lengths"), allow_pickle=False)
            starts = np.concatenate([np.zeros((1, len(self.keys)), dtype=np.int64), np.cumsum(lengths, axis=0)])
            self._open[lo] = (
                starts,
                [np.load(self._path(lo, str(j)), mmap_mode="r", allow_pickle=False) for j in range(len(self.keys))],
            )
        starts, arrays = self._open[lo]
        out = {}
        for j, key in enumerate(self.keys):
            a, b = int(starts[i - lo, j]), int(starts[i - lo + 1, j])
            block = torch.from_numpy(np.array(arrays[j][a:b]))
            out[key] = block if self.sequence[j] else block[0]
        return out

    def stored_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.npy") if not p.name.endswith("-lengths.npy"))
