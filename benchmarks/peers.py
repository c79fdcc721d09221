"""influencekit side by side with peer libraries (Captum, pyDVL, Kronfluence, dattri) on the same problem.

Environment (never the main test venv: pyDVL 0.10 pins numpy<2, the peers pull many packages)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -c constraints.txt -e ".[bench]"   # torch stays the pinned 2.13.0 (CPU)
    .venv-bench/bin/pip uninstall -y torchvision    # pulled by kronfluence, cannot import beside torch 2.13, unused
    .venv-bench/bin/python benchmarks/peers.py --write docs/benchmarks.md

The ``bench`` extra pins captum==0.9.0, kronfluence==1.0.1, dattri==0.3.0, pydvl[influence]==0.10.0 and traker==0.3.2
(the last for benchmarks/lds.py).

Problems (``--problem``), influence ``damping=0.01`` throughout. The first two on scikit-learn's digits, float64,
``l2=1e-3``, all 597 test × 1,200 training points:

* ``logreg`` (default): ``benchmarks/solvers.py``'s multiclass logistic regression (``nn.Linear(64, 10)``,
  650 parameters), trained by ``ik.fit_lbfgs`` with its defaults.
* ``mlp``: ``benchmarks/solvers.py``'s ``build_model("mlp", 128)``, ``Linear(64, 128)-Tanh-Linear(128, 10)``
  (9,610 parameters), trained exactly as solvers.py trains it: ``torch.manual_seed(0)`` then
  ``ik.fit_lbfgs(task, train, max_iter=3000, tol=1e-6)``.
* ``cnn``: ``Conv(1→4, 5×5, stride 2)-ReLU-Conv(4→8, 5×5, stride 2)-ReLU-Linear(128, 10)`` (2,202 parameters,
  float64, ``l2=1e-3``) on the 10,000 MNIST images of ``../shared/data/mnist`` (shuffled with seed 0: 9,000
  training points, the other 1,000 the test points; all 1,000 × 9,000 scores), trained by 30 mini-batch Adam steps
  then ``ik.fit_lbfgs(max_iter=400, tol=1e-6)`` (about 5 minutes; the trained state is cached beside the
  leave-one-out cache). Only methods that can score a million pairs are in its default list: a per-query solver
  (CG, LiSSA) needs minutes per test point here and an explicit Hessian 2,202 HVPs over 9,000 images. Its
  leave-one-out truth is 300 Adam steps on mini-batches of 500 from θ̂ (the same draws in every run) against a
  control run, the ranking from our CG on the 3 test points.

Each problem has its own default list of methods (``DEFAULT_METHODS``; ``--methods`` picks any of ``METHODS``),
its own ``--write`` marker block and its own leave-one-out cache folder (``--loo-cache`` for logreg,
``--loo-cache`` + ``-mlp`` / ``-cnn`` for the networks: ``ik.leave_one_out`` refuses a folder holding another
configuration).

Common convention. Every adapter returns the **predicted change of the test loss when the training point is
removed**, ``−I_up,loss/n`` (docs/conventions.md), shape ``(n_test, n_train)``. The matrix inverted is the same
for every system: ours is ``∇²R + δI`` with ``R`` the mean of ``ℓ + (λ/2)‖θ‖²``, i.e. ``∇²(mean ℓ) + (λ+δ)I``;
the peers only see the data loss ``ℓ``, so they are given the regularisation ``λ + δ = 0.011``. The one
difference left is on the training side: our ∇L(z) carries ``+λθ``, the peers' ∇ℓ(z) does not. That shifts each
test row by the constant ``g_testᵀ(H+δI)⁻¹λθ/n``; the row ``influencekit exact (peer convention)`` (task with
``l2=0``, ``damping=0.011``) computes the peers' quantity exactly, and ``rel. err vs peer-conv exact`` checks each
adapter's sign and normalisation against it (round-off for an exact peer).

Each (system, method) runs in a fresh process (``subprocess``, one torch thread) that reports fit time (what the
method does once, before any test point: Hessian, factors, ...), score time (all 597 × 1,200 scores), its peak
resident memory (``VmHWM``) and the memory it had before fitting. Times are also given in units of one
per-example-gradient pass over the training set (influencekit's ``vmap(grad)`` pass, best of 10, measured in
the parent in the same run). The parent compares every score matrix with influencekit's exact one (Pearson,
Spearman over all 597 × 1,200 entries) and with actual leave-one-out retraining (``ik.leave_one_out``, cached
on disk): the 3 highest-loss test points × (top 50 by |influence| of our exact scores + 50 random).

Usage::

    .venv-bench/bin/python benchmarks/peers.py                       # logreg, its default methods, ~3 minutes
    .venv-bench/bin/python benchmarks/peers.py --methods ik-exact,captum-naive
    .venv-bench/bin/python benchmarks/peers.py --write docs/benchmarks.md   # replaces the PEERS markers only
    .venv-bench/bin/python benchmarks/peers.py --problem mlp --write docs/benchmarks.md   # PEERS MLP markers
    .venv-bench/bin/python benchmarks/peers.py --problem cnn --worker-timeout 600 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# benchmarks/distributed.py must not shadow the `distributed` package (dask) that pyDVL imports: drop this
# script's folder, which Python puts first on sys.path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _load_bench_module(name: str) -> Any:
    # benchmarks/ is not put on sys.path: its distributed.py would shadow the `distributed` package pyDVL imports.
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_ik_bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_solvers = _load_bench_module("solvers")
_scale = _load_bench_module("scale")  # its MNIST loader (seeded shuffle of the 10,000 t10k images)
L2, build_model, current_rss_mib = _solvers.L2, _solvers.build_model, _solvers.current_rss_mib
group_warnings, rss_mib, source_line = _solvers.group_warnings, _solvers.rss_mib, _solvers.source_line

DAMPING = 0.01
PEER_DAMPING = L2 + DAMPING  # the peers' Hessian has no L2 term: same matrix (H_data + (λ+δ)I)
BEGIN, END = "<!-- BEGIN PEERS GENERATED -->", "<!-- END PEERS GENERATED -->"
ROOT = Path(__file__).resolve().parents[1]
MLP_HIDDEN = 128  # solvers.py's --hidden default: Linear(64, 128)-Tanh-Linear(128, 10), 9,610 parameters
CNN_TRAIN, CNN_TEST = 9000, 1000  # the 10,000 MNIST t10k images, shuffled (seed 0): 9,000 train, 1,000 test
PROBLEMS: dict[str, dict[str, Any]] = {
    # hidden: build_model's second argument; fit: ik.fit_lbfgs options, as benchmarks/solvers.py trains it
    "logreg": {"hidden": 0, "fit": {}, "markers": (BEGIN, END), "heading": "## Peers: measured table"},
    "mlp": {
        "hidden": MLP_HIDDEN,
        "fit": {"max_iter": 3000, "tol": 1e-6},
        "markers": ("<!-- BEGIN PEERS MLP GENERATED -->", "<!-- END PEERS MLP GENERATED -->"),
        "heading": "## Peers: MLP on digits",
    },
    # adam: ik.fit_steps options of the warm-up; fit: ik.fit_lbfgs options of the polish that follows it
    "cnn": {
        "adam": {"steps": 30, "lr": 1e-2, "batch_size": 500, "seed": 0},
        "fit": {"max_iter": 400, "tol": 1e-6},
        "markers": ("<!-- BEGIN PEERS CNN GENERATED -->", "<!-- END PEERS CNN GENERATED -->"),
        "heading": "## Peers: CNN on MNIST",
    },
    # a small data set with few classes, where a sampled Fisher label is noisiest (issue 34)
    "wine": {
        "hidden": 0,
        "fit": {},
        "markers": ("<!-- BEGIN PEERS WINE GENERATED -->", "<!-- END PEERS WINE GENERATED -->"),
        "heading": "## Peers: 3-class logistic regression on 124 examples (wine)",
    },
}
WINE_TRAIN = 124  # scikit-learn's wine data (178 × 13, 3 classes), shuffled with seed 0: 124 train, 54 test


def _loo_retrain() -> dict[str, Any]:
    from influencekit.validation import StepRetrain

    return {"mlp": StepRetrain(steps=500, lr=1e-3), "cnn": StepRetrain(steps=300, lr=1e-3, batch_size=500)}


CNN_LAYOUT = "Conv(1→4, 5×5, stride 2)-ReLU-Conv(4→8, 5×5, stride 2)-ReLU-Linear(128, 10)"


def build_cnn() -> torch.nn.Module:
    """Conv(1→4, 5×5, stride 2)-ReLU-Conv(4→8, 5×5, stride 2)-ReLU-Linear(128→10), float64: 2,202 parameters."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 5, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 8, 5, stride=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 10),
    ).double()


