"""Ready-made influence indexes for the explorer: ``influencekit index build --demo digits|mnist|enron``.

- ``digits`` (bundled with scikit-learn, no download): multiclass logistic regression on the 8×8 digits, 1,200
  training / 597 test images, float64, L2 λ = 1e-3 inside each example's loss, ``fit_lbfgs``, the exact solver.
- ``mnist`` (``--data`` a folder with the MNIST IDX files, e.g. ../shared/data/mnist): a small CNN
  (Conv(1→4, 5×5, stride 2)-ReLU-Conv(4→8, 5×5, stride 2)-ReLU-Linear(128, 10), 2,202 parameters, float64) on 9,000
  training / 1,000 test images (the 10,000-image test file split with seed 0 when the training images are absent),
  600 Adam steps on mini-batches of 256 (seed 0), then EK-FAC with damping 0.01 (non-convex).
- ``enron`` (``--data`` enron1.tar.gz or its folder): logistic regression on word presence (words in ≥ 50 e-mails),
  80/20 seeded split of the 5,172 e-mails, L2 λ = 1e-4, ``fit_lbfgs`` from zero, the exact solver; the page shows the
  e-mails' text and explains a typed e-mail (encoded with the stored vocabulary).

The index keeps the trained weights (``model-<name>.npy``, one checked array per entry of the state dict: nothing is
unpickled), the recipe
(``demo.json``: the demo, the solver, the data path) and, for enron, the vocabulary, so that
``influencekit serve --index DIR`` rebuilds the same model, reopens the fitted solver without a refit and checks θ̂
against the index's manifest. The data themselves are read again from the path given at build time, never copied
into the index beyond the test inputs and what the page shows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influencekit.applications.explain import train_digits_logistic
from influencekit.core.errors import InputError
from influencekit.core.folders import save_array, verify_checked
from influencekit.core.task import ClassificationTask
from influencekit.data.bundled import load_digits_split
from influencekit.engine.scoring import Influence
from influencekit.engine.training import fit_lbfgs, fit_steps
from influencekit.index.influence_index import Display, InfluenceIndex

__all__ = ["DEMOS", "build_demo_index", "open_served_index"]

DEMOS = ("digits", "mnist", "enron")
MODEL_PREFIX = "model-"
TEXT_SHOWN = 1500  # characters of an e-mail shown on the page


@dataclass
class _Demo:
    """One demo's model, data and settings; ``train_model`` false when the weights come from the index."""

    task: ClassificationTask
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    solver: str
    damping: float
    display: dict[str, Display]
    encoder: Callable[[str], list[float]] | None = None
    extra: dict[str, Any] | None = None


def _cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 5, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 8, 5, stride=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 10),
    ).double()


def _digits(data: Path | None, state: dict[str, torch.Tensor] | None, solver: str | None) -> _Demo:
    train, test = load_digits_split(seed=0)
    if state is None:
        model = train_digits_logistic(l2=1e-3, seed=0).model
    else:
        model = torch.nn.Linear(64, 10).double()
        model.load_state_dict(state)
    classes = [str(c) for c in range(10)]
    display = {
        "train": Display("image", train[0].reshape(-1, 8, 8), classes=classes),
        "test": Display("image", test[0].reshape(-1, 8, 8), classes=classes),
    }
    return _Demo(ClassificationTask(model, l2=1e-3), train, test, solver or "exact", 0.0, display)


def _mnist(data: Path | None, state: dict[str, torch.Tensor] | None, solver: str | None) -> _Demo:
    from .data.mnist import load_mnist_split

    split = load_mnist_split(_required(data, "mnist"), n_train=9000, n_test=1000, seed=0)

    def to_x(images: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(images, dtype=torch.float64)[:, None] / 255.0

    train = (to_x(split.train[0]), torch.as_tensor(split.train[1], dtype=torch.long))
    test = (to_x(split.test[0]), torch.as_tensor(split.test[1], dtype=torch.long))
    torch.manual_seed(0)
    model = _cnn()
    task = ClassificationTask(model, l2=1e-4)
    if state is None:
        fit_steps(task, train, steps=600, lr=3e-3, optimizer="adam", batch_size=256, seed=0)
    else:
        model.load_state_dict(state)
    classes = [str(c) for c in range(10)]
    display = {
        "train": Display("image", split.train[0], classes=classes),
        "test": Display("image", split.test[0], classes=classes),
    }
    return _Demo(task, train, test, solver or "ekfac", 0.01, display, extra={"source": split.source})


def _enron(data: Path | None, state: dict[str, torch.Tensor] | None, solver: str | None) -> _Demo:
    from sklearn.feature_extraction.text import CountVectorizer

    from .data.enron import read_enron

    texts, labels, _ = read_enron(_required(data, "enron"))
    vectorizer = CountVectorizer(min_df=50, binary=True, dtype=np.float64)
    X = torch.as_tensor(vectorizer.fit_transform(texts).toarray(), dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(y)))
    n_train = int(np.floor(0.8 * len(y)))
    tr, te = order[:n_train], order[n_train:]
    model = torch.nn.Linear(X.shape[1], 2).double()
    task = ClassificationTask(model, l2=1e-4)
    if state is None:
        with torch.no_grad():  # convex: start from zero so the run does not depend on torch's initialisation
            model.weight.zero_()
            model.bias.zero_()
        fit_lbfgs(task, (X[tr], y[tr]))
    else:
        model.load_state_dict(state)
    classes = ["ham", "spam"]
    shown = [t[:TEXT_SHOWN] for t in texts]
    display = {
        "train": Display("text", [shown[i] for i in tr.tolist()], classes=classes),
        "test": Display("text", [shown[i] for i in te.tolist()], classes=classes),
    }
    analyze = vectorizer.build_analyzer()
    vocabulary = vectorizer.vocabulary_

    def encode(text: str) -> list[float]:
        x = [0.0] * len(vocabulary)
        for word in analyze(text):
            j = vocabulary.get(word)
            if j is not None:
                x[j] = 1.0
        return x

    return _Demo(
        task,
        (X[tr], y[tr]),
        (X[te], y[te]),
        solver or "exact",
        0.0,
        display,
        encoder=encode,
        extra={"words": len(vocabulary)},
    )


