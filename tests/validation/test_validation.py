"""influencekit.validation: leave-one-out retraining, its cache, Pearson/Spearman, LDS and the Figure-2 plot.

The problem is logistic regression on 1,200 digits (the session fixture ``digits``, λ = 1e-3). The
library's trainer (``retrain=None``: fit_lbfgs on a copy, warm-started at Θ̂) is checked pair by pair against
an independent numpy retrainer (``NumpyNewton`` below), which also serves as the ``retrain=`` callable of the
cache tests, where it counts the retrainings.
"""

import math
import os
import time

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import threadpoolctl
import torch

import influencekit as ik
from influencekit.validation import (
    LDSResult,
    LOOResult,
    leave_one_out,
    linear_datamodeling_score,
    pearson,
    plot_loo,
    spearman,
)
from problems import LogisticReference, softmax

# Lipschitz constant of one example's cross-entropy in Θ: ‖∇ℓ‖ = ‖p − e_y‖·‖x̃‖ ≤ √2·√65 (pixels in [0, 1]).
LIPSCHITZ_TEST_LOSS = math.sqrt(2.0) * math.sqrt(65.0)


def weighted_hessian(theta: np.ndarray, X: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float) -> np.ndarray:
    """∇²R_w = Σᵢ (wᵢ/Σw) (diag pᵢ − pᵢpᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ + λI, Θ flattened row-major (LogisticReference.hessian,
    weighted)."""
    Xa = np.concatenate([X, np.ones((len(X), 1))], axis=1)
    P = softmax(Xa @ theta.T)
    C, D1 = theta.shape
    A = (w / w.sum())[:, None, None] * P[:, :, None] * (np.eye(C)[None] - P[:, None, :])  # (n, C, C)
    outer = (Xa[:, :, None] * Xa[:, None, :]).reshape(len(X), D1 * D1)  # (n, D1²)
    H = (A.reshape(len(X), C * C).T @ outer).reshape(C, C, D1, D1).transpose(0, 2, 1, 3).reshape(C * D1, C * D1)
    return H + l2 * np.eye(C * D1)


class NumpyNewton:
    """Independent retraining in numpy float64, usable as ``retrain=``: chord-Newton steps from Θ̂ on R_w,
    Θ ← Θ − H⁻¹∇R_w(Θ), until ‖∇R_w‖ < 1e-12 (the iteration of tests/validation/test_loo.py, with weights).

    H is H(Θ̂) of the full objective (``cho``, enough to remove one point of 1,200), or, with ``cho=None``,
    the Hessian of R_w at Θ̂ (needed for subsets of half the data). Counts its calls; raises
    KeyboardInterrupt at call number ``interrupt_at`` to simulate a user stopping a run.
    """

    def __init__(self, ref: LogisticReference, cho=None) -> None:
        self.ref, self.cho = ref, cho
        self.calls = 0
        self.interrupt_at: int | None = None

    def solve(self, w: np.ndarray, tol: float = 1e-12) -> tuple[np.ndarray, float]:
        theta = self.ref.theta.copy()
        cho = self.cho
        if cho is None:
            cho = scipy.linalg.cho_factor(weighted_hessian(theta, self.ref.X, self.ref.y, w, self.ref.l2))
        for _ in range(200):
            g = LogisticReference(theta, self.ref.X, self.ref.y, self.ref.l2).mean_grad(w)
            norm = float(np.linalg.norm(g))
            if norm < tol:
                break
            theta = theta - scipy.linalg.cho_solve(cho, g).reshape(theta.shape)
        return theta, norm

    def __call__(self, task, train, weights):
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        X, y = train
        assert np.array_equal(X.numpy(), self.ref.X) and np.array_equal(y.numpy(), self.ref.y)
        theta, _ = self.solve(weights.numpy())
        with torch.no_grad():
            task.model.weight.copy_(torch.from_numpy(theta[:, :-1]))
            task.model.bias.copy_(torch.from_numpy(theta[:, -1]))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module single-threaded (torch and BLAS), restoring the settings afterwards.

    Many small solves and 650×650 factorisations: on a 2-core machine that is busy with other work, two
    threads per library made them 4× (torch) to 200× (scipy's Cholesky) slower than one, and the results do
    not depend on the thread count beyond round-off.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpoolctl.threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def numpy_retrain(digits):
    """A factory of fresh NumpyNewton retrainers sharing one Cholesky factor of H(Θ̂)."""
    cho = scipy.linalg.cho_factor(digits.ref.hessian())
    return lambda: NumpyNewton(digits.ref, cho)


@pytest.fixture(scope="module")
def influence(digits):
    return ik.Influence(digits.task, digits.train, solver="exact").fit()


@pytest.fixture(scope="module")
def worst_tests(digits):
    """The 2 highest-loss test points (where influence matters most and the first order is tested hardest)."""
    ref = digits.ref
    losses = ref.test_losses(ref.theta, digits.test[0].numpy(), digits.test[1].numpy())
    return np.argsort(-losses)[:2]


@pytest.fixture(scope="module")
def loo(digits, influence, worst_tests):
    """The paper's recipe on a small selection, with the library's trainer (retrain=None: fit_lbfgs on a copy,
    warm-started at Θ̂, chord-Newton steps on the exact solver's H): 2 test points, each its top 10 by
    |influence| + 5 random."""
    before = {k: v.clone() for k, v in digits.model.state_dict().items()}
    start = time.perf_counter()
    result = leave_one_out(influence, digits.test, test_indices=worst_tests, top_k=10, n_random=5)
    print(f"\n{result.metadata['n_removed']} retrainings with fit_lbfgs: {time.perf_counter() - start:.1f} s")
    for k, v in digits.model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), k
    return result