def build_problem_model(problem: str) -> torch.nn.Module:
    if problem == "wine":
        return torch.nn.Linear(13, 3).double()
    return build_cnn() if problem == "cnn" else build_model(problem, PROBLEMS[problem]["hidden"])


def wine_data() -> tuple[tuple, tuple]:
    """scikit-learn's wine data (bundled, no download) shuffled with seed 0: 124 training and 54 test points, the
    13 features standardised by the training points' mean and standard deviation."""
    from sklearn.datasets import load_wine

    X, y = load_wine(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    X, y = torch.tensor(X[order], dtype=torch.float64), torch.tensor(y[order], dtype=torch.long)
    mean, std = X[:WINE_TRAIN].mean(0), X[:WINE_TRAIN].std(0)
    X = (X - mean) / std
    return (X[:WINE_TRAIN], y[:WINE_TRAIN]), (X[WINE_TRAIN:], y[WINE_TRAIN:])


def problem_data(problem: str) -> tuple[tuple, tuple]:
    """(train, test) of a problem: digits (1,200 / 597), wine (124 / 54) or MNIST (9,000 / 1,000, float64 pixels in
    [0, 1])."""
    if problem == "wine":
        return wine_data()
    if problem != "cnn":
        from influencekit.data import load_digits_split

        return load_digits_split(1200)
    (X, y), (Xt, yt), source = _scale.load_data(CNN_TRAIN, CNN_TEST)
    if not source.startswith("MNIST"):
        raise SystemExit(
            f"--problem cnn needs the MNIST images in {_scale.MNIST} (../shared/data/mnist); they are absent ({source})"
        )
    return (X.double(), y), (Xt.double(), yt)


def load_problem(state: str, problem: str = "logreg") -> tuple[torch.nn.Module, tuple, tuple]:
    train, test = problem_data(problem)
    model = build_problem_model(problem)
    model.load_state_dict(torch.load(state, weights_only=True))
    model.eval()
    return model, train, test


def train_problem(problem: str, model: torch.nn.Module, train: tuple, cache: Path) -> Any:
    """Train the problem's model in place and return the L-BFGS report; the CNN's state is cached in `cache`.

    The CNN takes minutes to train (Adam warm-up, then L-BFGS), so its trained state is kept next to the
    leave-one-out cache, under a name that carries the recipe; logreg and the MLP train in seconds each run.
    """
    import influencekit as ik

    task = ik.ClassificationTask(model, l2=L2)
    spec = PROBLEMS[problem]
    if problem != "cnn":
        return ik.fit_lbfgs(task, train, **spec["fit"])
    recipe = hashlib.sha256(json.dumps([spec["adam"], spec["fit"], L2, CNN_TRAIN, str(model)]).encode()).hexdigest()[
        :12
    ]
    path = cache.with_name(f"{cache.name}-model-{recipe}.pt")
    if path.exists():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["state"])
        print(f"reusing the trained CNN from {path}", flush=True)
        return ik.TrainReport(**saved["report"])
    ik.fit_steps(task, train, optimizer="adam", **spec["adam"])
    rep = ik.fit_lbfgs(task, train, warn=False, **spec["fit"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "report": dataclasses.asdict(rep)}, path)
    return rep


# ------------------------------------------------------------------------------------------ adapters
# Each adapter: (model, train, test, fit_timer) -> predicted LOO change (n_test, n_train) as a numpy array.
# `timer(name)` is a context manager recording the phase; the worker reads "fit" and "score".


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, name: str) -> Timer:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.times[self._name] = self.times.get(self._name, 0.0) + time.perf_counter() - self._t0


def ik_method(solver: str, *, peer_convention: bool = False, **options: Any) -> Callable:
    def run(model, train, test, timer, info):
        import influencekit as ik

        task = ik.ClassificationTask(model, l2=0.0 if peer_convention else L2)
        damping = PEER_DAMPING if peer_convention else DAMPING
        inf = ik.Influence(task, train, solver=solver, damping=damping, solver_options=options)
        with timer("fit"):
            inf.fit()
        with timer("score"):
            scores = inf.scores(test)
        info["solve_reports"] = scores.metadata.get("solve_reports", [])
        return scores.predicted_loo_change().numpy()

    return run


