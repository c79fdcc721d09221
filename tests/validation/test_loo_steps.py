"""Fixed-budget retraining (fit_steps / StepRetrain) with a no-removal control, custom trainers that report
their own convergence, and leave-one-out retraining in worker processes."""

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.data.bundled import load_digits_split
from influencekit.validation import StepRetrain, leave_one_out

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlp():
    """A 64-12-10 tanh MLP on 400 digits in float64, trained by Adam then L-BFGS to ‖∇R‖ < 1e-6."""
    (Xtr, ytr), (Xte, yte) = load_digits_split()
    train, test = (Xtr[:400].double(), ytr[:400]), (Xte.double(), yte)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 12), torch.nn.Tanh(), torch.nn.Linear(12, 10)).double()
    task = ik.ClassificationTask(model, l2=1e-3)
    ik.fit_steps(task, train, steps=1500, lr=1e-2)
    report = ik.fit_lbfgs(task, train, tol=1e-6, max_iter=3000)
    assert report.converged, report
    inf = ik.Influence(task, train, solver="exact", damping=0.01).fit()
    worst = int(torch.argmax(task.loss(task.params(), test)))
    return task, train, test, inf, worst


# ------------------------------------------------------------------------------------------ fit_steps
def test_fit_steps_zero_weight_is_removal_and_minibatches_are_common_random_numbers(mlp):
    task, (X, y), _, _, _ = mlp
    theta0 = {k: v.clone() for k, v in task.model.state_dict().items()}

    def run(data, weights=None, **kw):
        task.model.load_state_dict(theta0)
        report = ik.fit_steps(task, data, steps=20, lr=1e-3, weights=weights, **kw)
        return torch.cat([p.detach().reshape(-1).clone() for p in task.model.parameters()]), report

    w = torch.ones(len(y), dtype=torch.float64)
    w[7] = 0.0
    keep = torch.arange(len(y)) != 7
    a, ra = run((X, y), w)
    b, rb = run((X[keep], y[keep]))
    # full batch: weight 0 on example 7 is the same objective as dropping it (round-off of the sums only)
    assert (a - b).abs().max() < 1e-12
    assert abs(ra.grad_norm - rb.grad_norm) < 1e-12 and ra.iterations == 20 and ra.converged
    # mini-batches: same seed, same draws -> identical runs; another seed -> another run
    c, _ = run((X, y), batch_size=32, seed=3, optimizer="sgd", momentum=0.9)
    d, _ = run((X, y), batch_size=32, seed=3, optimizer="sgd", momentum=0.9)
    e, _ = run((X, y), batch_size=32, seed=4, optimizer="sgd", momentum=0.9)
    assert torch.equal(c, d) and not torch.equal(c, e)
    task.model.load_state_dict(theta0)


def test_fit_steps_descends(mlp):
    """From a perturbed θ, 200 full-batch Adam steps lower the objective and ‖∇R‖ by 10× or more."""
    task, train, _, _, _ = mlp
    theta0 = {k: v.clone() for k, v in task.model.state_dict().items()}
    torch.manual_seed(1)
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    start = ik.fit_steps(task, train, steps=1, lr=1e-12)
    end = ik.fit_steps(task, train, steps=200, lr=3e-3)
    task.model.load_state_dict(theta0)
    assert end.objective < start.objective and end.grad_norm < start.grad_norm / 10, (start, end)


def test_fit_steps_bad_input(mlp):
    task, train, _, _, _ = mlp
    for kw, match in [
        ({"steps": 0, "lr": 1e-3}, "steps"),
        ({"steps": 1, "lr": 0.0}, "lr"),
        ({"steps": 1, "lr": 1e-3, "optimizer": "rmsprop"}, "optimizer"),
        ({"steps": 1, "lr": 1e-3, "momentum": 1.0}, "momentum"),
        ({"steps": 1, "lr": 1e-3, "batch_size": 0}, "batch_size"),
        ({"steps": 1, "lr": 1e-3, "weights": torch.zeros(400, dtype=torch.float64)}, "weights"),
    ]:
        with pytest.raises(ik.InputError, match=match):
            ik.fit_steps(task, train, **kw)
    with pytest.raises(ik.InputError, match="lr"):
        StepRetrain(lr=-1.0)
    with pytest.raises(ik.InputError, match="optimizer"):
        StepRetrain(optimizer="lbfgs")
    big = StepRetrain(steps=3, lr=1e300, optimizer="sgd")
    theta0 = {k: v.clone() for k, v in task.model.state_dict().items()}
    with pytest.raises(ik.NumericalError, match="lower `lr`"):
        big(task, train, torch.ones(400, dtype=torch.float64))
    task.model.load_state_dict(theta0)