# ------------------------------------------------------------------------------------ leave-one-out
def test_loo_prediction_matches_retraining(loo, digits, influence, worst_tests):
    assert isinstance(loo, LOOResult)
    # measured: pooled Pearson r = 0.9987, Spearman 0.9978; per test point 0.9989 and 0.9987 (27 distinct
    # removals, 0.6 s with the exact solver's chord-Newton start; ~30 s of plain L-BFGS with a CG influence)
    print(f"pooled Pearson r = {loo.pearson:.4f}, Spearman {loo.spearman:.4f}; per test point {loo.per_test}")
    assert loo.pearson > 0.99
    assert loo.spearman > 0.95
    assert set(loo.per_test) == set(worst_tests.tolist()) and min(loo.per_test.values()) > 0.99
    assert len(loo) == 2 * 15 and not loo.not_converged
    # the bookkeeping: predicted is −I_up,loss/n of the closed form, pair by pair
    closed = -digits.ref.scores(digits.test[0].numpy()[worst_tests], digits.test[1].numpy()[worst_tests]) / 1200
    row_of = {int(t): r for r, t in enumerate(worst_tests)}
    rows = np.array([row_of[int(t)] for t in loo.test_index])
    np.testing.assert_allclose(loo.predicted, closed[rows, loo.train_index], rtol=1e-6, atol=1e-12)
    # the first 10 pairs of each test point are its top 10 by |influence|
    for r, t in enumerate(worst_tests):
        top = np.argsort(-np.abs(closed[r]))[:10]
        assert set(loo.train_index[loo.test_index == t][:10].tolist()) == set(top.tolist())
    # the metadata carries the meaning
    meta = loo.metadata
    assert meta["convention"] == ik.CONVENTION and meta["damping"] == 0.0 and meta["solver"] == "exact"
    assert meta["tol"] == 1e-9 and meta["retrain"] == "influencekit.fit_lbfgs" and meta["retrain_curvature"] == "exact"
    assert meta["n_retrained"] == meta["n_removed"] == 27 and meta["n_from_cache"] == 0
    assert max(meta["retrain_grad_norms"].values()) < 1e-9
    with pytest.raises(ValueError):
        loo.actual[0] = 0.0  # read-only result


