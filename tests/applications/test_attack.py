"""The training-set attack (Koh & Liang 2017, §5.2) on a small bundled problem: two digit classes under a
frozen CNN feature extractor with a logistic top layer (applications/attack.py)."""

import re

import pytest
import torch
from typer.testing import CliRunner

import influencekit as ik
from influencekit.applications.attack import predict_labels, training_set_attack
from influencekit.cli import app
from influencekit_paper.image_problem import binary_image_problem
from problems import SHARED_DATA

torch.set_num_threads(1)
SHARED_MNIST = SHARED_DATA / "mnist"


@pytest.fixture(scope="module")
def problem():
    """Digits 3 vs 8 (250 training / 107 test images), CNN extractor frozen, top layer trained (≈3 s)."""
    return binary_image_problem()


def _correct(problem):
    X, y = problem.test
    return (predict_labels(problem.task, X) == y).nonzero().flatten().tolist()


def test_the_problem_is_a_trained_binary_top_layer(problem):
    assert problem.task.param_names == ("top.weight", "top.bias")
    assert problem.train[0].shape[1:] == (1, 8, 8) and set(problem.train[1].tolist()) == {0, 1}
    assert problem.grad_norm <= 1e-9
    assert problem.accuracy > 0.9  # measured 0.972


def test_perturbation_stays_within_eps_and_the_input_range(problem):
    X, y = problem.train
    before = {k: v.clone() for k, v in problem.task.params().items()}
    X_saved = X.clone()
    j = _correct(problem)[0]
    eps = 0.05
    # 5 steps of 0.02 would move a pixel by 0.1 without the projection: the eps bound must be what stops them
    result = training_set_attack(
        problem.task,
        (X, y),
        (problem.test[0][j : j + 1], problem.test[1][j : j + 1]),
        eps=eps,
        step=0.02,
        n_perturb=10,
        max_iter=5,
    )
    delta = result.delta
    assert delta.shape == (10, 1, 8, 8) and result.perturbed.shape == (10, 1, 8, 8)
    assert float(delta.abs().max()) <= eps + 1e-12  # every pixel of every perturbed image
    assert float(delta.abs().max()) >= eps - 1e-12  # and the bound is reached (the projection is active)
    assert float(result.perturbed.min()) >= 0.0 and float(result.perturbed.max()) <= 1.0
    torch.testing.assert_close(result.original, X[result.train_idx])
    assert torch.equal(X, X_saved)  # the caller's training set is not modified
    for name, value in problem.task.params().items():  # the model is restored
        assert torch.equal(value, before[name])
    assert result.losses.shape == (result.iterations + 1, 1)
    assert float(result.losses[-1, 0]) > float(result.losses[0, 0])  # the attack raised the target loss


def test_the_attack_flips_a_target_and_retraining_confirms_it(problem):
    # 10 perturbed training images, eps = 0.1 (1.6 of the 16 grey levels), at most 30 iterations, on the
    # first 6 correctly classified test images: measured 3 of 6 flipped (the 1st, 4th and 6th, after 8, 6
    # and 8 iterations; the others' losses rose from ≤ 2e-4 to 0.13–0.26). Stop at the first flip.
    X_test, y_test = problem.test
    flipped = []
    for j in _correct(problem)[:6]:
        result = training_set_attack(
            problem.task,
            problem.train,
            (X_test[j : j + 1], y_test[j : j + 1]),
            eps=0.1,
            step=0.01,
            n_perturb=10,
            max_iter=30,
        )
        if result.flipped:
            flipped.append(j)
            break
    assert len(flipped) == 1
    # independent check: retrain the top layer on the perturbed training set from the original θ̂ and
    # predict the target again
    j = flipped[0]
    saved = {k: v.clone() for k, v in problem.task.params().items()}
    try:
        assert ik.fit_lbfgs(problem.task, (result.apply(problem.train[0]), problem.train[1]), tol=1e-9).converged
        assert int(predict_labels(problem.task, X_test[j : j + 1])[0]) != int(y_test[j])
    finally:
        with torch.no_grad():
            for name, p in problem.model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
    assert float(result.losses[-1, 0]) > 0.69  # log 2: a flipped binary prediction has loss above it


def test_multi_target_attack_reports_every_target(problem):
    X_test, y_test = problem.test
    group = [j for j in _correct(problem) if int(y_test[j]) == 1][:3]
    result = training_set_attack(
        problem.task, problem.train, (X_test[group], y_test[group]), eps=0.1, step=0.02, n_perturb=2, max_iter=4
    )
    assert result.losses.shape == (result.iterations + 1, 3)
    assert result.flipped_targets.shape == (3,) and result.flipped == bool(result.flipped_targets.all())
    assert float(result.losses[-1].sum()) > float(result.losses[0].sum())  # the summed target loss rose


def test_bad_input_is_refused(problem):
    X_test, y_test = problem.test
    j = _correct(problem)[0]
    target = (X_test[j : j + 1], y_test[j : j + 1])
    with pytest.raises(ik.InputError, match=r"`eps` must be a float in \(0, inf\]. Got 0.0"):
        training_set_attack(problem.task, problem.train, target, eps=0.0, step=0.01)
    with pytest.raises(ik.InputError, match=r"`step` must be a float in \(0, inf\]. Got -0.01"):
        training_set_attack(problem.task, problem.train, target, eps=0.1, step=-0.01)
    wrong = [i for i in range(len(y_test)) if i not in set(_correct(problem))][0]
    with pytest.raises(
        ik.InputError, match=rf"`target` example 0 is already misclassified \(label {int(y_test[wrong])}"
    ):
        training_set_attack(
            problem.task, problem.train, (X_test[wrong : wrong + 1], y_test[wrong : wrong + 1]), eps=0.1, step=0.01
        )
    with pytest.raises(ik.InputError, match=r"`train` inputs must lie in `input_range`=\(0.0, 0.5\)"):
        training_set_attack(problem.task, problem.train, target, eps=0.1, step=0.01, input_range=(0.0, 0.5))
    with pytest.raises(ik.InputError, match=r"`train` inputs must be continuous .* Got dtype torch.int64"):
        training_set_attack(problem.task, (problem.train[0].long(), problem.train[1]), target, eps=0.1, step=0.01)


def test_cli_attack_writes_a_report_and_figures(tmp_path):
    out = tmp_path / "attack"
    args = [
        "attack",
        "--out",
        str(out),
        "--max-targets",
        "2",
        "--n-perturb",
        "1,10",
        "--max-iter",
        "4",
        "--multi-size",
        "2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)%", result.output, flags=re.M)
    assert [(int(k), int(n)) for k, n, _, _ in rows] == [(1, 2), (10, 2)]
    assert "multi-target:" in result.output
    for name in ("report.md", "attack_1.png", "attack_10.png", "attack_multi_3.png", "attack_multi_8.png"):
        assert (out / name).is_file(), name
    assert "| 10 | 2 |" in (out / "report.md").read_text()


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="../shared/data/mnist is absent")
def test_mnist_problem_splits_the_t10k_files():
    mnist = binary_image_problem(mnist=SHARED_MNIST, max_images=600, epochs=1)
    assert "t10k set is split" in mnist.description
    assert mnist.train[0].shape[1:] == (1, 28, 28)
    assert 0.0 <= float(mnist.train[0].min()) and float(mnist.train[0].max()) <= 1.0
    assert mnist.accuracy > 0.8  # 3 vs 8: 88 training / 41 test images, one epoch of pretraining on 312; measured 0.854