# ------------------------------------------------------------------------ leave-one-out with a control
def test_step_retraining_with_control_predicts_loo_on_a_nonconvex_model(mlp, tmp_path):
    """The CNN recipe of the paper on a small MLP: damping 0.01, Adam steps from θ̂, drift subtracted.

    Measured: Pearson r 0.986 (top 20 + 10 random, 500 steps, 600 digits); here 15 pairs, 300 steps."""
    task, train, test, inf, worst = mlp
    retrain = StepRetrain(steps=300, lr=1e-3)
    result = leave_one_out(inf, test, test_indices=[worst], top_k=10, n_random=5, retrain=retrain, cache_dir=tmp_path)
    print(f"\nStepRetrain r = {result.pearson:.4f}, Spearman {result.spearman:.4f}, drift {result.metadata['drift']}")
    assert result.metadata["drift_control"] is True and len(result) == 15
    assert result.pearson > 0.95 and result.spearman > 0.8
    # the bookkeeping, checked independently: actual = m(θ without i) − m(θ control), drift = m(control) − m(θ̂)
    i = int(result.train_index[0])
    theta0 = {k: v.clone() for k, v in task.model.state_dict().items()}
    point = (test[0][[worst]], test[1][[worst]])
    before = float(task.loss(task.params(), point))
    retrain(task, train, torch.ones(400, dtype=torch.float64))
    control = float(task.loss(task.params(), point))
    task.model.load_state_dict(theta0)
    w = torch.ones(400, dtype=torch.float64)
    w[i] = 0.0
    retrain(task, train, w)
    removed = float(task.loss(task.params(), point))
    task.model.load_state_dict(theta0)
    assert result.actual[0] == pytest.approx(removed - control, rel=1e-9, abs=1e-15)
    assert result.metadata["drift"][0] == pytest.approx(control - before, rel=1e-9, abs=1e-15)
    assert (tmp_path / "loo-control.npz").exists()
    # resuming from the cache retrains nothing, the control included, and gives the same numbers
    again = leave_one_out(inf, test, test_indices=[worst], top_k=10, n_random=5, retrain=retrain, cache_dir=tmp_path)
    assert again.metadata["n_retrained"] == 0 and np.array_equal(again.actual, result.actual)
    # without the control the drift is not subtracted, and the cache refuses to mix the two
    with pytest.raises(ik.InputError, match="drift_control"):
        leave_one_out(
            inf, test, test_indices=[worst], top_k=10, n_random=5, retrain=retrain, control=False, cache_dir=tmp_path
        )


def test_workers_give_the_same_results(mlp):
    task, train, test, inf, worst = mlp
    retrain = StepRetrain(steps=20, lr=1e-3)
    kw = dict(test_indices=[worst], top_k=3, n_random=2, retrain=retrain)
    one = leave_one_out(inf, test, **kw)
    two = leave_one_out(inf, test, workers=2, threads=1, **kw)
    assert two.metadata["workers"] == 2
    assert np.array_equal(one.train_index, two.train_index)
    assert np.allclose(one.actual, two.actual, rtol=1e-12, atol=1e-16)


def test_a_trainer_reporting_its_own_convergence(mlp):
    task, train, test, inf, worst = mlp
    calls = []

    def retrain(t, data, weights):
        calls.append(1)
        with torch.no_grad():
            t.model[2].bias.add_(1e-6)  # moves, but is nowhere near the minimum
        return ik.TrainReport(grad_norm=0.5, objective=0.0, iterations=1, converged=len(calls) % 2 == 0)

    with pytest.warns(ik.ConvergenceWarning, match="did not reach"):
        result = leave_one_out(inf, test, test_indices=[worst], top_k=2, n_random=2, retrain=retrain)
    assert len(result.not_converged) == 2 and len(result) == 2  # its own verdict, not ‖∇R‖ ≤ tol
    assert set(result.not_converged.values()) == {0.5}


def test_control_and_workers_are_checked(mlp):
    _, _, test, inf, worst = mlp
    with pytest.raises(ik.InputTypeError, match="control"):
        leave_one_out(inf, test, test_indices=[worst], top_k=1, n_random=0, control="yes")
    with pytest.raises(ik.InputError, match="workers"):
        leave_one_out(inf, test, test_indices=[worst], top_k=1, n_random=0, workers=0)
    with pytest.raises(ik.InputError, match="threads"):
        leave_one_out(inf, test, test_indices=[worst], top_k=1, n_random=0, workers=2, threads=0)