def _required(data: Path | None, name: str) -> Path:
    if data is None:
        raise InputError(f"the {name} demo reads its data from a path: give --data (e.g. ../shared/data/{name}).")
    if not data.exists():
        raise InputError(f"--data {str(data)!r} does not exist; the {name} demo needs its files there.")
    return data


RECIPES: dict[str, Callable[[Path | None, dict[str, torch.Tensor] | None, str | None], _Demo]] = {
    "digits": _digits,
    "mnist": _mnist,
    "enron": _enron,
}


def _influence(demo: _Demo, folder: Path) -> Influence:
    return Influence(
        demo.task, demo.train, solver=demo.solver, damping=demo.damping, cache_dir=InfluenceIndex.solver_dir(folder)
    ).fit()


def build_demo_index(
    name: str,
    folder: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    solver: str | None = None,
    progress: bool = False,
) -> InfluenceIndex:
    """Train the demo's model and build its index in ``folder`` (a finished one is reopened)."""
    if name not in DEMOS:
        raise InputError(f"`--demo` must be one of {', '.join(DEMOS)}. Got {name!r}.")
    folder = Path(folder)
    path = None if data is None else Path(data).resolve()
    demo = RECIPES[name](path, None, solver)
    inf = _influence(demo, folder)
    index = InfluenceIndex.build(
        inf, folder, test=demo.test, display=demo.display, recipe=f"demo:{name}", progress=progress
    )
    for key, value in demo.task.model.state_dict().items():
        save_array(folder / f"{MODEL_PREFIX}{key}.npy", value.detach().cpu().numpy())
    (folder / "demo.json").write_text(
        json.dumps(
            {"demo": name, "solver": demo.solver, "data": None if path is None else str(path), **(demo.extra or {})}
        )
    )
    index.encoder = demo.encoder
    return index


def open_served_index(folder: str | os.PathLike) -> InfluenceIndex:
    """Reopen an index built by ``influencekit index build`` (its recipe says how to rebuild the model)."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise InputError(
            f"`--index` {str(folder)!r} holds no influence index (no manifest.json). Build one with "
            "`influencekit index build --demo digits --out DIR`."
        )
    recipe = json.loads(manifest.read_text()).get("recipe")
    if recipe is None:
        raise InputError(
            f"the index in {str(folder)!r} was built from Python with your own model, which the command line "
            "cannot rebuild; serve it from Python: influencekit.index.serve.serve(InfluenceIndex.open(folder, "
            "influence))."
        )
    name = str(recipe).removeprefix("demo:")
    if name not in DEMOS or not (folder / "demo.json").is_file():
        raise InputError(
            f"the index in {str(folder)!r} names an unknown recipe {recipe!r} (or lacks demo.json); rebuild it."
        )
    settings = json.loads((folder / "demo.json").read_text())
    data = None if settings.get("data") is None else Path(settings["data"])
    state = {}
    for path in sorted(folder.glob(f"{MODEL_PREFIX}*.npy")):
        problem = verify_checked(path)
        if problem is not None:
            raise InputError(f"the index's model file {path}: {problem}. Rebuild the index (influencekit index build).")
        state[path.name.removeprefix(MODEL_PREFIX).removesuffix(".npy")] = torch.from_numpy(
            np.load(path, allow_pickle=False)
        )
    try:
        demo = RECIPES[name](data, state, settings["solver"])
    except RuntimeError as exc:  # load_state_dict: missing, unexpected or reshaped weights
        raise InputError(
            f"the model weights in {str(folder)!r} do not fit the {name} demo's model ({exc}); rebuild the index."
        ) from None
    index = InfluenceIndex.open(folder, _influence(demo, folder))
    index.encoder = demo.encoder
    return index