def _numpy_loo_change(digits, reference, t: int, i: int) -> tuple[float, float]:
    """Change of test point t's loss when training point i is removed, retrained in numpy; and ‖∇R₋ᵢ‖."""
    w = np.ones(len(digits.ref.y))
    w[i] = 0.0
    theta, norm = reference.solve(w)
    X, y = digits.test[0].numpy()[[t]], digits.test[1].numpy()[[t]]
    return float(digits.ref.test_losses(theta, X, y)[0] - digits.ref.test_losses(digits.ref.theta, X, y)[0]), norm


def _bound(digits, *grad_norms: float) -> float:
    """‖Θ₁ − Θ₂‖ ≤ (g₁ + g₂)/λ for a λ-strongly convex objective, and ℓ_test is LIPSCHITZ_TEST_LOSS-Lipschitz."""
    return LIPSCHITZ_TEST_LOSS * sum(grad_norms) / digits.ref.l2 + 1e-13


def test_actual_changes_equal_independent_numpy_retraining(digits, influence, worst_tests, loo, numpy_retrain):
    reference = numpy_retrain()
    norms = loo.metadata["retrain_grad_norms"]
    # a couple of pairs directly: the largest predicted change of each test point and its last random one
    for t in worst_tests:
        rows = np.flatnonzero(loo.test_index == t)
        for k in (rows[0], rows[-1]):
            i = int(loo.train_index[k])
            expected, norm = _numpy_loo_change(digits, reference, int(t), i)
            assert norm < 1e-12
            print(
                f"test {t}, without {i}: actual {loo.actual[k]:.10f}, numpy {expected:.10f}, |difference| "
                f"{abs(loo.actual[k] - expected):.1g}"
            )
            assert abs(loo.actual[k] - expected) <= _bound(digits, norms[i], norm)
    # every pair, through the `retrain=` path with the numpy retrainer
    theirs = leave_one_out(influence, digits.test, test_indices=worst_tests, top_k=10, n_random=5, retrain=reference)
    assert theirs.metadata["retrain"].endswith("NumpyNewton") and theirs.metadata["retrain_curvature"] is None
    np.testing.assert_array_equal(theirs.train_index, loo.train_index)
    np.testing.assert_array_equal(theirs.predicted, loo.predicted)
    bounds = [_bound(digits, norms[int(i)], theirs.metadata["retrain_grad_norms"][int(i)]) for i in loo.train_index]
    assert (np.abs(theirs.actual - loo.actual) <= bounds).all()
    assert abs(theirs.pearson - loo.pearson) < 1e-6


def test_plain_lbfgs_retraining_with_an_iterative_solver(digits, worst_tests, numpy_retrain):
    """With CG there is no factorised Hessian to start from: fit_lbfgs retrains with L-BFGS + Newton polish."""
    cg = ik.Influence(digits.task, digits.train, solver="cg").fit()
    i = 574  # the training point of largest influence on the worst test point
    res = leave_one_out(cg, digits.test, test_indices=worst_tests[:1], train_indices=[i])
    assert res.metadata["retrain_curvature"] is None and res.metadata["solver"] == "cg" and not res.not_converged
    expected, norm = _numpy_loo_change(digits, numpy_retrain(), int(worst_tests[0]), i)
    assert abs(res.actual[0] - expected) <= _bound(digits, res.metadata["retrain_grad_norms"][i], norm)
    assert abs(res.actual[0]) > 0.1