def captum_naive(projection_dim: int | None) -> Callable:
    return lambda model, train, test, timer, info: _captum_naive(model, train, test, timer, info, projection_dim)


def _captum_naive(model, train, test, timer, info, projection_dim):
    # captum/influence/_core/influence_function.py: scores are ∇ℓ(test)ᵀ (H_sum + hessian_reg I)⁻¹ ∇ℓ(train), positive
    # for proponents (helpful), with H_sum the Hessian of the *summed* loss over the data (_compute_dataset_func and
    # _compute_batch_loss_influence_function_base sum, whatever the reduction). H_sum = n H_mean, so with
    # hessian_reg = n (λ + δ) the score is g_testᵀ(H_mean + (λ+δ)I)⁻¹ g / n = −I_up,loss/n as it stands.
    # It keeps the top `projection_dim` eigenpairs of H_sum + reg (default 50, a low-rank inverse); None = all 650.
    # The checkpoint is reloaded by captum itself.
    from captum.influence import NaiveInfluenceFunction
    from torch.utils.data import DataLoader, TensorDataset

    X, y = train
    path = info["state"]

    def load(m: torch.nn.Module, p: str) -> float:
        m.load_state_dict(torch.load(p, weights_only=True))
        return 1.0

    with timer("fit"):
        tracin = NaiveInfluenceFunction(
            model,
            DataLoader(TensorDataset(X, y), batch_size=len(X)),
            path,
            load,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
            hessian_reg=len(X) * PEER_DAMPING,
            batch_size=len(X),
            projection_dim=projection_dim or sum(p.numel() for p in model.parameters()),
        )
    with timer("score"):
        s = tracin.influence(test)
    return s.detach().numpy()


def captum_arnoldi(model, train, test, timer, info):
    # captum/influence/_core/arnoldi_influence_function.py (not exported by captum.influence): Arnoldi on the Hessian
    # of the *summed* loss over the data (arnoldi_dim=200 iterations by default: 200 HVPs, as our n_iter = 2·rank),
    # `hessian_reg` added to the diagonal of its restriction to the Krylov space, the top `projection_dim` eigenpairs
    # (λ_i + reg) kept; R = V diag((λ + reg)^-1/2) and scores = (∇ℓ(test)ᵀR)(∇ℓ(train)ᵀR)ᵀ, positive for proponents,
    # the complement of V dropped (our remainder="drop"). With hessian_reg = n (λ + δ) the score is
    # g_testᵀ V (Λ_mean + (λ+δ))⁻¹ Vᵀ g / n, i.e. −I_up,loss/n as it stands. Rank 100 to match ours; seed 0.
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
    from torch.utils.data import DataLoader, TensorDataset

    X, y = train

    def load(m: torch.nn.Module, p: str) -> float:
        m.load_state_dict(torch.load(p, weights_only=True))
        return 1.0

    with timer("fit"):
        arn = ArnoldiInfluenceFunction(
            model,
            DataLoader(TensorDataset(X, y), batch_size=len(X)),
            info["state"],
            load,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
            batch_size=len(X),
            hessian_reg=len(X) * PEER_DAMPING,
            projection_dim=100,
            arnoldi_dim=200,
            seed=0,
        )
    with timer("score"):
        s = arn.influence(test)
    return s.detach().numpy()


def _pydvl(cls_name: str, *, float32: bool = False, **kwargs: Any) -> Callable:
    # pydvl/influence/base_influence_function_model.py: influences(x_test, y_test, x, y, mode="up") is
    # <(H + reg I)⁻¹∇ℓ(test), ∇ℓ(train)> with H the Hessian of the mean loss over the fitted DataLoader (checked
    # numerically below: sign +, so −I_up,loss/n = +value/n). float32: a float32 copy of the model and the data
    # (EkfacInfluence builds its factors in float32 and fails on a float64 model)
    def run(model, train, test, timer, info):
        import copy

        import pydvl.influence.torch as pt
        from torch.utils.data import DataLoader, TensorDataset

        if float32:
            model = copy.deepcopy(model).float()
            train, test = (train[0].float(), train[1]), (test[0].float(), test[1])
        X, y = train
        loss = torch.nn.functional.cross_entropy
        cls = getattr(pt, cls_name)
        if cls_name == "EkfacInfluence":
            est = cls(model, hessian_regularization=PEER_DAMPING, **kwargs)
        else:
            est = cls(model, loss, regularization=PEER_DAMPING, **kwargs)
        with timer("fit"):
            est.fit(DataLoader(TensorDataset(X, y), batch_size=len(X)))
        with timer("score"):
            s = est.influences(test[0], test[1], X, y, mode="up")
        return s.detach().double().numpy() / len(X)

    return run


