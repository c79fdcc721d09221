"""An influence index: everything a "which training examples made this prediction?" query needs, computed once.

:meth:`InfluenceIndex.build` writes, into one folder, from a fitted :class:`~influencekit.Influence`:

- ``manifest.json``: the configuration (the same provenance as every influencekit folder: task, solver, damping,
  dtype, a fingerprint of θ̂ and of the training data) and the index's own settings; another configuration is
  refused, a finished build is reopened, an interrupted one resumes at its first missing chunk;
- ``solver/``: the fitted solver's state (the ``cache_dir`` of :class:`~influencekit.Influence`; reopened without a
  refit by ``Influence(..., cache_dir=folder / "solver")``);
- ``sketch-<k>.npy`` (``sketch_dim=``): the rows projected to ``sketch_dim`` dimensions, float32, for the two-stage
  search (approximate candidates, then exact re-scoring);
- ``rows-<k>.npy``: the training side in the form the solver scores fastest: the solver's own basis coordinates
  ``G Bᵀ`` when it has a small one (Arnoldi: ``rank`` numbers per example), the projected gradients of a
  :class:`~influencekit.GradientStore` (``store=``: its projected empirical-Fisher scores), else the training
  gradients ∇L(z) (exact, CG, LiSSA), for K-FAC/EK-FAC factored (``rows="factored"``, :mod:`~influencekit.index.rows`:
  a layer seen once per example kept as its layer taps, k + out numbers instead of out·k, next to ``taps-<k>-*.npy``);
- ``self-<k>.npy`` (self-influence, computed from the same gradients as the rows), ``loss-<split>.npy``,
``predicted-<split>.npy`` (classification tasks), ``label-<split>.npy``;
- ``inputs-<split>.npy`` for data given as tensors (so that a stored test example can be queried by its index),
  and ``display-<split>`` (what the explorer page shows: images as ``uint8`` arrays, or one JSON line of text or
  table fields per example).

Every file goes through :func:`~influencekit.core.folders.save_array` or
:func:`~influencekit.core.folders.write_checked` (a
sha256 written after the file; shape, dtype and finiteness checked when read): a damaged file is named and recomputed
by ``build``, refused by a query. Each file is read and verified once per opened index.

A query (:meth:`InfluenceIndex.explain`) is one test gradient, one solve (``(H + δI)⁻¹∇ℓ(z_test)``) and one scan of
the stored rows, ``−Qs Rᵀ`` chunk by chunk into a streaming top-k: the same products, in the same order, as
:meth:`~influencekit.Influence.top_k`, so the answers are equal (tests/index/test_index.py). A new input (not in any
data
set) is explained the same way: its gradient at the label given, or at the model's own prediction.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.checks import check_int
from ..core.errors import CorruptFileWarning, InputError, InputTypeError
from ..core.folders import load_array, open_folder, save_array, verify_checked, write_checked
from ..core.lowrank import LowRankQueries, factor_blocks
from ..core.progress import progress_bar
from ..core.projection import Projector
from ..core.results import RankedInfluence, TopK
from ..core.topk import helpful_and_harmful
from ..data.examples import DataSource, Examples, take
from ..engine.fitted import FittedEngine
from ..engine.pairwise import self_influence_of
from ..engine.persistence import SolverCache
from ..engine.scoring import Influence
from .rows import FactoredRows, choose_factored
from .store import GradientStore

__all__ = ["InfluenceIndex", "Display", "SOLVER_DIR"]

SOLVER_DIR = "solver"
# what a folder's manifest must share with the Influence that opens it
_IDENTITY = ("n_train", "task", "solver", "damping", "dtype", "theta_fingerprint")
SPLITS = ("train", "test")


@dataclass
class Display:
    """What the explorer shows of each example of a split.

    Attributes:
        kind: ``"image"`` (``values`` a ``(n, H, W)`` or ``(n, H, W, 3)`` array, scaled to 0–255 when stored),
            ``"text"`` (``values`` a list of strings) or ``"table"`` (``values`` a list of rows, ``columns`` their
            names).
        values: the examples' images, texts or rows, in the split's order.
        classes: the label names by class index (optional).
        columns: for ``"table"``: the column names.
    """

    kind: str
    values: Any
    classes: Sequence[str] | None = None
    columns: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("image", "text", "table"):
            raise InputError(f"`Display.kind` must be 'image', 'text' or 'table'. Got {self.kind!r}.")
        if self.kind == "table" and not self.columns:
            raise InputError("a `Display` of kind 'table' needs `columns` (the names of the row fields).")

    def __len__(self) -> int:
        return len(self.values)


def _predicted_class(out: torch.Tensor) -> torch.Tensor:
    """The class a classifier's outputs predict: argmax over classes, or logit > 0 for one output."""
    return (out.reshape(-1) > 0).long() if out.dim() == 1 or out.shape[-1] == 1 else out.argmax(dim=-1)


