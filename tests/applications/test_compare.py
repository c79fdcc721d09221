"""compare_models and the RBF-kernel SVM (Koh & Liang 2017, §5.1, Figure 4), on bundled digits 3 vs 8.

Measured on this setup (250 training / 107 test images, seed 0): mean Spearman(|I_up,loss|, pixel distance)
over the 84 test points both models classify correctly with SVM margin in (0, 1) is −0.535 for the RBF SVM
(λ = 0.1, t = 0.001) and +0.018 for logistic regression on the frozen CNN features; the kernel SVM's
−I_up,loss/n against exact leave-one-out re-solving on an 80-point subset: Pearson r = 0.986.
"""

import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import influencekit as ik
from influencekit.applications.explain import compare_models
from influencekit.cli import app
from influencekit.core.errors import StationarityWarning
from influencekit.models.kernel_svm import RBFFeatures, fit_rbf_svm, rbf_gamma
from influencekit.models.svm import HingeSVMRetrain
from influencekit.validation import leave_one_out
from influencekit_paper.image_problem import binary_image_problem

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    return binary_image_problem(classes=(3, 8))


def _svm_influence(model, train, l2, t=0.001, params="top"):
    task = ik.SmoothHingeTask(model, temperature=t, measurement_temperature=0.0, l2=l2, params=params)
    with warnings.catch_warnings():  # θ̂ minimises the true hinge, not the smooth one
        warnings.simplefilter("ignore", StationarityWarning)
        return ik.Influence(task, train, solver="exact").fit()


@pytest.fixture(scope="module")
def comparison(problem):
    l2 = 0.1
    svm = fit_rbf_svm(*problem.train, l2=l2)
    svm_inf = _svm_influence(svm.model, problem.train, l2)
    X_t, y_t = problem.test
    with torch.no_grad():
        margins = svm_inf.task.margins(svm_inf.task.params(), problem.test)
    from influencekit.applications.attack import predict_labels

    chosen = ((margins > 0) & (margins < 1) & (predict_labels(problem.task, X_t) == y_t)).nonzero().flatten()
    feature_inf = ik.Influence(problem.task, problem.train, solver="exact").fit()
    return compare_models({"rbf": svm_inf, "features": feature_inf}, (X_t[chosen], y_t[chosen]), k=4)


# ------------------------------------------------------------------------------------ the kernel map
def test_exact_kernel_map_reproduces_the_gram_matrix_and_the_kernel_expansion(problem):
    X, y = problem.train
    gamma = rbf_gamma(X)
    svm = fit_rbf_svm(X, y, l2=0.1, feature_map="exact")
    assert svm.feature_map.startswith("exact RBF kernel map")
    flat = X.reshape(len(X), -1)
    K = torch.exp(-gamma * torch.cdist(flat, flat).square())
    Phi = svm.features(X)
    # φ(x_i)ᵀφ(x_j) = K_ij up to the eigenvalues dropped below 1e-10·max: measured ≈ 1e-13
    assert float((Phi @ Phi.T - K).abs().max()) < 1e-8
    # the linear SVM on φ is the kernel SVM: f(x) = Σ αᵢ sᵢ k(xᵢ, x) + b with b = Σ αᵢ sᵢ (penalised bias)
    X_t = problem.test[0]
    alpha_s = torch.as_tensor(svm.solution.alpha * (2.0 * y.numpy() - 1.0))
    K_t = torch.exp(-gamma * torch.cdist(X_t.reshape(len(X_t), -1), flat).square())
    expansion = K_t @ alpha_s + alpha_s.sum()
    with torch.no_grad():
        f = svm.model(X_t)
    assert float((f - expansion).abs().max() / expansion.abs().max()) < 1e-6


def test_fourier_features_approximate_the_kernel(problem):
    X, y = problem.train
    gamma = rbf_gamma(X)
    rff = RBFFeatures.fourier(X[0].numel(), gamma, n_features=4000, seed=1)
    flat = X.reshape(len(X), -1)
    K = torch.exp(-gamma * torch.cdist(flat, flat).square())
    with torch.no_grad():
        Phi = rff(X)
    err = float((Phi @ Phi.T - K).abs().max())
    assert err < 0.1  # O(1/√D): measured 0.054 at D = 4000
    svm = fit_rbf_svm(X, y, l2=0.1, feature_map="fourier", n_features=500)
    assert "random Fourier features" in svm.feature_map and svm.model.top.in_features == 500


# ---------------------------------------------------------------------------------- Figure 4's claim
def test_rbf_svm_influence_falls_off_with_distance_and_the_feature_model_does_not(comparison):
    assert comparison.distance.shape[0] >= 50  # measured 84 test points
    rbf, feat = comparison.mean_spearman("rbf"), comparison.mean_spearman("features")
    # measured: RBF −0.535 (every test point negative: −0.80 .. −0.20), features +0.018
    assert rbf < -0.4
    assert np.all(comparison.spearman["rbf"] < 0)
    assert abs(feat) < 0.15
    assert rbf - feat < -0.35
    # the top helpful points of the RBF SVM are near neighbours: mean distance below the median distance
    near = comparison.distance.gather(1, comparison.helpful["rbf"].indices).mean()
    assert float(near) < float(comparison.distance.median())
    text = comparison.summary()
    assert "rbf" in text and "features" in text and f"{rbf:+.3f}" in text


