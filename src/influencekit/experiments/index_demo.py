"""Ready-made influence indexes for the explorer: ``influencekit index build --demo digits`` (bundled, no download).

The digits demo: multiclass logistic regression on scikit-learn's bundled 8×8 digits (1,200 training, 597 test
images, float64, L2 λ = 1e-3 inside each example's loss, trained by ``fit_lbfgs``), influence with the chosen solver.
The index keeps the trained weights (``model.pt``, a state dict read back with ``weights_only=True``) and the recipe
name, so that ``influencekit serve --index DIR`` rebuilds the same model and reopens the fitted solver without a refit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..applications.explain import train_digits_logistic
from ..data.bundled import load_digits_split
from ..errors import InputError
from ..folders import verify_checked, write_checked
from ..index import Display, InfluenceIndex
from ..scoring import Influence
from ..task import ClassificationTask

__all__ = ["DEMOS", "build_demo_index", "open_served_index"]

DEMOS = ("digits",)
MODEL_FILE = "model.pt"
L2 = 1e-3


def _digits_influence(folder: Path, solver: str, model: torch.nn.Module | None = None) -> tuple[Influence, tuple, tuple]:
    train, test = load_digits_split(seed=0)
    if model is None:
        digits = train_digits_logistic(l2=L2, seed=0)
        model = digits.model
    task = ClassificationTask(model, l2=L2)
    inf = Influence(task, train, solver=solver, damping=0.0, cache_dir=InfluenceIndex.solver_dir(folder)).fit()
    return inf, train, test


def build_demo_index(name: str, folder: str | os.PathLike, *, solver: str = "exact", progress: bool = False) -> InfluenceIndex:
    """Train the demo's model and build its index in ``folder`` (a finished one is reopened)."""
    if name not in DEMOS:
        raise InputError(f"`--demo` must be one of {', '.join(DEMOS)}. Got {name!r}.")
    folder = Path(folder)
    inf, train, test = _digits_influence(folder, solver)
    classes = [str(c) for c in range(10)]
    display = {"train": Display("image", train[0].reshape(-1, 8, 8), classes=classes),
               "test": Display("image", test[0].reshape(-1, 8, 8), classes=classes)}
    index = InfluenceIndex.build(inf, folder, test=test, display=display, recipe=f"demo:{name}", progress=progress)
    state = {k: v.detach().clone() for k, v in inf.task.model.state_dict().items()}
    write_checked(folder / MODEL_FILE, lambda f: torch.save(state, f))
    (folder / "demo.json").write_text(json.dumps({"demo": name, "solver": solver}))
    return index


def open_served_index(folder: str | os.PathLike) -> InfluenceIndex:
    """Reopen an index built by ``influencekit index build`` (its recipe says how to rebuild the model)."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise InputError(f"`--index` {str(folder)!r} holds no influence index (no manifest.json). Build one with "
                         "`influencekit index build --demo digits --out DIR`.")
    recipe = json.loads(manifest.read_text()).get("recipe")
    if recipe is None:
        raise InputError(f"the index in {str(folder)!r} was built from Python with your own model, which the command line "
                         "cannot rebuild; serve it from Python: influencekit.serve.serve(InfluenceIndex.open(folder, influence)).")
    name = str(recipe).removeprefix("demo:")
    if name not in DEMOS:
        raise InputError(f"the index in {str(folder)!r} names an unknown recipe {recipe!r}.")
    problem = verify_checked(folder / MODEL_FILE)
    if problem is not None:
        raise InputError(f"the index's model file {folder / MODEL_FILE}: {problem}. Rebuild the index.")
    model = torch.nn.Linear(64, 10).double()
    model.load_state_dict(torch.load(folder / MODEL_FILE, weights_only=True))
    solver: Any = json.loads((folder / "demo.json").read_text())["solver"]
    inf, _, _ = _digits_influence(folder, solver, model)
    return InfluenceIndex.open(folder, inf)