def kronfluence_ekfac(model, train, test, timer, info):
    # kronfluence/score/pairwise.py: pairwise scores are ∇f(test)ᵀ (G_ekfac + damping I)⁻¹ ∇ℓ(train), positive
    # = helpful (no minus sign); covariances are averaged over examples (factor/eigen.py divides by the count),
    # the training loss summed per batch. −I_up,loss/n = +score/n. True Fisher by labels sampled from the model
    # (use_empirical_fisher=False, the default), every factor and score in float64.
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class Digits(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, t = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    t = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return F.cross_entropy(logits, t, reduction="sum")

        def compute_measurement(self, batch, model):
            x, t = batch
            return F.cross_entropy(model(x), t, reduction="sum")

    X, y = train
    torch.manual_seed(0)
    f64 = torch.float64
    task = Digits()
    # prepare_model replaces tracked layers inside their parent; a bare nn.Linear has none (infinite recursion)
    model = prepare_model(torch.nn.Sequential(model), task)
    out = tempfile.mkdtemp(prefix="kronfluence-")
    analyzer = Analyzer("digits", model, task, cpu=True, disable_tqdm=True, output_dir=out)
    fargs = FactorArguments(
        strategy="ekfac",
        activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64,
        eigendecomposition_dtype=f64,
        lambda_dtype=f64,
    )
    sargs = ScoreArguments(
        damping_factor=PEER_DAMPING, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64
    )
    with timer("fit"):
        analyzer.fit_all_factors(
            "ekfac", TensorDataset(X, y), per_device_batch_size=len(X), factor_args=fargs, overwrite_output_dir=True
        )
    with timer("score"):
        analyzer.compute_pairwise_scores(
            "s",
            "ekfac",
            TensorDataset(*test),
            TensorDataset(X, y),
            per_device_query_batch_size=len(test[0]),
            per_device_train_batch_size=len(X),
            score_args=sargs,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("s")  # computed scores are written to disk, not returned
    return scores["all_modules"].detach().numpy() / len(X)


def _dattri(
    cls_name: str,
    *,
    reg: tuple[str, float] = ("regularization", PEER_DAMPING),
    test_batch: int | None = None,
    float64: bool = False,
    no_grad: bool = False,
    **kwargs: Any,
) -> Callable:
    # dattri/algorithm/influence_function.py + base.py: attribute(train_loader, test_loader) returns
    # (n_train, n_test) inner products ∇ℓ(train)ᵀ(H + regularization·I)⁻¹∇ℓ(test), H the Hessian of `loss_func` on
    # the full-training batch (a mean here); sign and 1/n checked numerically against the peer-convention exact.
    # The other attributors approximate the same inverse, scaled the same way (a mean, no minus sign):
    # - IFAttributorLiSSA: x ← v + (1 − damping)x − H_batch x / scaling, returning x/scaling
    #   → (H + damping·scaling·I)⁻¹v, so damping = (λ+δ)/scaling. Its collate casts every data tensor to float32
    #   (`.float()`), hence the casts in loss_func below (the pixels k/16 survive exactly; labels back to class
    #   indices). Defaults otherwise (batch 1, depth 5000): ~70 s on logreg, ~50 minutes on the MLP (a timeout there).
    # - IFAttributorArnoldi: Arnoldi on HVPs of H + regularization·I (max_iter − 1 HVPs: 200 as our 2·rank), top
    #   proj_dim by |eigenvalue|, both sides projected by V diag(eig)^-1/2, the complement dropped. Its start vector
    #   is torch.rand in the default dtype: with float32 the first HVP of the float64 model fails (dtype mismatch).
    #   The iteration runs lazily at the first projection, so its cost lands in `score`, not `fit`.
    # - IFAttributorEKFAC: EK-FAC of the *empirical* Fisher (gradients at the true labels from the target function,
    #   covariances averaged over examples), (Λ + damping)⁻¹ in its eigenbasis: damping = λ+δ. Its default modules
    #   are every nn.Linear by name; a bare nn.Linear is named "" (→ ".weight", not a parameter), so it is wrapped in
    #   nn.Sequential. dattri 0.3.0 departs from EK-FAC twice: it projects with q_s V q_aᵀ although torch.linalg.eigh
    #   returns eigenvectors as columns (q_sᵀ V q_a), and it reshapes cat(W.flatten(), b) to (out, in + 1), which does
    #   not put the bias in the last column where its factors have it. On logreg an EK-FAC of the empirical Fisher
    #   by hand with both quirks reproduces its scores to 4e-2; without them it has slope 1.37 / Pearson 0.97 against
    #   the exact empirical-Fisher influence, dattri's 5.2 / 0.79. Measured as shipped.
    # - IFAttributorDataInf: per layer, (1/n)Σ_i (v − (gᵢᵀv)/(r + ‖gᵢ‖²) gᵢ)/r — the mean of the inverses of
    #   gᵢgᵢᵀ + rI (Sherman–Morrison) standing for the inverse of the layer's empirical Fisher + rI; r = λ+δ (the
    #   formula computed directly matches the adapter to 1e-15 on logreg). Its vmap holds test_batch² × (layer size)
    #   numbers, so it scores in test batches of 64.
    # float64=True sets torch's default dtype in the worker: dattri allocates some buffers with it (Arnoldi's start
    # vector and Hessenberg matrix, DataInf's accumulator, attribute()'s output), float32 otherwise.
    # no_grad=True scores under torch.no_grad(): the model's parameters require grad, so the torch.func gradients
    # dattri computes stay attached to them and attribute() accumulates its output in place from them, keeping every
    # intermediate alive (DataInf's peak RSS on logreg: 8.6 GB without, 0.7 GB with). The values are the same:
    # torch.func.grad inside ignores the outer no_grad. Every dattri row scores under no_grad (without it the MLP's
    # explicit and CG rows were killed for memory).
    def run(model, train, test, timer, info):
        import dattri.algorithm.influence_function as dif
        from dattri.task import AttributionTask
        from torch.utils.data import DataLoader, TensorDataset

        if float64:
            torch.set_default_dtype(torch.float64)
        torch.manual_seed(0)
        if cls_name == "IFAttributorEKFAC" and not list(model.children()):
            model = torch.nn.Sequential(model)
        dtype = next(model.parameters()).dtype

        def loss_func(params, data):
            x, t = data
            logits = torch.func.functional_call(model, params, (x.to(dtype),))
            return torch.nn.functional.cross_entropy(logits, t.long())

        X, y = train
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        att = getattr(dif, cls_name)(task, device="cpu", **{reg[0]: reg[1]}, **kwargs)
        train_loader = DataLoader(TensorDataset(X, y), batch_size=len(X))
        with timer("fit"):
            att.cache(train_loader)
        with timer("score"), torch.set_grad_enabled(not no_grad):
            s = att.attribute(train_loader, DataLoader(TensorDataset(*test), batch_size=test_batch or len(test[0])))
        return s.detach().T.numpy() / len(X)

    return run


METHODS: dict[str, tuple[str, str, Callable]] = {
    # key: (system, method, adapter)
    "ik-exact": ("influencekit", "exact", ik_method("exact")),
    "ik-exact-peer": ("influencekit", "exact (peer convention)", ik_method("exact", peer_convention=True)),
    "ik-cg": ("influencekit", "cg", ik_method("cg")),
    "ik-cg-1e-4": (
        "influencekit",
        "cg (rtol 1e-4, atol 1e-6: pyDVL CgInfluence's defaults)",
        ik_method("cg", rtol=1e-4, atol=1e-6),
    ),
    "ik-ekfac": ("influencekit", "ekfac", ik_method("ekfac")),
    "ik-lissa": (
        "influencekit",
        "lissa (defaults: batch, step, momentum, depth from the fitted spectrum; rtol 0.05)",
        ik_method("lissa"),
    ),
    "ik-lissa-plain": (
        "influencekit",
        "lissa (momentum=0: the paper's plain step, full data, rtol 0.05)",
        ik_method("lissa", momentum=0.0),
    ),
    "ik-ekfac-sampled": (
        "influencekit",
        "ekfac (fisher='sampled': one label drawn per example)",
        ik_method("ekfac", fisher="sampled"),
    ),
    "ik-ekfac-expected": ("influencekit", "ekfac (fisher='expected')", ik_method("ekfac", fisher="expected")),
    "ik-ekfac-peer": ("influencekit", "ekfac (peer convention)", ik_method("ekfac", peer_convention=True)),
    "ik-cg-scores": ("influencekit", "cg stopped by the scores (score_rtol 1e-4)", ik_method("cg", score_rtol=1e-4)),
    "ik-pcg": ("influencekit", "cg preconditioned by ekfac", ik_method("cg", preconditioner="ekfac")),
    "ik-pcg-scores": (
        "influencekit",
        "cg preconditioned by ekfac, stopped by the scores (score_rtol 1e-4)",
        ik_method("cg", preconditioner="ekfac", score_rtol=1e-4),
    ),
    "ik-arnoldi": (
        "influencekit",
        "arnoldi (rank 100, damped remainder)",
        ik_method("arnoldi", rank=100, remainder="damped"),
    ),
    "ik-arnoldi-drop": (
        "influencekit",
        "arnoldi (rank 100, remainder dropped)",
        ik_method("arnoldi", rank=100, remainder="drop"),
    ),
    "ik-arnoldi-2000": (
        "influencekit",
        "arnoldi (rank 100, damped remainder, Lanczos on 2,000 examples)",
        ik_method("arnoldi", rank=100, remainder="damped", examples=2000),
    ),
    "captum-naive": ("captum 0.9.0", "NaiveInfluenceFunction (full rank)", captum_naive(None)),
    "captum-naive-50": ("captum 0.9.0", "NaiveInfluenceFunction (default projection_dim=50)", captum_naive(50)),
    "captum-arnoldi": ("captum 0.9.0", "ArnoldiInfluenceFunction (rank 100, arnoldi_dim 200)", captum_arnoldi),
    "pydvl-direct": ("pydvl 0.10.0", "DirectInfluence", _pydvl("DirectInfluence")),
    "pydvl-cg": (
        "pydvl 0.10.0",
        "CgInfluence (block; its defaults rtol 1e-4, atol 1e-6)",
        _pydvl("CgInfluence", solve_simultaneously=True),
    ),
    "pydvl-lissa": ("pydvl 0.10.0", "LissaInfluence (defaults, maxiter=1000)", _pydvl("LissaInfluence")),
    "pydvl-lissa-100": ("pydvl 0.10.0", "LissaInfluence (maxiter=100)", _pydvl("LissaInfluence", maxiter=100)),
    "pydvl-arnoldi": ("pydvl 0.10.0", "ArnoldiInfluence (rank 10)", _pydvl("ArnoldiInfluence")),
    "pydvl-ekfac": ("pydvl 0.10.0", "EkfacInfluence", _pydvl("EkfacInfluence")),
    "pydvl-ekfac-f32": (
        "pydvl 0.10.0",
        "EkfacInfluence (float32 copy of the model and data)",
        _pydvl("EkfacInfluence", float32=True),
    ),
    "kronfluence-ekfac": ("kronfluence 1.0.1", "EK-FAC", kronfluence_ekfac),
    "dattri-explicit": ("dattri 0.3.0", "IFAttributorExplicit", _dattri("IFAttributorExplicit", no_grad=True)),
    "dattri-cg": ("dattri 0.3.0", "IFAttributorCG (max_iter=10 default)", _dattri("IFAttributorCG", no_grad=True)),
    "dattri-lissa": (
        "dattri 0.3.0",
        "IFAttributorLiSSA (defaults: batch 1, depth 5000, scaling 50)",
        _dattri("IFAttributorLiSSA", reg=("damping", PEER_DAMPING / 50.0), scaling=50.0, float64=True, no_grad=True),
    ),
    "dattri-arnoldi": (
        "dattri 0.3.0",
        "IFAttributorArnoldi (proj_dim 100, 200 iterations)",
        _dattri("IFAttributorArnoldi", proj_dim=100, max_iter=201, float64=True, no_grad=True),
    ),
    "dattri-ekfac": (
        "dattri 0.3.0",
        "IFAttributorEKFAC (empirical Fisher)",
        _dattri("IFAttributorEKFAC", reg=("damping", PEER_DAMPING), float64=True, no_grad=True),
    ),
    "dattri-datainf": (
        "dattri 0.3.0",
        "IFAttributorDataInf",
        _dattri("IFAttributorDataInf", test_batch=64, float64=True, no_grad=True),
    ),
}
# Default methods per problem. logreg: pyDVL's LiSSA with its defaults (1,000 full-batch steps × 597 right-hand
# sides) ran past a minute here and is left to --methods; the default run has it at maxiter=100. The methods
# added with the MLP (arnoldi rows, dattri LiSSA/Arnoldi/EK-FAC/DataInf, Captum Arnoldi) are left to --methods
# on logreg, whose default table stays as it was. mlp: no low-rank Captum default (projection_dim=50) and no pyDVL
# LiSSA; the exact peers may hit --worker-timeout (a FAILED row).
DEFAULT_METHODS: dict[str, list[str]] = {
    "logreg": [
        "ik-exact",
        "ik-exact-peer",
        "ik-cg",
        "ik-ekfac",
        "captum-naive",
        "captum-naive-50",
        "pydvl-direct",
        "pydvl-cg",
        "pydvl-lissa-100",
        "pydvl-arnoldi",
        "pydvl-ekfac",
        "kronfluence-ekfac",
        "dattri-explicit",
        "dattri-cg",
    ],
    "mlp": [
        "ik-exact",
        "ik-exact-peer",
        "ik-cg",
        "ik-cg-1e-4",
        "ik-cg-scores",
        "ik-pcg",
        "ik-pcg-scores",
        "ik-ekfac",
        "ik-arnoldi",
        "ik-arnoldi-drop",
        "captum-naive",
        "captum-arnoldi",
        "pydvl-direct",
        "pydvl-cg",
        "pydvl-arnoldi",
        "pydvl-ekfac",
        "kronfluence-ekfac",
        "dattri-explicit",
        "dattri-cg",
        "dattri-lissa",
        "dattri-arnoldi",
        "dattri-ekfac",
        "dattri-datainf",
    ],
    # cnn: only methods that can score 1,000 × 9,000 pairs. Per-query solvers (CG, LiSSA) need ~4 minutes per test
    # point here (our CG: 226 s for one), and an explicit Hessian 2,202 HVPs over 9,000 images: --methods runs them.
    "cnn": [
        "ik-ekfac",
        "ik-arnoldi",
        "ik-arnoldi-drop",
        "ik-arnoldi-2000",
        "captum-arnoldi",
        "pydvl-arnoldi",
        "pydvl-ekfac",
        "kronfluence-ekfac",
        "dattri-arnoldi",
        "dattri-ekfac",
        "dattri-datainf",
    ],
    # wine: the Fisher's expectation against one sampled label per example, and the peers' EK-FAC
    "wine": [
        "ik-exact",
        "ik-exact-peer",
        "ik-cg",
        "ik-ekfac",
        "ik-ekfac-sampled",
        "ik-ekfac-expected",
        "ik-ekfac-peer",
        "pydvl-direct",
        "pydvl-ekfac-f32",
        "kronfluence-ekfac",
        "dattri-ekfac",
    ],
}


# -------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    # torch.func's first grad imports torch._dynamo (and sympy, ~800 modules, 1.2 s here) once per process; a peer
    # that imports it at import time would pay that outside its timer and one that first calls torch.func inside
    # it. Import it before any timer, so every row measures the method, not the interpreter's warm-up.
    importlib.import_module("torch._dynamo")
    model, train, test = load_problem(args.state, args.problem)
    info: dict[str, Any] = {"state": args.state}
    base = current_rss_mib()
    timer = Timer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S = METHODS[args.method][2](model, train, test, timer, info)
    info.pop("state")
    result = {
        "t_fit": timer.times.get("fit", 0.0),
        "t_score": timer.times.get("score", 0.0),
        "rss_base_mib": base,
        "rss_peak_mib": rss_mib(),
        "warnings": group_warnings(caught),
        **info,
    }
    S = np.asarray(S, dtype=np.float64)
    if S.shape != (len(test[0]), len(train[0])):
        raise ValueError(f"{args.method}: scores of shape {S.shape}, expected {(len(test[0]), len(train[0]))}")
    np.save(args.out + ".npy", S)
    Path(args.out + ".json").write_text(json.dumps(result, default=str))


def run_worker(key: str, state: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--problem",
        args.problem,
        "--method",
        key,
        "--state",
        str(state),
        "--out",
        str(out),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.worker_timeout:.0f} s"}
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return {
            "error": f"exit {proc.returncode}: {lines[-1] if lines else '(no output)'}",
            "stderr": proc.stderr[-4000:],
        }
    r = json.loads(Path(str(out) + ".json").read_text())
    r["wall"] = time.perf_counter() - t0
    r["S"] = np.load(str(out) + ".npy")
    return r


# -------------------------------------------------------------------------------------------- parent
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def grad_pass_seconds(model, train, repeats: int = 10) -> float:
    import influencekit as ik

    # the pass does not depend on the solver: cg's fit is free, exact's would cost ~100 s on the MLP
    inf = ik.Influence(ik.ClassificationTask(model, l2=L2), train, solver="cg", damping=DAMPING)
    best = float("inf")
    inf.fit()
    for _ in range(repeats):
        t0 = time.perf_counter()
        list(inf.gradients_.stream(inf.train_, side="train"))
        best = min(best, time.perf_counter() - t0)
    return best


HEADER = [
    "system",
    "method",
    "fit s",
    "score s",
    "total s",
    "total /grad",
    "peak RSS MiB (+ over base)",
    "rel. err vs peer-conv exact",
    "slope vs peer-conv exact",
    "Pearson vs exact",
    "Spearman vs exact",
    "LOO Pearson",
    "LOO Spearman",
]


def fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def rows_of(results: list[dict[str, Any]], unit: float) -> list[list[str]]:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["system"], r["method"]] + ["—"] * (len(HEADER) - 3) + [f"FAILED: {r['error']}"])
            continue
        total = r["t_fit"] + r["t_score"]
        rows.append(
            [
                r["system"],
                r["method"],
                f"{r['t_fit']:.2f}",
                f"{r['t_score']:.2f}",
                f"{total:.2f}",
                f"{total / unit:.0f}",
                f"{r['rss_peak_mib']:.0f} (+{r['rss_peak_mib'] - r['rss_base_mib']:.0f})",
                fmt(r.get("rel_err_peer"), ".1e"),
                fmt(r.get("slope_peer"), ".4f"),
                fmt(r.get("pearson"), ".6f"),
                fmt(r.get("spearman"), ".6f"),
                fmt(r.get("loo_pearson"), ".4f"),
                fmt(r.get("loo_spearman"), ".4f"),
            ]
        )
    return rows