def test_not_converged_retraining_is_reported_or_raises(digits, influence, worst_tests):
    with pytest.warns(ik.ConvergenceWarning, match=r"1 of 1 leave-one-out retrainings did not reach .*tol=2e-15"):
        res = leave_one_out(influence, digits.test, test_indices=worst_tests, train_indices=[7], tol=2e-15, max_iter=1)
    assert list(res.not_converged) == [7] and res.not_converged[7] > 2e-15
    assert len(res.predicted) == len(res.actual) == 0 and math.isnan(res.pearson)
    with pytest.raises(ik.NumericalError, match=r"retraining without training point 7 did not reach .*strict=False"):
        leave_one_out(
            influence, digits.test, test_indices=worst_tests, train_indices=[7], tol=2e-15, max_iter=1, strict=True
        )
    # a tolerance below the dtype's round-off is refused before any retraining
    with pytest.raises(ik.InputError, match=r"`tol`=1e-30 cannot be reached in float64: .*pass tol >= 1.\de-15"):
        leave_one_out(influence, digits.test, test_indices=worst_tests, train_indices=[7], tol=1e-30)


def test_bad_inputs_are_refused(digits, influence, worst_tests):
    test = digits.test
    with pytest.raises(ik.InputError, match=r"`train_indices` must hold indices in \[0, 1199\] .* Got \[1200\]"):
        leave_one_out(influence, test, test_indices=worst_tests, train_indices=[3, 1200])
    with pytest.raises(ik.InputError, match=r"`train_indices` must hold indices in \[0, 1199\] .* Got \[-1\]"):
        leave_one_out(influence, test, test_indices=worst_tests, train_indices=[-1])
    with pytest.raises(ik.InputError, match=r"`test_indices` must hold indices in \[0, 596\] .* Got \[597\]"):
        leave_one_out(influence, test, test_indices=[597], train_indices=[0])
    with pytest.raises(ik.InputError, match=r"`train_indices` must not repeat an index. Got \[4\]"):
        leave_one_out(influence, test, test_indices=worst_tests, train_indices=[4, 5, 4])
    with pytest.raises(ik.InputTypeError, match=r"`train_indices` must hold integer indices"):
        leave_one_out(influence, test, test_indices=worst_tests, train_indices=np.array([0.5]))
    with pytest.raises(ik.InputError, match=r"`top_k` \+ `n_random` must be between 1 and n_train = 1200"):
        leave_one_out(influence, test, test_indices=worst_tests, top_k=1000, n_random=300)
    with pytest.raises(ik.NotFittedError, match="not fitted"):
        leave_one_out(ik.Influence(digits.task, digits.train), test, train_indices=[0])
    with pytest.raises(ik.InputTypeError, match=r"`retrain` must be None or a callable"):
        leave_one_out(influence, test, test_indices=worst_tests, train_indices=[0], retrain="lbfgs")


def test_retrain_callable_contract(digits, influence, worst_tests):
    def returns_params(task, train, weights):
        return {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}

    def wrong_shape(task, train, weights):
        task.model.weight = torch.nn.Parameter(torch.zeros(10, 63, dtype=torch.float64))

    def retrains_nothing(task, train, weights):
        pass

    def touches_the_users_model(task, train, weights):
        with torch.no_grad():
            digits.model.bias.add_(1.0)

    kw = dict(test_indices=worst_tests, train_indices=[0])
    with pytest.raises(
        ik.InputError, match=r"`retrain` must update the selected parameters .* in place and return None. Got a dict"
    ):
        leave_one_out(influence, digits.test, retrain=returns_params, **kw)
    with pytest.raises(
        ik.InputError, match=r"keep the shape.* Got 'weight' with shape \(10, 63\).*expected \(10, 64\)"
    ):
        leave_one_out(influence, digits.test, retrain=wrong_shape, **kw)
    with pytest.raises(ik.InputError, match=r"left the task's parameters at theta-hat"):
        leave_one_out(influence, digits.test, retrain=retrains_nothing, **kw)
    bias = digits.model.bias.detach().clone()
    try:
        with pytest.raises(ik.InputError, match=r"`retrain` modified the original model"):
            leave_one_out(influence, digits.test, retrain=touches_the_users_model, **kw)
    finally:
        with torch.no_grad():
            digits.model.bias.copy_(bias)  # the session fixture is shared