def test_helpful_points_are_the_most_negative_influences(comparison):
    for name in comparison.names:
        top = comparison.helpful[name]
        values = comparison.influence[name]
        k = top.values.shape[1]
        assert torch.equal(top.values, values.gather(1, top.indices))
        assert torch.equal(top.values, values.sort(dim=1).values[:, :k])  # the k most negative, in order


# ------------------------------------------------------------------------ against exact retraining
def test_kernel_svm_influence_matches_leave_one_out_resolving(problem):
    X, y = problem.train
    X, y = X[:80], y[:80]
    l2 = 0.1
    svm = fit_rbf_svm(X, y, l2=l2, feature_map="exact")
    # the engine on the raw-input model equals the engine on the linear model over φ(X)
    on_inputs = _svm_influence(svm.model, (X, y), l2)
    on_features = _svm_influence(svm.model.top, (svm.features(X), y), l2, params=None)
    X_t, y_t = problem.test
    margins = on_inputs.task.margins(on_inputs.task.params(), (X_t, y_t)).detach()
    t = int(torch.nonzero((margins > 0) & (margins < 1)).flatten()[0])
    a = on_inputs.scores((X_t[[t]], y_t[[t]])).values
    b = on_features.scores((svm.features(X_t[[t]]), y_t[[t]])).values
    assert float((a - b).abs().max() / b.abs().max()) < 1e-9  # measured 0 (identical gradients)
    loo = leave_one_out(
        on_features,
        (svm.features(X_t), y_t),
        test_indices=[t],
        top_k=20,
        n_random=10,
        seed=0,
        retrain=HingeSVMRetrain(svm.solution, l2=l2),
        tol=1e-12,
    )
    assert not loo.not_converged
    # measured Pearson r = 0.986 (Spearman 0.973) on 30 (test, removed point) pairs, 76 of 80 support vectors
    assert loo.pearson > 0.95, loo.pearson


# ----------------------------------------------------------------------------------------- bad input
def test_models_on_different_training_sets_are_refused(problem):
    X, y = problem.train
    feature_inf = ik.Influence(problem.task, problem.train, solver="exact")
    other = ik.Influence(problem.task, (X + 0.01, y), solver="exact")
    with pytest.raises(ik.InputError, match="must be trained on the same training set.*different values"):
        compare_models({"a": feature_inf, "b": other}, problem.test)
    fewer = ik.Influence(problem.task, (X[:100], y[:100]), solver="exact")
    with pytest.raises(ik.InputError, match=r"must be trained on the same training set.*inputs \(100, 1, 8, 8\)"):
        compare_models({"a": feature_inf, "b": fewer}, problem.test)
    with pytest.raises(TypeError, match=r"`models\['b'\]` must be an ik.Influence"):
        compare_models({"a": feature_inf, "b": problem.task}, problem.test)


def test_test_points_of_another_shape_are_refused(problem):
    feature_inf = ik.Influence(problem.task, problem.train, solver="exact")
    X_t, y_t = problem.test
    with pytest.raises(
        ik.InputError, match=r"`test` inputs must have the shape of the training inputs, \(n_test, 1, 8, 8\)"
    ):
        compare_models({"a": feature_inf}, (X_t.reshape(len(X_t), -1), y_t))
    with pytest.raises(ik.InputError, match=r"`test` must hold inputs X \(n, ...\) and labels y \(n,\)"):
        compare_models({"a": feature_inf}, (X_t, y_t[:3]))


def test_rbf_svm_rejects_bad_arguments(problem):
    X, y = problem.train
    with pytest.raises(ik.InputError, match="`feature_map` must be 'auto', 'exact' or 'fourier'. Got 'rbf'"):
        fit_rbf_svm(X, y, feature_map="rbf")
    with pytest.raises(ik.InputError, match="`l2` must be"):
        fit_rbf_svm(X, y, l2=0.0)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_fig4_writes_figures_and_prints_the_correlations(tmp_path):
    out = tmp_path / "fig4"
    result = CliRunner().invoke(app, ["paper", "fig4", "--out", str(out), "--n-plot", "2"])
    assert result.exit_code == 0, result.output
    assert "exact RBF kernel map" in result.output
    rho = {
        m: float(v)
        for m, v in __import__("re").findall(
            r"(RBF SVM \(pixels\)|logistic on CNN features)\s+all ([+-][0-9.]+)", result.output
        )
    }
    assert rho["RBF SVM (pixels)"] < -0.4 and abs(rho["logistic on CNN features"]) < 0.15
    names = sorted(p.name for p in out.iterdir())
    assert names == ["helpful.png", "influence_vs_distance_0.png", "influence_vs_distance_1.png", "report.md"]
    assert "Spearman" in (out / "report.md").read_text()