EXACT_QUALITY = 0.9999  # Pearson against our exact influence from which a row counts as exact quality


def exact_quality_line(results: list[dict[str, Any]]) -> str:
    """The speed ratio at exact quality: the fastest of our rows and the fastest peer row whose scores correlate with
    our exact influence at Pearson ≥ EXACT_QUALITY, fit + score, in this run."""
    exact = [r for r in results if "error" not in r and (r.get("pearson") or 0.0) >= EXACT_QUALITY]
    ours = [r for r in exact if r["system"] == "influencekit"]
    peers = [r for r in exact if r["system"] != "influencekit"]
    if not ours or not peers:
        missing = "peer" if ours else "row of ours"
        return f"exact quality (Pearson ≥ {EXACT_QUALITY} against our exact): no {missing} reached it"
    a = min(ours, key=lambda r: r["t_fit"] + r["t_score"])
    b = min(peers, key=lambda r: r["t_fit"] + r["t_score"])
    ta, tb = a["t_fit"] + a["t_score"], b["t_fit"] + b["t_score"]
    return (
        f"exact quality (Pearson ≥ {EXACT_QUALITY} against our exact): the fastest of ours, {a['method']}, "
        f"{ta:.2f} s; the fastest peer, {b['system']} {b['method']}, {tb:.2f} s: ours {tb / ta:.2f}x faster"
    )


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADER)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in [HEADER, ["-" * w for w in widths], *rows]
    )