# -------------------------------------------------------------------------------------------- cache
def test_cache_resumes_and_retrains_only_what_is_missing(digits, influence, worst_tests, numpy_retrain, tmp_path):
    folder = tmp_path / "loo"
    retrain = numpy_retrain()
    kw = dict(test_indices=worst_tests, retrain=retrain, cache_dir=folder)
    first = leave_one_out(influence, digits.test, train_indices=[3, 5, 8], **kw)
    assert retrain.calls == 3 and first.metadata["n_from_cache"] == 0
    # a run stopped by the user after two more retrainings keeps those two
    retrain.interrupt_at = retrain.calls + 3
    with pytest.raises(KeyboardInterrupt):
        leave_one_out(influence, digits.test, train_indices=[3, 5, 8, 13, 21, 34, 55], **kw)
    assert retrain.calls == 6
    retrain.interrupt_at = None
    resumed = leave_one_out(influence, digits.test, train_indices=[3, 5, 8, 13, 21, 34, 55], progress=True, **kw)
    assert retrain.calls == 8  # only 34 and 55 were missing
    assert resumed.metadata["n_from_cache"] == 5 and resumed.metadata["n_retrained"] == 2
    fresh = leave_one_out(
        influence,
        digits.test,
        test_indices=worst_tests,
        train_indices=[3, 5, 8, 13, 21, 34, 55],
        retrain=numpy_retrain(),
    )
    np.testing.assert_array_equal(resumed.actual, fresh.actual)
    np.testing.assert_array_equal(resumed.predicted, fresh.predicted)
    again = leave_one_out(influence, digits.test, train_indices=[55, 3], **kw)
    assert retrain.calls == 8 and again.metadata["n_from_cache"] == 2
    names = sorted(os.listdir(folder))
    assert names == [
        "loo-13.npz",
        "loo-21.npz",
        "loo-3.npz",
        "loo-34.npz",
        "loo-5.npz",
        "loo-55.npz",
        "loo-8.npz",
        "manifest.json",
    ]


def test_cache_refuses_another_configuration(digits, influence, worst_tests, numpy_retrain, tmp_path):
    folder = tmp_path / "loo"
    retrain = numpy_retrain()
    leave_one_out(
        influence, digits.test, test_indices=worst_tests, train_indices=[1], retrain=retrain, cache_dir=folder
    )
    with pytest.raises(
        ik.InputError,
        match=r"(?s)different configuration \(differs in: tol\).*stored: .*\"tol\": 1e-09.*requested: .*\"tol\": 1e-10",
    ):
        leave_one_out(
            influence,
            digits.test,
            test_indices=worst_tests,
            train_indices=[1],
            retrain=retrain,
            cache_dir=folder,
            tol=1e-10,
        )
    with pytest.raises(ik.InputError, match=r"differs in: test_fingerprint, test_indices"):
        leave_one_out(influence, digits.test, test_indices=[0, 1], train_indices=[1], retrain=retrain, cache_dir=folder)
    with pytest.raises(ik.InputError, match=r"differs in: retrain"):
        leave_one_out(influence, digits.test, test_indices=worst_tests, train_indices=[1], cache_dir=folder)
    assert retrain.calls == 1


# ------------------------------------------------------------------------------------------ metrics
def test_pearson_and_spearman_match_scipy():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    b = np.array([2.0, 1.0, 4.0, 3.0, 7.0, 7.0])  # a tie for Spearman
    assert pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b)[0], abs=1e-15)
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-15)
    assert pearson(a, 3 * a + 1) == pytest.approx(1.0) and spearman(a, -np.exp(a)) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert pearson(torch.from_numpy(x), list(y)) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-14)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-14)