def _image_bytes(values: Any) -> np.ndarray:
    a = np.asarray(values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] != 3):
        raise InputError(f"image `Display.values` must have shape (n, H, W) or (n, H, W, 3). Got {a.shape}.")
    lo, hi = float(a.min()), float(a.max())
    return np.round(255.0 * (a - lo) / (hi - lo if hi > lo else 1.0)).astype(np.uint8)


class InfluenceIndex:
    """A folder of everything influence queries need (module docstring); build once, query many times."""

    def __init__(
        self, folder: Path, influence: Influence, config: dict[str, Any], store: GradientStore | None = None
    ) -> None:
        self.folder, self.influence, self.config, self.store = folder, influence, config, store
        self.engine = engine = influence.engine
        self.n_train = int(config["n_train"])
        self._rows: torch.Tensor | FactoredRows | None = None
        self._factored = None if config["space"] != "factored" else _factored_layers(engine, config["factored"])
        self._basis = engine.solver.solution_basis() if config["space"] == "basis" else None
        self._test: Examples | None = None
        self._verified: dict[str, np.ndarray] = {}
        self._shown: dict[str, tuple[dict[str, Any], Any] | None] = {}
        #: turns a typed input (e.g. an e-mail's text) into numbers shaped like a stored input; set by the recipe
        #: that opened the index (the enron demo: word presence over the stored vocabulary), None: numbers only
        self.encoder: Any = None
        dim = config.get("sketch_dim")
        self._projector = None if not dim else Projector(int(config["width"]), int(dim), kind="gaussian", seed=0)
        self._sketch: Any = None

    # ------------------------------------------------------------------------------------------ build and open
    @staticmethod
    def solver_dir(folder: str | os.PathLike) -> Path:
        """Where the index keeps the fitted solver: pass it as ``Influence(..., cache_dir=...)`` to reopen without a
        refit."""
        return Path(folder) / SOLVER_DIR

    @classmethod
    def build(
        cls,
        influence: Influence,
        folder: str | os.PathLike,
        *,
        test: DataSource | None = None,
        display: dict[str, Display] | None = None,
        recipe: str | None = None,
        sketch_dim: int | None = None,
        store: GradientStore | None = None,
        rows: str = "auto",
        progress: bool = False,
    ) -> InfluenceIndex:
        """Compute and store the index of a fitted ``influence`` in ``folder`` (or resume / reopen it).

        Args:
            influence: a fitted :class:`~influencekit.Influence`.
            folder: the index folder; created if missing; one built with another configuration is refused.
            test: an optional test set whose examples can then be queried by index (``split="test"``).
            display: ``{"train": Display, "test": Display}``: what the explorer page shows of each example.
            recipe: how the command line rebuilds the model and data to serve this index (set by
                ``influencekit index build --demo ...``); ``None`` for an index served from Python (:func:`serve`).
            sketch_dim: also store the rows projected to this many dimensions (a seeded Gaussian projection, float32)
                for the two-stage search of :meth:`explain` (``candidates=``); ``None``: exact scans only.
            store: a :class:`~influencekit.GradientStore` built from ``influence``: the index then answers with the
                store's projected empirical-Fisher scores (its rows are the projected gradients, ``dim`` numbers per
                example, and a query is C⁻¹φ(z_test)), equal to ``store.top_k``.
            rows: ``"auto"`` (factored for K-FAC/EK-FAC where the model's layers allow it, else dense), ``"dense"``
                (the gradients' entries), or ``"factored"`` (with any solver; an error names what stands in the way).
            progress: show progress bars.
        """
        if not isinstance(influence, Influence):
            raise InputTypeError(f"`influence` must be a fitted Influence. Got {type(influence).__name__}.")
        engine = influence.engine  # NotFittedError before fit()
        folder = Path(folder)
        test_data = None if test is None else Examples(test, name="test")
        display = dict(display or {})
        for split, shown in display.items():
            if split not in SPLITS or not isinstance(shown, Display):
                raise InputError(
                    f"`display` must map 'train'/'test' to a Display. Got {split!r}: {type(shown).__name__}."
                )
            expected = engine.n_train if split == "train" else (0 if test_data is None else len(test_data))
            if len(shown) != expected:
                raise InputError(f"`display['{split}']` has {len(shown)} examples; the {split} set has {expected}.")
        basis = engine.solver.solution_basis()
        space = "basis" if basis is not None and basis.shape[0] < engine.layout.n else "parameters"
        width = basis.shape[0] if space == "basis" else engine.layout.n
        chunk = engine.gradients.chunk
        if store is not None:
            if not isinstance(store, GradientStore) or store.influence is not influence:
                raise InputError(
                    "`store` must be a GradientStore built from this `influence` (GradientStore.build(influence, ...))."
                )
            space, width, chunk = "store", store.dim, store.chunk
        factored = choose_factored(engine, rows, space=space)
        if factored is not None:
            space = "factored"
        prov = engine.provenance
        config = _identity(
            engine,
            space=space,
            width=width,
            chunk=chunk,
            n_test=0 if test_data is None else len(test_data),
            test_fingerprint="" if test_data is None else engine.data_fingerprint(test_data),
            display={s: d.kind for s, d in sorted(display.items())},
            recipe=recipe,
            sketch_dim=None if sketch_dim is None else check_int("sketch_dim", sketch_dim, low=1),
            store=None if store is None else _store_config(store),
            factored=None if factored is None else [b.name for b, f in zip(*factored) if f],
        )
        config = open_folder(folder, config, arg="folder", what="an influence index", pattern="rows-*.npy")
        if (
            influence.config.cache_dir is None
            or Path(influence.config.cache_dir).resolve() != cls.solver_dir(folder).resolve()
        ):
            SolverCache(cls.solver_dir(folder), prov, engine.data_fingerprint(engine.train), engine.shard).store(
                engine.solver
            )
        index = cls(folder, influence, config, store)
        _write_rows(index, progress)
        _write_arrays(index, "train", engine.train)
        if test_data is not None:
            _write_arrays(index, "test", test_data)
        for split, shown in display.items():
            _write_display(index, split, shown)
        (folder / "complete").write_text("1")
        return index

    @classmethod
    def open(
        cls, folder: str | os.PathLike, influence: Influence, *, store: GradientStore | None = None
    ) -> InfluenceIndex:
        """Reopen a built index with the ``influence`` it was built from (fitted; with
        ``cache_dir=InfluenceIndex.solver_dir(folder)`` its fit loads the stored solver instead of refitting), and
        the ``store`` when it was built on one."""
        folder = Path(folder)
        manifest = folder / "manifest.json"
        if not manifest.is_file() or not (folder / "complete").is_file():
            raise InputError(
                f"{str(folder)!r} holds no finished influence index; build it with InfluenceIndex.build "
                "(or `influencekit index build`)."
            )
        engine = influence.engine  # NotFittedError before fit()
        stored = json.loads(manifest.read_text())
        mine = _identity(engine)
        differs = sorted(k for k in mine if stored.get(k) != json.loads(json.dumps(mine[k], default=str)))
        if differs:
            raise InputError(
                f"the index in {str(folder)!r} was built from another model or configuration (differs in: "
                f"{', '.join(differs)}); open it with the Influence it was built from, or build a new one."
            )
        wanted = None if store is None else json.loads(json.dumps(_store_config(store), default=str))
        if stored.get("store") != wanted:
            raise InputError(
                f"the index in {str(folder)!r} was built {'on' if stored.get('store') else 'without'} a gradient "
                f"store ({stored.get('store')}); open it with `store=` "
                f"{'that store' if stored.get('store') else 'left out'}."
            )
        return cls(folder, influence, stored, store)

    # ------------------------------------------------------------------------------------------ stored arrays
    def _path(self, name: str) -> Path:
        return self.folder / name

    def _dtype(self) -> np.dtype:
        return np.dtype(str(self.engine.layout.dtype).removeprefix("torch."))

    def _array(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A stored array, verified (checksum, shape, dtype, finiteness) the first time it is read, then kept."""
        if name not in self._verified:
            array, problem = load_array(self._path(name), shape, dtype, mmap=True)
            if problem is not None:
                raise InputError(
                    f"the index file {problem}. Rebuild the index (InfluenceIndex.build on the same folder "
                    "recomputes the damaged file)."
                )
            self._verified[name] = array
        return self._verified[name]

    def rows(self) -> torch.Tensor | FactoredRows:
        """The stored training rows ``(n_train, width)`` (:class:`FactoredRows` for factored rows), verified once and
        kept in memory."""
        if self._rows is None and self._factored is not None:
            self._rows = _read_factored(self)
        if self._rows is None:
            n, chunk, width = self.n_train, self.config["chunk"], self.config["width"]
            parts = [
                torch.from_numpy(
                    np.array(self._array(f"rows-{lo:09d}.npy", (min(chunk, n - lo), width), self._dtype()))
                )
                for lo in range(0, n, chunk)
            ]
            self._rows = torch.cat(parts).to(self.engine.layout.device)
        return self._rows

    def split_size(self, split: str) -> int:
        if split not in SPLITS:
            raise InputError(f"`split` must be 'train' or 'test'. Got {split!r}.")
        return self.n_train if split == "train" else self.config["n_test"]

    def split_array(self, name: str, split: str) -> np.ndarray | None:
        """A stored per-example array of ``split`` (``"loss"``, ``"predicted"``, ``"label"``), or None if not stored."""
        path = self._path(f"{name}-{split}.npy")
        if not path.exists():
            return None
        dtype = self._dtype() if name == "loss" else np.int64
        return self._array(path.name, (self.split_size(split),), dtype)

    def self_influence(self) -> np.ndarray:
        """∇L(z)ᵀ(H + δI)⁻¹∇L(z) of every training example (the store's projected form on a store), ``(n_train,)``."""
        if "self-influence" not in self._verified:
            n, chunk = self.n_train, self.config["chunk"]
            self._verified["self-influence"] = np.concatenate(
                [self._array(f"self-{lo:09d}.npy", (min(chunk, n - lo),), self._dtype()) for lo in range(0, n, chunk)]
            )
        return self._verified["self-influence"]

    def _display(self, split: str) -> tuple[dict[str, Any], Any] | None:
        """``(meta, items)`` of a split's display, verified and read once (images memory-mapped), or None."""
        if split not in self._shown:
            meta_path = self._path(f"display-{split}.json")
            if not meta_path.exists():
                self._shown[split] = None
                return None
            meta = json.loads(_checked_text(meta_path))
            if meta["kind"] == "image":
                raw = np.load(self._path(f"display-{split}.npy"), mmap_mode="r", allow_pickle=False)
                items: Any = self._array(f"display-{split}.npy", raw.shape, np.uint8)
            else:
                items = [json.loads(line) for line in _checked_text(self._path(f"display-{split}.jsonl")).splitlines()]
            self._shown[split] = (meta, items)
        return self._shown[split]

    def display_meta(self, split: str) -> dict[str, Any] | None:
        shown = self._display(split)
        return None if shown is None else shown[0]

    def display_item(self, split: str, i: int) -> Any:
        """What the page shows of example ``i`` of ``split``: an image's rows of 0–255 values, a text, or a table
        row."""
        shown = self._display(split)
        if shown is None:
            return None
        item = shown[1][i]
        return item.tolist() if isinstance(item, np.ndarray) else item

    def test_examples(self) -> Examples:
        """The stored test set (inputs kept as tensors at build time)."""
        if self._test is None:
            n = self.config["n_test"]
            parts = sorted(self.folder.glob("inputs-test-*.npy"))
            if not n or not parts:
                raise InputError(
                    "this index keeps no test inputs: build it with `test=` given as tensors to query test examples by "
                    "index."
                )
            arrays = []
            for j in range(len(parts)):
                raw = np.load(self._path(f"inputs-test-{j}.npy"), mmap_mode="r", allow_pickle=False)
                arrays.append(torch.from_numpy(np.array(self._array(f"inputs-test-{j}.npy", raw.shape, raw.dtype))))
            self._test = Examples(tuple(arrays), name="test")
        return self._test

    # ------------------------------------------------------------------------------------------ queries
    def explain(
        self, test: DataSource, k: int = 10, *, candidates: int | None = None, query_rank: int | None = None
    ) -> RankedInfluence:
        """The ``k`` most helpful and most harmful training examples for each example of ``test`` (any data the
        Influence takes, e.g. ``(X, y)``): one solve per block of test points, then one scan of the stored rows.

        ``candidates``: the two-stage search (an index built with ``sketch_dim``): the ``candidates`` most helpful and
        most harmful by the projected rows (faiss's exact inner-product search when faiss-cpu is installed, else a
        matrix product), then those re-scored exactly with the full rows; the values returned are exact, an example
        outside the candidates can be missed (tests/index/test_index.py states the recall).

        ``query_rank``: on factored rows, each query's block of a one-position layer kept as its rank-r factors
        (:meth:`~influencekit.Influence.queries`), r·(out + k) per example instead of out·k: an approximation (the
        Spearman of rank 8 against full rank is in docs/benchmarks.md), values and ranking from the truncated
        queries."""
        k = check_int("k", k, low=1, high=self.n_train)
        if query_rank is not None and (self._factored is None or candidates is not None):
            raise InputError(
                "`query_rank` scans factored rows (an index of K-FAC/EK-FAC, or built with rows='factored'), "
                f"without `candidates`; this index has {self.config['space']} "
                f"rows{' and candidates were given' if candidates else ''}."
            )
        if candidates is not None:
            if self._projector is None:
                raise InputError(
                    "`candidates` needs an index built with `sketch_dim` (the projected rows of the first stage)."
                )
            candidates = check_int("candidates", candidates, low=k, high=self.n_train)
        rows = self.rows()
        parts: dict[str, list[torch.Tensor]] = {"hi": [], "hv": [], "xi": [], "xv": []}
        reports: list[Any] = []
        for Q, report in self._queries(test, query_rank):
            if report is not None:
                reports.append(report)
            found = _scan(self, Q, rows, k, candidates)
            for key, value in zip(("hi", "hv", "xi", "xv"), found):
                parts[key].append(value)
        if not parts["hi"]:
            raise InputError("`test` must hold at least one example.")
        space = {
            "basis": "index (solver basis)",
            "store": "index (gradient store, projected)",
            "factored": "index (parameters, factored rows)",
        }.get(self.config["space"], "index (parameters)")
        search = "exact" if candidates is None else f"two-stage ({candidates} candidates)"
        search = search if query_rank is None else f"low-rank queries (rank {query_rank})"
        meta = self.engine.metadata(reports, k=k, score_space=space, search=search)
        return RankedInfluence(
            TopK(torch.cat(parts["hi"]), torch.cat(parts["hv"])),
            TopK(torch.cat(parts["xi"]), torch.cat(parts["xv"])),
            self.n_train,
            meta,
        )

    def _queries(self, test: DataSource, query_rank: int | None = None) -> Any:
        """Blocks ``(preconditioned test gradients in the rows' space, solve report or None)``."""
        data = test if isinstance(test, Examples) else Examples(test, name="test")
        if self.store is None:
            for _, Q, report in self.engine.queries(data, query_rank=query_rank):
                yield Q, report
            return
        if len(data):
            yield self.store.queries(data)[1].to(dtype=self.engine.layout.dtype), None

    def explain_test(
        self, indices: Sequence[int], k: int = 10, *, candidates: int | None = None, query_rank: int | None = None
    ) -> RankedInfluence:
        """:meth:`explain` for stored test examples, by index."""
        data = self.test_examples()
        bad = [i for i in indices if not 0 <= int(i) < len(data)]
        if bad:
            raise InputError(
                f"test index {bad[0]} is out of range: the index keeps {len(data)} test examples (0..{len(data) - 1})."
            )
        idx = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
        return self.explain(tuple(t[idx] for t in data._tensors), k=k, candidates=candidates, query_rank=query_rank)

    def new_input(self, values: Any, label: int | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """One new example ``(x[None], y)`` from nested lists shaped like a stored test input (or a text, for an index
        with
        an :attr:`encoder`), at ``label`` or, without it, at the model's predicted class; returns it and the label
        used."""
        if isinstance(values, str):
            if self.encoder is None:
                raise InputError("`input` must be numbers shaped like one example: this index has no encoder for text.")
            values = self.encoder(values)
        data = self.test_examples()
        template = data._tensors[0]
        try:
            x = torch.as_tensor(values, dtype=template.dtype)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"`input` must be numbers shaped like one example, {tuple(template.shape[1:])}. Got {exc}."
            ) from None
        if x.numel() != template[0].numel():
            raise InputError(
                f"`input` must have {template[0].numel()} values (one example of shape {tuple(template.shape[1:])}). "
                f"Got {x.numel()} (shape {tuple(x.shape)})."
            )
        if not bool(torch.isfinite(x).all()):
            raise InputError("`input` must hold only finite numbers. Got NaN/inf.")
        x = x.reshape(template.shape[1:])[None]
        if label is None:
            engine = self.engine
            with torch.no_grad():
                out = engine.task.outputs(engine.params, (x.to(engine.layout.dtype), data._tensors[1][:1]))
            label = int(_predicted_class(out)[0])
        return (x, torch.as_tensor([int(label)], dtype=data._tensors[1].dtype)), int(label)


def _scan(
    index: InfluenceIndex,
    Q: torch.Tensor | LowRankQueries,
    rows: torch.Tensor | FactoredRows,
    k: int,
    candidates: int | None,
) -> tuple[torch.Tensor, ...]:
    """(helpful indices, scores, harmful indices, scores) of one block of queries over the stored rows, chunk by chunk
    as :meth:`~influencekit.Influence.top_k` streams them."""
    chunk = index.config["chunk"]
    blocks = ((lo, rows[lo : lo + chunk]) for lo in range(0, index.n_train, chunk))
    if isinstance(Q, LowRankQueries):
        probe = torch.empty(len(Q), 0, dtype=index.engine.layout.dtype, device=index.engine.layout.device)
        helpful, harmful = helpful_and_harmful(probe, blocks, k, lambda _q, part: part.low_rank_scores(Q))
        return helpful.indices, -helpful.values, harmful.indices, harmful.values
    Qs = Q if index._basis is None else Q @ index._basis.T
    if candidates is not None:
        return _two_stage(index, Qs, rows, k, candidates)
    product = index.engine.training_side.product if index._factored is None else (lambda Q, part: part.scores(Q))
    helpful, harmful = helpful_and_harmful(Qs, blocks, k, product)
    return helpful.indices, -helpful.values, harmful.indices, harmful.values


def _two_stage(
    index: InfluenceIndex, Qs: torch.Tensor, rows: torch.Tensor | FactoredRows, k: int, candidates: int
) -> tuple[torch.Tensor, ...]:
    """Helpful and harmful (indices, exact scores) from ``candidates`` found by the sketch, re-scored exactly."""
    phi = index._projector.project(Qs).to(torch.float32).cpu().numpy()
    sketch = _sketch_search(index)
    out = []
    for sign in (1.0, -1.0):  # helpful: the largest φ(q)·φ(g) (scores −q·g most negative); harmful: the smallest
        ids = sketch(np.ascontiguousarray(sign * phi), candidates)
        idx = torch.as_tensor(ids, dtype=torch.long, device=Qs.device)
        if isinstance(rows, FactoredRows):  # each query against its own candidates' taps
            S = torch.cat([rows[idx[i]].scores(Qs[i : i + 1]) for i in range(len(idx))])
        else:
            S = -(Qs[:, None, :] * rows[idx]).sum(dim=-1)  # exact scores of each query's candidates
        order = torch.topk(-sign * S, k, dim=1).indices
        out += [idx.gather(1, order), S.gather(1, order)]
    return tuple(out)


def _factored_layers(engine: FittedEngine, names: list[str]) -> tuple[list[Any], list[bool]]:
    """The layer blocks of the engine's model and which of them a factored index keeps as taps (by name)."""
    blocks = factor_blocks(engine.task.model, engine.layout)
    missing = sorted(set(names) - {b.name for b in blocks})
    if missing:
        raise InputError(
            f"the factored index keeps the layer taps of {missing}, which this model's selection lacks; "
            "open it with the Influence it was built from."
        )
    return blocks, [b.name in names for b in blocks]


def _chunk_files(index: InfluenceIndex, lo: int, rows: int) -> list[tuple[str, Any]]:
    """``(file name, shape or None)`` of a factored chunk: the dense part, then each kept layer's taps (their
    positions T read from the file: padded sequences change them from chunk to chunk)."""
    blocks, factored = index._factored
    width = sum(b.index.numel() for b, f in zip(blocks, factored) if not f)
    files: list[tuple[str, Any]] = [(f"rows-{lo:09d}.npy", (rows, width))]
    for j, (block, keep) in enumerate(zip(blocks, factored)):
        if keep:
            o, k = block.index.shape
            files += [(f"taps-{lo:09d}-{j}-a.npy", (rows, None, k)), (f"taps-{lo:09d}-{j}-g.npy", (rows, None, o))]
    return files


def _file_shape(index: InfluenceIndex, name: str, shape: tuple[Any, ...]) -> tuple[int, ...]:
    """``shape`` with a None (a tap's positions) filled from the file's header (-1 where it cannot be read)."""
    if None not in shape:
        return shape
    try:
        T = np.load(index._path(name), mmap_mode="r", allow_pickle=False).shape[1]
    except (OSError, ValueError, EOFError, IndexError):
        T = -1
    return tuple(T if d is None else d for d in shape)


def _read_factored(index: InfluenceIndex) -> FactoredRows:
    """All factored chunks, verified, as one :class:`FactoredRows` on the influence's device."""
    n, chunk, dtype = index.n_train, index.config["chunk"], index._dtype()
    blocks, factored = index._factored
    device, l2 = index.engine.layout.device, index.engine.gradients.l2_term
    parts = []
    for lo in range(0, n, chunk):
        arrays = [
            torch.from_numpy(np.array(index._array(name, _file_shape(index, name, shape), dtype))).to(device)
            for name, shape in _chunk_files(index, lo, min(chunk, n - lo))
        ]
        taps = iter(arrays[1:])
        a, g = zip(*[(next(taps), next(taps)) if keep else (None, None) for keep in factored])
        parts.append(FactoredRows(blocks, factored, list(a), list(g), arrays[0], l2))
    return FactoredRows.cat(parts)


def _sketch_search(index: InfluenceIndex) -> Any:
    """``search(queries (q, d) float32, m) -> (q, m)`` indices of the largest inner products with the sketch."""
    if index._sketch is None:
        n, chunk, dim = index.n_train, index.config["chunk"], index._projector.dim
        sketch = np.concatenate(
            [
                np.asarray(index._array(f"sketch-{lo:09d}.npy", (min(chunk, n - lo), dim), np.float32))
                for lo in range(0, n, chunk)
            ]
        )
        try:
            import faiss
        except ImportError:
            table = torch.from_numpy(sketch)
            index._sketch = lambda q, m: torch.topk(torch.from_numpy(q) @ table.T, m, dim=1).indices.numpy()
        else:
            flat = faiss.IndexFlatIP(dim)
            flat.add(sketch)
            index._sketch = lambda q, m: flat.search(q, m)[1]
    return index._sketch


# ------------------------------------------------------------------------------------------ what build writes
def _store_config(store: GradientStore) -> dict[str, Any]:
    return {
        **store.projector.describe(),
        "damping": store.damping,
        "chunk": store.chunk,
        "folder": str(Path(store.folder).resolve()),
    }


def _identity(engine: FittedEngine, **settings: Any) -> dict[str, Any]:
    """The index manifest: the Influence's identity (:data:`_IDENTITY`, the training data's fingerprint) and
    ``settings``."""
    return engine.provenance.manifest(
        "influencekit influence index", _IDENTITY, data_fingerprint=engine.data_fingerprint(engine.train), **settings
    )


def _checked_text(path: Path) -> str:
    problem = verify_checked(path)
    if problem is not None:
        raise InputError(
            f"the index file {path}: {problem}. Rebuild the index (InfluenceIndex.build on the same folder "
            "rewrites it)."
        )
    return path.read_text()


def _needed(index: InfluenceIndex, name: str, shape: tuple[int, ...], dtype: Any) -> bool:
    """Whether ``name`` must be (re)written: absent, or failing its checks (named in a CorruptFileWarning)."""
    path = index._path(name)
    if not path.exists():
        return True
    _, problem = load_array(path, shape, dtype, mmap=True)
    if problem is None:
        return False
    warnings.warn(f"ignoring the index file {problem}; it is recomputed", CorruptFileWarning, stacklevel=4)
    return True


def _write_rows(index: InfluenceIndex, progress: bool) -> None:
    """Per chunk of training examples: the rows, their sketch (``sketch_dim``) and their self-influence, all from one
    pass of per-example gradients (on a store: its projected rows and its own self-influence)."""
    engine, n, chunk, width = index.engine, index.n_train, index.config["chunk"], index.config["width"]
    dtype = index._dtype()

    def needed(lo: int) -> bool:
        rows = min(chunk, n - lo)
        wanted = [(f"self-{lo:09d}.npy", (rows,), dtype)]
        if index._factored is None:
            wanted.append((f"rows-{lo:09d}.npy", (rows, width), dtype))
        else:
            wanted += [(name, _file_shape(index, name, shape), dtype) for name, shape in _chunk_files(index, lo, rows)]
        if index._projector is not None:
            wanted.append((f"sketch-{lo:09d}.npy", (rows, index._projector.dim), np.float32))
        return any([_needed(index, *w) for w in wanted])  # a list: every damaged file is named

    missing = [lo for lo in range(0, n, chunk) if needed(lo)]
    bar = progress_bar(total=sum(min(chunk, n - lo) for lo in missing), desc="index: training rows", enabled=progress)
    if index.store is not None and missing:
        store_rows, store_self = dict(index.store.gradients()), index.store.self_influence().to(engine.layout.dtype)
    for lo in missing:
        hi = min(lo + chunk, n)
        if index.store is not None:
            R, self_values = store_rows[lo].to(engine.layout.dtype), store_self[lo:hi]
        elif index._factored is not None:
            factored, l2 = index._factored[1], engine.gradients.l2_term
            taps = [
                f
                for _, f in engine.gradients.layer_factors(engine.train, side="train", start=lo, stop=hi, desc="index")
            ]
            F = FactoredRows.cat([FactoredRows.from_factors(f, factored, l2) for f in taps])
            from_taps = engine.solver.capabilities.tap_quadratic_form
            R = F.gradients(width) if index._projector is not None or not from_taps else None  # the sketch's input
            self_values = (
                torch.cat([engine.solver.tap_quadratic_form(f, l2) for f in taps])
                if from_taps
                else self_influence_of(R, engine.solver, engine.solve)[0]
            )
            for suffix, array in F.files():
                save_array(
                    index._path(f"taps-{lo:09d}{suffix}.npy" if suffix else f"rows-{lo:09d}.npy"),
                    array.detach().cpu().numpy(),
                )
        else:
            G = engine.gradients.block(engine.train, side="train", start=lo, stop=hi, desc="index")
            R = G if index._basis is None else G @ index._basis.T
            self_values = self_influence_of(G, engine.solver, engine.solve)[0]
        if index._factored is None:
            save_array(index._path(f"rows-{lo:09d}.npy"), R.detach().cpu().numpy())
        save_array(index._path(f"self-{lo:09d}.npy"), self_values.detach().cpu().numpy())
        if index._projector is not None:
            save_array(index._path(f"sketch-{lo:09d}.npy"), index._projector.project(R).to(torch.float32).cpu().numpy())
        bar.update(hi - lo)
    bar.close()


def _write_arrays(index: InfluenceIndex, split: str, data: Examples) -> None:
    """Losses, predictions and labels of ``split``, and a test set's inputs when they are tensors; each file (re)written
    when absent or damaged."""
    count, dtype = len(data), index._dtype()
    if _needed(index, f"loss-{split}.npy", (count,), dtype) or any(
        index._path(f"{name}-{split}.npy").exists() and _needed(index, f"{name}-{split}.npy", (count,), np.int64)
        for name in ("predicted", "label")
    ):
        losses, predicted, labels = _evaluate(index, data)
        save_array(index._path(f"loss-{split}.npy"), losses)
        if predicted is not None:
            save_array(index._path(f"predicted-{split}.npy"), predicted)
        if labels is not None:
            save_array(index._path(f"label-{split}.npy"), labels)
    inputs = data._tensors
    if split == "test" and isinstance(inputs, tuple) and all(isinstance(t, torch.Tensor) for t in inputs):
        for j, t in enumerate(inputs):
            array = t.detach().cpu().numpy()
            if _needed(index, f"inputs-{split}-{j}.npy", array.shape, array.dtype):
                save_array(index._path(f"inputs-{split}-{j}.npy"), array)


def _evaluate(index: InfluenceIndex, data: Examples) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Per-example loss (the task's, without the L2 term), predicted class and label (classification tasks)."""
    engine, task = index.engine, index.engine.task
    layout = engine.layout
    losses, predicted, labels = [], [], []
    classify = getattr(task, "fisher", None) == "classification"
    with torch.no_grad():
        for lo in range(0, len(data), 4096):
            batch = take(
                data,
                torch.arange(lo, min(lo + 4096, len(data))),
                dtype=layout.dtype,
                device=layout.device,
                check=task.check_batch,
            )
            losses.append(task.loss(engine.params, batch).detach().cpu())
            if classify:
                out, y = task.outputs(engine.params, batch).detach().cpu(), task.labels(batch).detach().cpu()
                if y.dim() != 1 or out.dim() > 2:  # per-token outputs: no single predicted class per example
                    classify = False
                    continue
                predicted.append(_predicted_class(out))
                labels.append(y.long())
    if not classify:
        predicted, labels = [], []
    return (
        torch.cat(losses).numpy(),
        (torch.cat(predicted).numpy() if predicted else None),
        (torch.cat(labels).numpy() if labels else None),
    )


def _write_display(index: InfluenceIndex, split: str, shown: Display) -> None:
    """What the page shows of a split: images as a checked uint8 array, texts and table rows as checked JSON lines."""
    if shown.kind == "image":
        images = _image_bytes(shown.values)
        if _needed(index, f"display-{split}.npy", images.shape, np.uint8):
            save_array(index._path(f"display-{split}.npy"), images)
    else:
        lines = "\n".join(json.dumps(v if shown.kind == "text" else [str(x) for x in v]) for v in shown.values) + "\n"
        write_checked(index._path(f"display-{split}.jsonl"), lambda f: f.write(lines.encode()))
    meta = json.dumps(
        {
            "kind": shown.kind,
            "classes": list(shown.classes) if shown.classes else None,
            "columns": list(shown.columns) if shown.columns else None,
        }
    )
    write_checked(index._path(f"display-{split}.json"), lambda f: f.write(meta.encode()))