def md_table(rows: list[list[str]]) -> str:
    return "\n".join(
        [
            "| " + " | ".join(HEADER) + " |",
            "|" + "|".join("---" for _ in HEADER) + "|",
            *("| " + " | ".join(r) + " |" for r in rows),
        ]
    )


def write_markdown(
    path: Path, body: str, begin: str = BEGIN, end: str = END, heading: str = "## Peers: measured table"
) -> None:
    """Replace the text between the markers `begin` and `end`; without them, append `heading` and a new block."""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        start, stop = text.index(begin), text.index(end) + len(end)
        path.write_text(text[:start] + block + text[stop:])
    else:
        path.write_text(text.rstrip() + f"\n\n{heading}\n\n" + block + "\n")


def problem_line(problem: str, model: torch.nn.Module, rep: Any, unit: float) -> str:
    """The problem paragraph of the --write block (logreg's is the one written before the MLP existed)."""
    n_params = sum(p.numel() for p in model.parameters())
    n_test, n_train = {"cnn": (CNN_TEST, CNN_TRAIN), "wine": (178 - WINE_TRAIN, WINE_TRAIN)}.get(problem, (597, 1200))
    tail = (
        f"damping {DAMPING:g} (peers: regularisation {PEER_DAMPING:g} = l2 + damping, the same matrix), "
        f"all {n_test:,} × {n_train:,} scores. Unit of `/grad`: one per-example-gradient pass over the {n_train:,} "
        "training points, "
        f"{unit * 1e3:.1f} ms (best of 10, this run). Peak RSS: the worker's `VmHWM`; `+`: its rise over the memory "
        "before fitting."
    )
    if problem == "logreg":
        return f"Problem: logistic regression on digits ({n_params} parameters, float64, l2 = {L2:g}), " + tail
    if problem == "wine":
        return (
            f"Problem: 3-class logistic regression on scikit-learn's wine data ({n_params} parameters, float64, "
            f"l2 = {L2:g}; 13 standardised features, shuffled with seed 0: {WINE_TRAIN} training points, the other "
            f"{n_test} the test points; ||grad R|| = {rep.grad_norm:.2e}), " + tail
        )
    fit = ", ".join(f"{k}={v:g}" for k, v in PROBLEMS[problem]["fit"].items())
    if problem == "cnn":
        adam = ", ".join(f"{k}={v:g}" for k, v in PROBLEMS[problem]["adam"].items())
        return (
            f"Problem: CNN on MNIST (`{CNN_LAYOUT}`, {n_params:,} parameters, float64, l2 = {L2:g}; the 10,000 "
            f"t10k images of ../shared/data/mnist shuffled with seed 0, the first {CNN_TRAIN:,} for training, the "
            f"other {CNN_TEST:,} the test points; trained from torch.manual_seed(0) by ik.fit_steps(optimizer='adam', "
            f"{adam}) then ik.fit_lbfgs({fit}): ||grad R|| = {rep.grad_norm:.2e}, converged={rep.converged}), " + tail
        )
    return (
        f"Problem: MLP on digits (`Linear(64, {MLP_HIDDEN})-Tanh-Linear({MLP_HIDDEN}, 10)`, {n_params:,} "
        f"parameters, float64, l2 = {L2:g}; trained by ik.fit_lbfgs({fit}) from torch.manual_seed(0): "
        f"{rep.iterations} iterations, ||grad R|| = {rep.grad_norm:.2e}, converged={rep.converged}), " + tail
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--problem",
        choices=list(PROBLEMS),
        default="logreg",
        help="logreg (Linear(64, 10), 650 parameters; default), mlp "
        "(Linear(64, 128)-Tanh-Linear(128, 10), 9,610 parameters) or cnn (2,202 parameters, "
        "9,000 MNIST images; needs ../shared/data/mnist)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated, from: "
        + ",".join(METHODS)
        + ". Default: logreg "
        + ",".join(DEFAULT_METHODS["logreg"])
        + "; mlp "
        + ",".join(DEFAULT_METHODS["mlp"])
        + "; cnn "
        + ",".join(DEFAULT_METHODS["cnn"]),
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--worker-timeout", type=float, default=300.0)
    parser.add_argument(
        "--loo-cache",
        default=str(Path(tempfile.gettempdir()) / "influencekit-peers-loo"),
        help="folder caching the leave-one-out retrainings (reused across runs); the MLP and the CNN use "
        "this folder + '-mlp' / '-cnn' (the CNN's trained state is cached beside it)",
    )
    parser.add_argument("--no-loo", action="store_true", help="skip the leave-one-out ground truth")
    parser.add_argument(
        "--work-dir", help="keep the workers' results here and reuse finished ones (resume a killed run)"
    )
    parser.add_argument(
        "--write",
        metavar="PATH",
        help="write the table into PATH between the problem's markers (PEERS GENERATED for logreg, "
        "PEERS MLP GENERATED for mlp, PEERS CNN GENERATED for cnn)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        try:
            worker(args)
        except Exception:
            traceback.print_exc()
            return 1
        return 0
    problem = args.problem
    if args.methods is None:
        args.methods = ",".join(DEFAULT_METHODS[problem])
    keys = [k for k in args.methods.split(",") if k]
    for k in keys:
        if k not in METHODS:
            parser.error(f"unknown method {k!r}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    import influencekit as ik

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    (X, y), (Xt, yt) = problem_data(problem)
    # one leave-one-out cache folder per problem: leave_one_out refuses a folder that holds another configuration
    loo_cache = args.loo_cache if problem == "logreg" else f"{args.loo_cache}-{problem}"
    torch.manual_seed(0)
    model = build_problem_model(problem)
    task = ik.ClassificationTask(model, l2=L2)
    rep = train_problem(problem, model, (X, y), Path(loo_cache))
    print(f"trained {problem}: {rep.iterations} iterations, ||grad R|| = {rep.grad_norm:.2e}", flush=True)
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        # --work-dir keeps every worker's result (a killed run resumes: finished methods are read back, the same
        # trained state being checked by its sha256); otherwise a temporary folder
        work = (
            Path(args.work_dir)
            if args.work_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ik-peers-")))
        )
        work.mkdir(parents=True, exist_ok=True)
        state = work / f"{problem}.pt"
        torch.save(model.state_dict(), state)
        digest = hashlib.sha256(state.read_bytes()).hexdigest()[:16]
        for key in keys:
            system, method, _ = METHODS[key]
            out = work / f"{problem}-{digest}-{key}"
            failed = Path(str(out) + ".failed.json")
            if args.work_dir and Path(str(out) + ".json").exists() and Path(str(out) + ".npy").exists():
                r = json.loads(Path(str(out) + ".json").read_text())
                r["S"] = np.load(str(out) + ".npy")
                print(f"reusing {system} / {method} from {out}", flush=True)
            elif args.work_dir and failed.exists():  # a failure (timeout, killed for memory) is a result too
                r = json.loads(failed.read_text())
                print(f"reusing the failure of {system} / {method} from {failed}", flush=True)
            else:
                print(f"running {system} / {method} ...", flush=True)
                r = run_worker(key, state, out, args)
                if args.work_dir and "error" in r:
                    failed.write_text(json.dumps({"error": r["error"]}))
            r.update(key=key, system=system, method=method)
            print(
                f"  {r['error']}"
                if "error" in r
                else f"  fit {r['t_fit']:.2f} s, score {r['t_score']:.2f} s, peak RSS {r['rss_peak_mib']:.0f} MiB",
                flush=True,
            )
            results.append(r)
    unit = grad_pass_seconds(model, (X, y))
    print(f"reference per-example-gradient pass: {unit * 1e3:.1f} ms", flush=True)

    by = {r["key"]: r for r in results if "error" not in r}
    ref, ref_peer = by.get("ik-exact"), by.get("ik-exact-peer")
    for r in by.values():
        if ref is not None:
            r["pearson"], r["spearman"] = (
                pearson(r["S"].ravel(), ref["S"].ravel()),
                spearman(r["S"].ravel(), ref["S"].ravel()),
            )
        if ref_peer is not None:
            r["rel_err_peer"] = float(np.linalg.norm(r["S"] - ref_peer["S"]) / np.linalg.norm(ref_peer["S"]))
            # least-squares slope through 0 against the peers' exact quantity: 1 when sign and 1/n are right
            r["slope_peer"] = float((r["S"] * ref_peer["S"]).sum() / (ref_peer["S"] ** 2).sum())

    loo_line = "leave-one-out ground truth skipped"
    if not args.no_loo:
        t0 = time.perf_counter()
        # the ranking for the networks comes from block CG (1e-9 from exact on the MLP, 5 s instead of exact's 100 s
        # fit; an explicit Hessian of the CNN would take 2,202 HVPs over 9,000 images)
        nonconvex = problem not in ("logreg", "wine")
        inf = ik.Influence(task, (X, y), solver="cg" if nonconvex else "exact", damping=DAMPING).fit()
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(model(Xt), yt, reduction="none")
        tests = torch.argsort(losses, descending=True)[:3].tolist()
        # the networks are retrained the paper's non-convex way, a fixed budget of Adam steps from θ̂ measured
        # against the same steps without removal (L-BFGS to 1e-9 took minutes per retraining on the MLP): the MLP
        # with 500 full-batch steps, the CNN with 300 steps on mini-batches of 500 (the same draws in every run;
        # a full-batch step over 9,000 images costs 0.7 s here, 300 of these mini-batch steps 7 s)
        retrain = _loo_retrain().get(problem)
        loo = ik.leave_one_out(
            inf,
            (Xt, yt),
            test_indices=tests,
            top_k=50,
            n_random=50,
            cache_dir=loo_cache,
            retrain=retrain,
            workers=2 if nonconvex else 1,
            threads=1,
        )
        ti, tr = np.asarray(loo.test_index), np.asarray(loo.train_index)
        for r in by.values():
            pred = r["S"][ti, tr]
            r["loo_pearson"], r["loo_spearman"] = pearson(pred, loo.actual), spearman(pred, loo.actual)
        how = (
            ""
            if retrain is None
            else (
                f", retrained with {retrain.steps} "
                f"{'full-batch' if retrain.batch_size is None else f'mini-batch ({retrain.batch_size})'} "
                f"Adam steps (lr {retrain.lr:g}) from θ̂ against a control run without removal"
            )
        )
        loo_line = (
            f"leave-one-out: test points {tests} (highest test loss) × (top 50 by |influence| of influencekit "
            f"{'cg' if nonconvex else 'exact'} + 50 random) = {len(loo)} pairs{how}, with ik.leave_one_out (cache "
            f"{loo_cache}; "
            f"{loo.metadata.get('n_from_cache', '?')} from cache) in {time.perf_counter() - t0:.1f} s; "
            f"{len(loo.not_converged)} not converged"
        )
    load_end = os.getloadavg()[0]
    total = time.perf_counter() - started
    rows = rows_of(results, unit)
    print()
    print(text_table(rows))
    ratio_line = exact_quality_line(results)
    print(ratio_line)
    print(loo_line)
    notes = []
    for r in results:
        if "error" in r:
            notes.append(f"{r['system']} / {r['method']} failed: {r['error']}")
        for w in r.get("warnings", []):
            if "torch.jit.script" in w["message"]:
                continue
            notes.append(
                f"{r['system']} / {r['method']}: {w['category']} x{w['count']} from {w['origin']}: {w['message'][:300]}"
            )
    for line in notes:
        print("note: " + line)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s) per worker, "
        f"Python {platform.python_version()}"
    )
    print(f"machine: {machine}; load {load_start:.2f} -> {load_end:.2f}; total {total:.0f} s")
    if args.write:
        body = "\n".join(
            [
                f"Command: `.venv-bench/bin/python benchmarks/peers.py {shlex.join(sys.argv[1:])}`",
                "",
                f"Machine: {machine}; load average {load_start:.2f} at start, {load_end:.2f} at end; total {total:.0f} "
                "s. "
                f"Source: {source_line()}.",
                "",
                problem_line(problem, model, rep, unit),
                "",
                md_table(rows),
                "",
                f"- {ratio_line}.",
                f"- {loo_line}.",
                *(f"- {line}" for line in notes),
            ]
        )
        begin, end = PROBLEMS[problem]["markers"]
        write_markdown(Path(args.write), body, begin, end, PROBLEMS[problem]["heading"])
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