def test_correlation_inputs_are_checked():
    with pytest.raises(ik.InputError, match=r"`a` and `b` must have the same length. Got lengths 3 and 2"):
        pearson([1, 2, 3], [1, 2])
    with pytest.raises(ik.InputError, match=r"at least 2 points .* Got 1"):
        spearman([1.0], [2.0])
    with pytest.raises(ik.InputError, match=r"`b` is constant .* the correlation is undefined"):
        pearson([1, 2, 3], [4, 4, 4])
    with pytest.raises(ik.InputError, match=r"`a` must hold only finite values. Got NaN/inf at position\(s\) \[1\]"):
        spearman([1, np.nan, 3], [1, 2, 3])
    with pytest.raises(ik.InputError, match=r"`a` must be a 1-D array"):
        pearson(np.ones((2, 2)), np.ones(4))


def test_linear_datamodeling_score(digits, influence):
    start = time.perf_counter()
    res = linear_datamodeling_score(influence, digits.test, n_subsets=10, alpha=0.5, seed=0)
    seconds = time.perf_counter() - start
    assert isinstance(res, LDSResult) and not res.not_converged and res.metadata["retrain"] == "influencekit.fit_lbfgs"
    # measured: LDS = 0.928 (mean over the 597 test points; per test point min 0.455, median 0.952), 10 subsets
    # of 600 of the 1,200 training digits
    print(
        f"LDS = {res.mean:.4f} (per test point: min {np.nanmin(res.per_test):.3f}, median "
        f"{np.nanmedian(res.per_test):.3f}); {seconds:.1f} s"
    )
    assert res.mean > 0.5
    # the retrainings agree with independent numpy ones on the same subsets (Newton with each subset's Hessian)
    retrain = NumpyNewton(digits.ref)
    theirs = linear_datamodeling_score(influence, digits.test, n_subsets=10, alpha=0.5, seed=0, retrain=retrain)
    assert retrain.calls == 10 and not theirs.not_converged
    np.testing.assert_array_equal(theirs.subsets, res.subsets)
    for s in range(10):
        bound = _bound(digits, res.metadata["retrain_grad_norms"][s], theirs.metadata["retrain_grad_norms"][s])
        assert np.abs(theirs.actual[s] - res.actual[s]).max() <= bound
    assert abs(theirs.mean - res.mean) < 1e-3
    assert res.per_test.shape == (597,) and res.predicted.shape == res.actual.shape == (10, 597)
    assert res.subsets.shape == (10, 1200) and (res.subsets.sum(1) == 600).all()
    # the prediction is additive over the removed points
    pred = -digits.ref.scores(digits.test[0].numpy()[:3], digits.test[1].numpy()[:3]) / 1200
    np.testing.assert_allclose(res.predicted[:, :3], (~res.subsets) @ pred.T, rtol=1e-6)
    # per test point, Spearman across subsets
    assert res.per_test[5] == pytest.approx(scipy.stats.spearmanr(res.predicted[:, 5], res.actual[:, 5])[0])
    assert res.metadata["alpha"] == 0.5 and res.metadata["convention"] == ik.CONVENTION
    with pytest.raises(ik.InputError, match=r"`alpha` must be a float in \(0, 1\)"):
        linear_datamodeling_score(influence, digits.test, alpha=1.0, retrain=retrain)
    with pytest.raises(ik.InputError, match=r"`n_subsets` must be an int in \[3, inf\]"):
        linear_datamodeling_score(influence, digits.test, n_subsets=2, retrain=retrain)


# --------------------------------------------------------------------------------------------- plot
def test_plot_writes_a_png(loo, tmp_path):
    path = tmp_path / "loo.png"
    fig = loo.plot(path=path, title="digits, logistic regression")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert ax.get_xlim() == ax.get_ylim()
    assert f"Pearson r = {loo.pearson:.4f}" in ax.get_title() and "digits" in ax.get_title()
    assert "Predicted" in ax.get_xlabel() and "Actual" in ax.get_ylabel()
    fig2 = plot_loo([0.0, 1.0, 2.0], [0.1, 0.9, 2.2])
    assert fig2.axes[0].get_xlim() == fig2.axes[0].get_ylim()
    with pytest.raises(ik.InputError, match=r"same length"):
        plot_loo([0.0, 1.0], [1.0])
