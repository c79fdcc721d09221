"""The engine on a CUDA device gives the CPU's answers (skipped where no GPU is present).

Every test builds the same model on the CPU and on the device, fits both, and compares. Float64 results agree
to round-off (only the order of summation differs); float32 with TF32 or bfloat16 score products agree by
correlation. The data stay on the CPU: the engine moves each batch to the model's device.

``IK_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py`` runs the same tests with the "device" being the CPU,
which checks the tests themselves on a machine without a GPU (the comparisons are then CPU against CPU).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.data import load_digits_split
from problems import pearson, relative_error

DEVICE = os.environ.get("IK_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device: these tests compare the engine on a GPU with the CPU (IK_TEST_DEVICE=cpu checks the tests)",
)


def _model(kind: str, device: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if kind == "logistic":
        model = nn.Linear(64, 10)
    elif kind == "mlp":
        model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    else:  # a CNN on the 8×8 digits, for the convolution taps and factors
        model = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
    return model.to(device=device, dtype=dtype)


@pytest.fixture(scope="module")
def trained() -> dict:
    """Each model trained once on the CPU in float64 (the state both devices load)."""
    (X, y), (Xt, yt) = load_digits_split(300, seed=0)
    states = {}
    for kind in ("logistic", "mlp", "cnn"):
        model = _model(kind, "cpu", torch.float64)
        ik.fit_lbfgs(ik.ClassificationTask(model, l2=1e-3), (X, y), tol=1e-8, max_iter=500, warn=False)
        states[kind] = model.state_dict()
    return {"train": (X, y), "test": (Xt[:20], yt[:20]), "states": states}


def _influence(trained: dict, kind: str, device: str, dtype: torch.dtype = torch.float64, **options) -> ik.Influence:
    model = _model(kind, device, dtype)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in trained["states"][kind].items()})
    X, y = trained["train"]
    task = ik.ClassificationTask(model, l2=1e-3)
    return ik.Influence(task, (X.to(dtype), y), stationarity_tol=1e9, **options).fit()


# float64: the same numbers up to the order of summation. Arnoldi and LiSSA draw from a CPU generator on every
# device, EK-FAC uses the expected Fisher (its sampled labels come from a generator on the model's device).
CASES = [
    ("logistic", "exact", {}, 1e-10),
    ("logistic", "cg", {"rtol": 1e-12}, 1e-9),
    ("logistic", "arnoldi", {"rank": 650}, 1e-6),
    ("mlp", "exact", {}, 1e-8),
    ("mlp", "lissa", {"depth": 50, "warn": False}, 1e-8),
    ("mlp", "ekfac", {"fisher": "expected"}, 1e-8),
    ("cnn", "ekfac", {"fisher": "expected"}, 1e-8),
    ("cnn", "cg", {"rtol": 1e-12}, 1e-8),
]


@pytest.mark.parametrize("kind,solver,options,tol", CASES, ids=[f"{k}-{s}" for k, s, _, _ in CASES])
def test_device_scores_equal_the_cpu(trained, kind, solver, options, tol):
    opts = {"solver": solver, "damping": 0.01, "solver_options": options}
    cpu = _influence(trained, kind, "cpu", **opts)
    dev = _influence(trained, kind, DEVICE, **opts)
    a, b = cpu.scores(trained["test"]).values, dev.scores(trained["test"]).values
    assert b.device.type == torch.device(DEVICE).type
    assert relative_error(b.cpu(), a) < tol
    assert relative_error(dev.self_influence().cpu(), cpu.self_influence()) < tol
    if kind == "cnn":  # the convolution taps were used on the device too
        assert dev.gradient_methods_["train"] == "layers"


def test_float32_precisions_on_the_device(trained):
    # float32 on the device: TF32 products and bfloat16 score products against the float64 CPU scores
    ref = _influence(trained, "mlp", "cpu", solver="exact", damping=0.01).scores(trained["test"]).values
    for precision, r_min in (("full", 0.99999), ("tf32", 0.999), ("bf16", 0.999)):
        inf = _influence(trained, "mlp", DEVICE, torch.float32, solver="cg", damping=0.01, precision=precision)
        Xt, yt = trained["test"]
        got = inf.scores((Xt.float(), yt)).values.cpu().double()
        r = pearson(got.numpy(), ref.numpy())
        print(f"{DEVICE} float32 precision={precision}: Pearson {r:.6f} against float64 on the CPU")
        assert r >= r_min
    assert torch.get_float32_matmul_precision() == "highest"


def test_gradient_store_on_the_device(tmp_path, trained):
    # the projection is drawn on the gradients' device (another random matrix than the CPU's): both stores
    # approximate the same projected-Fisher scores, and a second build on the device reuses every file
    cpu = ik.GradientStore.build(
        _influence(trained, "logistic", "cpu", solver="cg"), tmp_path / "cpu", dim=2048, chunk=100
    )
    inf = _influence(trained, "logistic", DEVICE, solver="cg")
    dev = ik.GradientStore.build(inf, tmp_path / "dev", dim=2048, chunk=100)
    a, b = cpu.scores(trained["test"]).values, dev.scores(trained["test"]).values.cpu()
    assert pearson(a.numpy(), b.numpy()) > 0.99
    again = ik.GradientStore.build(inf, tmp_path / "dev", dim=2048, chunk=100)
    assert torch.equal(again.scores(trained["test"]).values.cpu(), b)
    assert np.isfinite(b.numpy()).all()


@pytest.mark.parametrize("solver", ["ekfac", "exact"])
def test_low_rank_queries_on_the_device(trained, solver):
    """Query batching (scores with query_rank): the seeded sketch is drawn on the CPU, so the device's low-rank
    queries and scores equal the CPU's to round-off (float64)."""
    results = {}
    for device in ("cpu", DEVICE):
        inf = _influence(trained, "cnn", device, solver=solver, damping=1e-2)
        results[device] = inf.scores(trained["test"], query_rank=2)
    cpu, dev = results["cpu"], results[DEVICE]
    assert dev.metadata["factored"] == cpu.metadata["factored"] == ["5"]
    assert relative_error(dev.values.cpu(), cpu.values) < 1e-8
