"""Every bad input gives a clear error whose message names the problem and the fix.

Each test checks the exception (or warning) class *and* a distinctive part of its message with
``pytest.raises(..., match=...)``. Tests marked ``xfail(strict=True)`` describe how the library *should*
behave where it currently gives a silent wrong number, a bare Python/torch exception, or an unhelpful
message; remove the marker once ``src/`` is fixed.

Problems are tiny (``nn.Linear(5, 3).double()`` on 40 random points) so the file runs in seconds.
"""

from __future__ import annotations

import copy
import math
import re
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, TensorDataset

import influencekit as ik

# StationarityWarning is the subject of only a few tests here (they use pytest.warns, which records it
# regardless of this filter); everywhere else an untrained model is fine and the warning is noise.
pytestmark = pytest.mark.filterwarnings("ignore::influencekit.StationarityWarning")

N, D, C = 40, 5, 3
L2 = 1e-2


# ---------------------------------------------------------------------------------------- fixtures
def make_data(n: int = N, d: int = D, c: int = C, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return X, y


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y): 40 float64 points in 5-D with labels in {0, 1, 2}. Tests clone before modifying."""
    return make_data()


@pytest.fixture(scope="module")
def trained_model(data) -> nn.Module:
    """Multiclass logistic regression trained to a stationary point (used read-only; tests deep-copy it)."""
    torch.manual_seed(0)
    model = nn.Linear(D, C).double()
    report = ik.fit_lbfgs(ik.ClassificationTask(model, l2=L2), data)
    assert report.converged
    return model


@pytest.fixture
def task(trained_model) -> ik.ClassificationTask:
    """A fresh task over a private copy of the trained model."""
    return ik.ClassificationTask(copy.deepcopy(trained_model), l2=L2)


@pytest.fixture(scope="module")
def fitted(trained_model, data) -> ik.Influence:
    """A fitted exact-solver Influence on the trained model (tests only read from it)."""
    task = ik.ClassificationTask(copy.deepcopy(trained_model), l2=L2)
    return ik.Influence(task, data, solver="exact").fit()


def untrained_task(out: int = C, *, l2: float = L2, seed: int = 0) -> ik.ClassificationTask:
    torch.manual_seed(seed)
    return ik.ClassificationTask(nn.Linear(D, out).double(), l2=l2)


class ConcaveTask(ik.Task):
    """loss = -(f(x) - y)²: its Hessian is negative definite, so θ is a maximum, not a minimum."""

    def loss(self, params, batch):
        x, t = batch
        return -((self.forward(params, x).squeeze(-1) - t) ** 2)


def concave_problem(data):
    X, _ = data
    g = torch.Generator().manual_seed(1)
    y_reg = X @ torch.randn(D, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    return ConcaveTask(nn.Linear(D, 1).double()), (X, y_reg)


class InfAtTask(ik.Task):
    """Cross-entropy, except that the loss is ``fill`` (+inf by default) for the examples whose first feature is in
    ``bad_x0``."""

    def __init__(self, model, bad_x0, *, fill=math.inf, **kw):
        super().__init__(model, **kw)
        self.bad_x0 = bad_x0
        self.fill = fill

    def loss(self, params, batch):
        x, t = batch
        out = nn.functional.cross_entropy(self.forward(params, x), t, reduction="none")
        bad = torch.zeros_like(out, dtype=torch.bool)
        for v in self.bad_x0:
            bad = bad | (x[:, 0] == v)
        return torch.where(bad, torch.full_like(out, self.fill), out)


class SqrtAbsTask(ik.Task):
    """loss = sqrt(|w·x|): finite everywhere, but its gradient is NaN (inf · 0) at an example with x = 0."""

    def loss(self, params, batch):
        x, t = batch
        return torch.sqrt(self.forward(params, x).squeeze(-1).abs()) + 0.0 * t


# =========================================================================== data shape and length
@pytest.mark.parametrize("side", ["train", "test"])
def test_mismatched_lengths_of_X_and_y(task, data, fitted, side):
    X, y = data
    pattern = (
        r"the same number of examples \(first dimension\)\. Got lengths \[40, 39\]; check that X and y come from the "
        r"same split"
    )
    with pytest.raises(ik.InputError, match=rf"`{side}` must hold tensors with {pattern}"):
        if side == "train":
            ik.Influence(task, (X, y[:-1])).fit()
        else:
            fitted.scores((X, y[:-1]))


def test_mismatched_lengths_in_fit_lbfgs(task, data):
    X, y = data
    with pytest.raises(ik.InputError, match=r"Got lengths \[40, 39\]; check that X and y come from the same split"):
        ik.fit_lbfgs(task, (X, y[:-1]))


def test_mismatched_lengths_is_a_value_error(task, data):
    X, y = data
    with pytest.raises(ValueError, match="same number of examples"):  # ordinary `except ValueError` code works
        ik.Influence(task, (X[:10], y)).fit()


# =========================================================================================== dtypes
@pytest.mark.parametrize("side", ["train", "test"])
def test_float32_data_with_float64_model(task, data, fitted, side):
    X, y = data
    pattern = (
        rf"`{side}` must hold floating tensors of the model's dtype torch\.float64\. Got torch\.float32\. "
        r"Convert the data with \.to\(torch\.float64\) or the model with \.to\(torch\.float32\)"
    )
    with pytest.raises(ik.InputError, match=pattern):
        if side == "train":
            ik.Influence(task, (X.float(), y)).fit()
        else:
            fitted.scores((X[:3].float(), y[:3]))


def test_float64_numpy_data_with_float32_model(data):
    X, y = data
    torch.manual_seed(0)
    task = ik.ClassificationTask(nn.Linear(D, C))  # float32 parameters
    with pytest.raises(
        ik.InputError,
        match=r"model's dtype torch\.float32\. Got torch\.float64\. Convert the data with \.to\(torch\.float32\)",
    ):
        ik.Influence(task, (X.numpy(), y.numpy())).fit()


def test_float32_regression_targets_with_float64_model(data):
    X, y = data
    torch.manual_seed(0)
    task = ik.RegressionTask(nn.Linear(D, 1).double())
    with pytest.raises(ik.InputError, match=r"model's dtype torch\.float64\. Got torch\.float32"):
        ik.Influence(task, (X, y.float())).fit()


def test_mixed_parameter_dtypes(data):
    model = nn.Sequential(nn.Linear(D, 4).double(), nn.Linear(4, C).float())
    task = ik.ClassificationTask(model)
    with pytest.raises(
        ik.InputError, match=r"parameters must share one floating dtype\. .*convert the model with model\.to\(dtype\)"
    ):
        ik.Influence(task, data).fit()


@pytest.mark.parametrize("side", ["train", "test"])
def test_float_labels_for_multiclass_classification(task, data, fitted, side):
    X, y = data
    pattern = (
        r"ClassificationTask labels in `(train|test)` must be integer class indices \(torch\.long\)\. Got dtype "
        r"torch\.float64; convert them with y\.long\(\)"
    )
    with pytest.raises(ik.InputError, match=pattern):
        if side == "train":
            ik.Influence(task, (X, y.double())).fit()
        else:
            fitted.scores((X[:3], y[:3].double()))


def test_float_labels_in_fit_lbfgs(task, data):
    X, y = data
    with pytest.raises(ik.InputError, match=r"integer class indices.*convert them with y\.long\(\)"):
        ik.fit_lbfgs(task, (X, y.double()))


@pytest.mark.parametrize("side, bad", [("train", 3), ("test", 7), ("test", -1)])
def test_multiclass_labels_out_of_range(task, data, fitted, side, bad):
    X, y = data
    y_bad = y.clone()
    y_bad[5] = bad
    with pytest.raises(ik.InputError, match=r"(?i)label") as excinfo:
        if side == "train":
            ik.Influence(task, (X, y_bad)).fit()
        else:
            fitted.scores((X[:8], y_bad[:8]))
    assert str(bad) in str(excinfo.value) and str(C) in str(excinfo.value)


def test_multiclass_label_minus_100_is_refused(fitted, data):
    X, y = data
    with pytest.raises(ik.InputError, match=r"(?i)label"):
        fitted.scores((X[:2], torch.tensor([0, -100])))


def test_multiclass_labels_of_shape_n_by_1(task, data):
    X, y = data
    with pytest.raises(ik.InputError, match=r"(?i)label.*(1-D|shape)"):
        ik.Influence(task, (X, y[:, None])).fit()


@pytest.mark.parametrize("labels", ["minus_one_plus_one", "zero_one_two"])
def test_binary_labels_must_be_zero_or_one(data, labels):
    X, y = data
    y_bad = (y > 0).double() * 2 - 1 if labels == "minus_one_plus_one" else y.clone()
    torch.manual_seed(0)
    task = ik.ClassificationTask(nn.Linear(D, 1).double(), l2=L2)
    with pytest.raises(ik.InputError, match=r"must be 0 or 1"):
        ik.Influence(task, (X, y_bad), solver="exact").fit()


# ============================================================================ non-finite inputs
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_train_inputs(task, data, bad):
    X, y = data
    X = X.clone()
    X[7, 2] = bad
    with pytest.raises(
        ik.InputError,
        match=r"`train` must hold only finite values\. Got NaN/inf in example\(s\) \[7\]; remove or impute them",
    ):
        ik.Influence(task, (X, y)).fit()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("method", ["scores", "top_k"])
def test_non_finite_test_inputs(fitted, data, bad, method):
    X, y = data
    Xt = X[:6].clone()
    Xt[4, 0] = bad
    with pytest.raises(
        ik.InputError,
        match=r"`test` must hold only finite values\. Got NaN/inf in example\(s\) \[4\]; remove or impute them",
    ):
        getattr(fitted, method)((Xt, y[:6]))


def test_non_finite_regression_targets(data):
    X, _ = data
    y = X.sum(dim=1)
    y[12] = math.nan
    torch.manual_seed(0)
    task = ik.RegressionTask(nn.Linear(D, 1).double())
    with pytest.raises(
        ik.InputError, match=r"`train` must hold only finite values\. Got NaN/inf in example\(s\) \[12\]"
    ):
        ik.Influence(task, (X, y)).fit()


def test_non_finite_inputs_in_fit_lbfgs(task, data):
    X, y = data
    X = X.clone()
    X[3, 1] = math.nan
    with pytest.raises(ik.InputError, match=r"Got NaN/inf in example\(s\) \[3\]; remove or impute them"):
        ik.fit_lbfgs(task, (X, y))


def test_non_finite_inputs_in_a_dataset(task, data):
    X, y = data
    X = X.clone()
    X[21, 0] = math.inf
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=False)
    with pytest.raises(ik.InputError, match=r"Got NaN/inf in example\(s\) \[21\]"):
        ik.Influence(task, loader).fit()


# ==================================================================== non-finite model parameters
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_non_finite_parameters(task, data, bad, name):
    with torch.no_grad():
        getattr(task.model, name).view(-1)[1] = bad
    with pytest.raises(
        ik.InputError,
        match=rf"the model parameter '{name}' holds NaN/inf values; influence needs a finite trained model",
    ):
        ik.Influence(task, data).fit()


def test_non_finite_frozen_parameter(data):
    """A NaN in a parameter outside the selection shows up as a non-finite loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)).double()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    task = ik.ClassificationTask(model, params="2")
    with pytest.raises(
        ik.NumericalError, match=r"loss of the first example is not finite; check the model and the data"
    ):
        ik.Influence(task, data).fit()


# =============================================================================== non-finite loss
def test_non_finite_loss_on_a_train_example(trained_model, data):
    X, y = data
    task = InfAtTask(copy.deepcopy(trained_model), [float(X[7, 0])], l2=L2)
    with pytest.raises(
        ik.NumericalError, match=r"the loss is not finite for `train` example\(s\) \[7\]: check those examples"
    ):
        ik.Influence(task, (X, y)).fit()


def test_non_finite_loss_on_the_first_train_example(trained_model, data):
    X, y = data
    task = InfAtTask(copy.deepcopy(trained_model), [float(X[0, 0])], l2=L2)
    with pytest.raises(ik.NumericalError, match=r"the loss of the first example is not finite"):
        ik.Influence(task, (X, y)).fit()


def test_non_finite_loss_on_a_test_example(trained_model, data):
    X, y = data
    # the bad example (index 3 of the test set) is not in the training set, so fit succeeds
    task = InfAtTask(copy.deepcopy(trained_model), [float(X[3, 0])], l2=L2)
    inf = ik.Influence(task, (X[4:], y[4:])).fit()
    with pytest.raises(ik.NumericalError, match=r"the loss is not finite for `test` example\(s\) \[3\]"):
        inf.scores((X[:6], y[:6]))


def test_nan_loss_in_fit_lbfgs(trained_model, data):
    X, y = data
    task = InfAtTask(copy.deepcopy(trained_model), [float(X[7, 0])], fill=math.nan, l2=L2)
    with pytest.raises(
        ik.NumericalError,
        match=r"training objective or its gradient is not finite during L-BFGS; check the data and the model",
    ):
        ik.fit_lbfgs(task, (X, y))


def test_inf_loss_in_fit_lbfgs(trained_model, data):
    X, y = data
    task = InfAtTask(copy.deepcopy(trained_model), [float(X[7, 0])], l2=L2)
    with pytest.raises(ik.NumericalError, match=r"not finite"):
        ik.fit_lbfgs(
            task, (X, y), tol=1.0, max_iter=5, warn=False
        )  # loose settings only keep the current (failing) run short


def test_non_finite_gradient_on_a_train_example(data):
    X, _ = data
    X = X.clone()
    X[3] = 0.0
    torch.manual_seed(0)
    task = SqrtAbsTask(nn.Linear(D, 1, bias=False).double())
    with pytest.raises(ik.NumericalError, match=r"(?s)gradient.*\[3\]"):
        ik.Influence(task, (X, X.sum(dim=1))).fit()


def test_non_finite_gradient_on_a_test_example(data):
    X, _ = data
    torch.manual_seed(0)
    task = SqrtAbsTask(nn.Linear(D, 1, bias=False).double())
    inf = ik.Influence(task, (X, X.sum(dim=1))).fit()
    Xt = X[:5].clone()
    Xt[3] = 0.0
    with pytest.raises(ik.NumericalError, match=r"(?s)`test`.*\[3\]"):
        inf.scores((Xt, Xt.sum(dim=1)))


# ====================================================================================== empty data
@pytest.mark.parametrize(
    "make",
    [
        lambda X, y: (X[:0], y[:0]),
        lambda X, y: X[:0],
        lambda X, y: {"x": X[:0], "y": y[:0]},
        lambda X, y: TensorDataset(X[:0], y[:0]),
        lambda X, y: DataLoader(TensorDataset(X[:0], y[:0]), shuffle=False),
    ],
    ids=["tuple", "tensor", "dict", "dataset", "dataloader"],
)
def test_empty_train_data(task, data, make):
    with pytest.raises(ik.InputError, match=r"`train` must hold at least one example\. Got an empty data set"):
        ik.Influence(task, make(*data)).fit()


@pytest.mark.parametrize("empty", [(), [], {}], ids=["tuple", "list", "dict"])
def test_train_data_without_tensors(task, empty):
    with pytest.raises(ik.InputError, match=r"`train` must hold at least one tensor\. Got an empty"):
        ik.Influence(task, empty).fit()


@pytest.mark.parametrize("method", ["scores", "top_k"])
def test_empty_test_data(fitted, data, method):
    X, y = data
    with pytest.raises(ik.InputError, match=r"`test` must hold at least one example\. Got an empty data set"):
        getattr(fitted, method)((X[:0], y[:0]))


def test_empty_data_in_fit_lbfgs(task, data):
    X, y = data
    with pytest.raises(ik.InputError, match=r"`train` must hold at least one example"):
        ik.fit_lbfgs(task, (X[:0], y[:0]))


# ================================================================ wrong types of data and objects
@pytest.mark.parametrize("train", ["data.csv", 42, None], ids=["str", "int", "None"])
def test_unusable_train_data_type(task, train):
    with pytest.raises(
        ik.InputTypeError,
        match=r"`train` must be a tensor, an \(X, y\) tuple, a dict of tensors, a map-style torch Dataset or a "
        r"DataLoader",
    ):
        ik.Influence(task, train).fit()


def test_object_numpy_array(task, data):
    X, y = data
    with pytest.raises(ik.InputTypeError, match=r"numpy array of dtype object; convert it with astype\(float\)"):
        ik.Influence(task, (X.numpy().astype(object), y.numpy())).fit()


def test_bare_tensor_for_a_supervised_task(fitted, data):
    X, _ = data
    with pytest.raises(
        ik.InputError,
        match=r"ClassificationTask needs batches of \(inputs, target\)\. Got a Tensor; pass the data as an \(X, "
        r"y\) tuple",
    ):
        fitted.scores(X[:3])


def test_task_must_be_a_task(trained_model, data):
    with pytest.raises(
        ik.InputTypeError,
        match=r"`task` must be an influencekit Task \(e\.g\. ik\.ClassificationTask\(model\)\)\. Got Linear",
    ):
        ik.Influence(trained_model, data)


def test_model_must_be_a_module():
    with pytest.raises(ik.InputTypeError, match=r"`model` must be a torch\.nn\.Module\. Got function"):
        ik.ClassificationTask(lambda x: x)


# ============================================================================ parameter selection
def test_model_with_no_trainable_parameters(trained_model):
    model = copy.deepcopy(trained_model).requires_grad_(False)
    with pytest.raises(
        ik.InputError,
        match=r"`model` must have at least one trainable parameter.*unfreeze the parameters.*or pass `params=`",
    ):
        ik.ClassificationTask(model)


def test_model_without_any_parameters():
    with pytest.raises(ik.InputError, match=r"at least one trainable parameter"):
        ik.RegressionTask(nn.Identity())


def test_params_names_a_missing_parameter(trained_model):
    with pytest.raises(
        ik.InputError,
        match=r"`params` names 'fc', which is neither a parameter nor a module of the model\. Parameters are: weight, "
        r"bias",
    ):
        ik.ClassificationTask(trained_model, params="fc")


def test_params_names_a_missing_module_in_a_list():
    model = nn.Sequential(nn.Linear(D, 4), nn.Linear(4, C)).double()
    with pytest.raises(
        ik.InputError, match=r"`params` names '2'.*Parameters are: 0\.weight, 0\.bias, 1\.weight, 1\.bias"
    ):
        ik.ClassificationTask(model, params=["1", "2"])


@pytest.mark.parametrize("params", [[], lambda name, p: False], ids=["empty-list", "callable-selects-none"])
def test_params_selects_nothing(trained_model, params):
    with pytest.raises(
        ik.InputError, match=r"`params` selects no parameter of the model\. .*name at least one parameter or module"
    ):
        ik.ClassificationTask(trained_model, params=params)


def test_params_of_the_wrong_type(trained_model):
    with pytest.raises(ik.InputTypeError, match=r"`params` must be None, parameter/module names, or a callable"):
        ik.ClassificationTask(trained_model, params=[0, 1])


# ============================================================================================ k
@pytest.mark.parametrize("k", [N + 1, 1000, 0, -3])
def test_top_k_with_k_out_of_range(fitted, data, k):
    X, y = data
    with pytest.raises(ik.InputError, match=rf"`k` must be an int in \[1, {N}\]\. Got {k}"):
        fitted.top_k((X[:2], y[:2]), k=k)


@pytest.mark.parametrize("which", ["helpful", "harmful"])
@pytest.mark.parametrize("k", [N + 1, 0])
def test_scores_helpful_harmful_with_k_out_of_range(fitted, data, which, k):
    X, y = data
    scores = fitted.scores((X[:2], y[:2]))
    with pytest.raises(ik.InputError, match=rf"`k` must be an int in \[1, {N}\]\. Got {k}"):
        getattr(scores, which)(k)


@pytest.mark.parametrize("k", [2.0, "5", True])
def test_k_of_the_wrong_type(fitted, data, k):
    X, y = data
    with pytest.raises(ik.InputTypeError, match=r"`k` must be an int in \[1, 40\]\. Got .* of type"):
        fitted.top_k((X[:2], y[:2]), k=k)


# ===================================================================================== not fitted
@pytest.mark.parametrize(
    "call",
    [
        lambda inf, X, y: inf.scores((X[:2], y[:2])),
        lambda inf, X, y: inf.top_k((X[:2], y[:2]), k=3),
        lambda inf, X, y: inf.self_influence(),
        lambda inf, X, y: inf.params_influence([0]),
        lambda inf, X, y: inf.unflatten(torch.zeros(18)),
        lambda inf, X, y: inf.n_params,
    ],
    ids=["scores", "top_k", "self_influence", "params_influence", "unflatten", "n_params"],
)
def test_methods_before_fit(task, data, call):
    inf = ik.Influence(task, data)
    with pytest.raises(
        ik.NotFittedError, match=r"this Influence is not fitted yet\. Call \.fit\(\) before computing scores"
    ):
        call(inf, *data)


@pytest.mark.parametrize("solver", [ik.ExactSolver(), ik.CGSolver(), ik.LissaSolver()], ids=["exact", "cg", "lissa"])
def test_solver_solve_before_fit(solver):
    with pytest.raises(
        ik.NotFittedError,
        match=rf"this {type(solver).__name__} is not fitted yet\. Call fit\(operator\) before solve\(\)",
    ):
        solver.solve(torch.zeros(2, 18, dtype=torch.float64))


def test_exact_quadratic_form_before_fit():
    with pytest.raises(ik.NotFittedError, match=r"Call fit\(operator\) before solve\(\)"):
        ik.ExactSolver().quadratic_form(torch.zeros(2, 18, dtype=torch.float64))


def test_not_fitted_is_a_runtime_error(task, data):
    with pytest.raises(RuntimeError, match="not fitted yet"):
        ik.Influence(task, data).self_influence()


# ========================================================================================= solvers
def test_unknown_solver_name(task, data):
    with pytest.raises(
        ik.InputError,
        match=r"`solver` must be one of 'exact', 'cg', 'lissa', 'arnoldi', 'kfac', 'ekfac' or a Solver instance\. Got "
        r"'newton'",
    ):
        ik.Influence(task, data, solver="newton")


def test_solver_of_the_wrong_type(task, data):
    with pytest.raises(
        ik.InputTypeError, match=r"`solver` must be a name or a Solver instance\. Got CGSolver|Got type"
    ):
        ik.Influence(task, data, solver=ik.CGSolver)  # the class, not an instance


def test_solver_instance_with_solver_options(task, data):
    with pytest.raises(
        ik.InputError,
        match=r"`solver_options` apply only when `solver` is a name\. Got an instance and options \['rtol'\]",
    ):
        ik.Influence(task, data, solver=ik.CGSolver(), solver_options={"rtol": 1e-6})


def test_unknown_solver_option(task, data):
    with pytest.raises(ik.InfluenceKitError, match=r"(?s)max_iter.*bogus"):
        ik.Influence(task, data, solver="cg", solver_options={"bogus": 1})


def test_exact_solver_above_max_params(task, data):
    inf = ik.Influence(task, data, solver="exact", solver_options={"max_params": 10})
    with pytest.raises(
        ik.UnsupportedError,
        match=r"this model has 18 selected parameters, above `max_params`=10.*Use solver='cg' or solver='lissa', "
        r"restrict `params=`",
    ):
        inf.fit()


# ============================================================================ bad hyper-parameters
BAD_SETTINGS = [
    # (id, call, exception, message pattern)
    (
        "damping<0",
        lambda t, d: ik.Influence(t, d, damping=-0.1),
        ik.InputError,
        r"`damping` must be a float in \[0, inf\]\. Got -0\.1",
    ),
    (
        "damping=nan",
        lambda t, d: ik.Influence(t, d, damping=math.nan),
        ik.InputError,
        r"`damping` must be a float in \[0, inf\]\. Got nan",
    ),
    (
        "damping=inf",
        lambda t, d: ik.Influence(t, d, damping=math.inf),
        ik.InputError,
        r"`damping` must be a float in \[0, inf\]\. Got inf",
    ),
    (
        "damping=str",
        lambda t, d: ik.Influence(t, d, damping="0.1"),
        ik.InputTypeError,
        r"`damping` must be a float in \[0, inf\]\. Got '0\.1' of type str",
    ),
    (
        "l2<0",
        lambda t, d: ik.ClassificationTask(t.model, l2=-1e-3),
        ik.InputError,
        r"`l2` must be a float in \[0, inf\]\. Got -0\.001",
    ),
    (
        "l2=nan",
        lambda t, d: ik.RegressionTask(t.model, l2=math.nan),
        ik.InputError,
        r"`l2` must be a float in \[0, inf\]\. Got nan",
    ),
    ("cg-rtol=0", lambda t, d: ik.CGSolver(rtol=0.0), ik.InputError, r"`rtol` must be a float in \(0, 1\]\. Got 0\.0"),
    (
        "cg-rtol<0",
        lambda t, d: ik.CGSolver(rtol=-1e-6),
        ik.InputError,
        r"`rtol` must be a float in \(0, 1\]\. Got -1e-06",
    ),
    ("cg-rtol>1", lambda t, d: ik.CGSolver(rtol=2.0), ik.InputError, r"`rtol` must be a float in \(0, 1\]\. Got 2\.0"),
    (
        "cg-atol<0",
        lambda t, d: ik.CGSolver(atol=-1.0),
        ik.InputError,
        r"`atol` must be a float in \[0, inf\]\. Got -1\.0",
    ),
    (
        "cg-max_iter=0",
        lambda t, d: ik.CGSolver(max_iter=0),
        ik.InputError,
        r"`max_iter` must be an int in \[1, inf\]\. Got 0",
    ),
    (
        "cg-max_iter=float",
        lambda t, d: ik.CGSolver(max_iter=10.0),
        ik.InputTypeError,
        r"`max_iter` must be an int in \[1, inf\]\. Got 10\.0 of type float",
    ),
    (
        "cg-options-via-influence",
        lambda t, d: ik.Influence(t, d, solver="cg", solver_options={"rtol": 0}),
        ik.InputError,
        r"`rtol` must be a float in \(0, 1\]\. Got 0",
    ),
    (
        "lissa-depth=0",
        lambda t, d: ik.LissaSolver(depth=0),
        ik.InputError,
        r"`depth` must be an int in \[1, inf\]\. Got 0",
    ),
    (
        "lissa-repeats=0",
        lambda t, d: ik.LissaSolver(repeats=0),
        ik.InputError,
        r"`repeats` must be an int in \[1, inf\]\. Got 0",
    ),
    (
        "lissa-batch_size=0",
        lambda t, d: ik.LissaSolver(batch_size=0),
        ik.InputError,
        r"`batch_size` must be an int in \[1, inf\]\. Got 0",
    ),
    (
        "lissa-scale<0",
        lambda t, d: ik.LissaSolver(scale=-10.0),
        ik.InputError,
        r"`scale` must be a float in \(0, inf\]\. Got -10\.0",
    ),
    (
        "lissa-scale=0",
        lambda t, d: ik.LissaSolver(scale=0.0),
        ik.InputError,
        r"`scale` must be a float in \(0, inf\]\. Got 0\.0",
    ),
    (
        "lissa-scale_margin<1",
        lambda t, d: ik.LissaSolver(scale_margin=0.5),
        ik.InputError,
        r"`scale_margin` must be a float in \[1, inf\]\. Got 0\.5",
    ),
    (
        "lissa-eigen_steps=1",
        lambda t, d: ik.LissaSolver(eigen_steps=1),
        ik.InputError,
        r"`eigen_steps` must be an int in \[2, inf\]\. Got 1",
    ),
    (
        "lissa-rtol=0",
        lambda t, d: ik.LissaSolver(rtol=0.0),
        ik.InputError,
        r"`rtol` must be a float in \(0, inf\]\. Got 0\.0",
    ),
    (
        "lissa-seed<0",
        lambda t, d: ik.LissaSolver(seed=-1),
        ik.InputError,
        r"`seed` must be an int in \[0, inf\]\. Got -1",
    ),
    (
        "exact-max_params=0",
        lambda t, d: ik.ExactSolver(max_params=0),
        ik.InputError,
        r"`max_params` must be an int in \[1, inf\]\. Got 0",
    ),
    (
        "exact-eig_dtype=str",
        lambda t, d: ik.ExactSolver(eig_dtype="float64"),
        ik.InputError,
        r"`eig_dtype` must be a floating torch\.dtype or None\. Got 'float64'",
    ),
    (
        "exact-eig_dtype=int",
        lambda t, d: ik.ExactSolver(eig_dtype=torch.int64),
        ik.InputError,
        r"`eig_dtype` must be a floating torch\.dtype or None\. Got torch\.int64",
    ),
    (
        "memory_budget=lots",
        lambda t, d: ik.Influence(t, d, memory_budget="lots"),
        ik.InputError,
        r"`memory_budget` must be a positive number of bytes or a string like '512MB' or '2GiB'\. Got 'lots'",
    ),
    (
        "memory_budget=-5MB",
        lambda t, d: ik.Influence(t, d, memory_budget="-5MB"),
        ik.InputError,
        r"`memory_budget` must be a positive number of bytes.*Got '-5MB'",
    ),
    (
        "memory_budget=2XB",
        lambda t, d: ik.Influence(t, d, memory_budget="2XB"),
        ik.InputError,
        r"`memory_budget` must be a positive number of bytes.*Got '2XB'",
    ),
    (
        "memory_budget=GB",
        lambda t, d: ik.Influence(t, d, memory_budget="GB"),
        ik.InputError,
        r"`memory_budget` must be a positive number of bytes.*Got 'GB'",
    ),
    (
        "memory_budget=0",
        lambda t, d: ik.Influence(t, d, memory_budget=0),
        ik.InputError,
        r"`memory_budget` must be an int in \[1, inf\]\. Got 0",
    ),
    (
        "memory_budget=float",
        lambda t, d: ik.Influence(t, d, memory_budget=1.5e9),
        ik.InputTypeError,
        r"`memory_budget` must be an int in \[1, inf\]\. Got 1500000000\.0 of type float",
    ),
    (
        "batch_size=0",
        lambda t, d: ik.Influence(t, d, batch_size=0),
        ik.InputError,
        r"`batch_size` must be an int in \[1, inf\]\. Got 0",
    ),
    (
        "stationarity_tol<0",
        lambda t, d: ik.Influence(t, d, stationarity_tol=-1.0),
        ik.InputError,
        r"`stationarity_tol` must be a float in \[0, inf\]\. Got -1\.0",
    ),
    (
        "fit_lbfgs-tol<0",
        lambda t, d: ik.fit_lbfgs(t, d, tol=-1.0),
        ik.InputError,
        r"`tol` must be a float in \[0, inf\]\. Got -1\.0",
    ),
    (
        "fit_lbfgs-max_iter=0",
        lambda t, d: ik.fit_lbfgs(t, d, max_iter=0),
        ik.InputError,
        r"`max_iter` must be an int in \[1, inf\]\. Got 0",
    ),
    (
        "fit_lbfgs-batch_size=0",
        lambda t, d: ik.fit_lbfgs(t, d, batch_size=0),
        ik.InputError,
        r"`batch_size` must be an int in \[1, inf\]\. Got 0",
    ),
]


@pytest.mark.parametrize("call, exc, pattern", [b[1:] for b in BAD_SETTINGS], ids=[b[0] for b in BAD_SETTINGS])
def test_bad_hyper_parameters(task, data, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(task, data)


@pytest.mark.parametrize("budget", ["inf", "1e400", "infGB"])
def test_memory_budget_infinite_string(task, data, budget):
    with pytest.raises(ik.InputError, match=r"`memory_budget` must be a positive number of bytes"):
        ik.Influence(task, data, memory_budget=budget)


# ============================================================================= data loaders
@pytest.mark.parametrize(
    "make",
    [
        lambda ds: DataLoader(ds, batch_size=8, shuffle=True),
        lambda ds: DataLoader(ds, batch_size=8, sampler=RandomSampler(ds)),
    ],
    ids=["shuffle=True", "RandomSampler"],
)
def test_shuffling_dataloader(task, data, make):
    loader = make(TensorDataset(*data))
    with pytest.raises(
        ik.InputError,
        match=r"`train` must be a DataLoader that keeps the dataset order \(shuffle=False, no sampler\)\. Got a "
        r"DataLoader with a RandomSampler.*pass DataLoader\(dataset, shuffle=False\) or the dataset itself",
    ):  # noqa: E501
        ik.Influence(task, loader).fit()


def test_shuffling_dataloader_on_the_test_side(fitted, data):
    loader = DataLoader(TensorDataset(*data), batch_size=8, shuffle=True)
    with pytest.raises(ik.InputError, match=r"`test` must be a DataLoader that keeps the dataset order"):
        fitted.scores(loader)


class _Stream(IterableDataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __iter__(self):
        return iter(zip(self.X, self.y))


@pytest.mark.parametrize("wrap", [False, True], ids=["IterableDataset", "DataLoader(IterableDataset)"])
def test_iterable_dataset(task, data, wrap):
    source = _Stream(*data)
    if wrap:
        source = DataLoader(source, batch_size=8)
    with pytest.raises(
        ik.UnsupportedError,
        match=r"`train` is (a DataLoader over )?an IterableDataset, which cannot be indexed\. .*Pass a "
        r"map-style Dataset "
        r"\(one with __len__ and __getitem__\)",
    ):
        ik.Influence(task, source).fit()


def test_dataset_without_len(task, data):
    class NoLen(Dataset):
        def __getitem__(self, i):
            return data[0][i], data[1][i]

    with pytest.raises(ik.InputTypeError, match=r"`train` must be a Dataset with __len__\. Got NoLen without it"):
        ik.Influence(task, NoLen()).fit()


# ===================================================================================== dict batches
@pytest.mark.parametrize("side", ["train", "test"])
def test_dict_batch_missing_keys(task, data, fitted, side):
    X, y = data
    pattern = (
        r"a dict batch must have the keys `input_key`='x' and `target_key`='y'\. Got keys \['features', 'label'\]; "
        r"pass input_key=/target_key= to the task"
    )
    with pytest.raises(ik.InputError, match=pattern):
        if side == "train":
            ik.Influence(task, {"features": X, "label": y}).fit()
        else:
            fitted.scores({"features": X[:3], "label": y[:3]})


def test_dict_batch_fix_from_the_message_works(trained_model, data):
    """The fix the message names (input_key=/target_key=) does work."""
    X, y = data
    task = ik.ClassificationTask(copy.deepcopy(trained_model), l2=L2, input_key="features", target_key="label")
    inf = ik.Influence(task, {"features": X, "label": y}, solver="exact").fit()
    assert inf.self_influence().shape == (N,)


# ================================================================================ params_influence
@pytest.mark.parametrize(
    "idx, shown",
    [(N, r"\[40\]"), ([0, 5, 99], r"\[99\]"), (-1, r"\[-1\]"), (torch.tensor([3, 40]), r"\[40\]")],
    ids=["n", "list-99", "negative", "tensor"],
)
def test_params_influence_out_of_range(fitted, idx, shown):
    with pytest.raises(
        ik.InputError, match=rf"`idx` must hold indices in \[0, 39\] \(the training set has 40 points\)\. Got {shown}"
    ):
        fitted.params_influence(idx)


@pytest.mark.parametrize("idx", [[], torch.tensor([], dtype=torch.long), ()], ids=["list", "tensor", "tuple"])
def test_params_influence_empty(fitted, idx):
    with pytest.raises(ik.InputError, match=r"`idx` must name at least one training point\. Got an empty selection"):
        fitted.params_influence(idx)


@pytest.mark.parametrize("idx", [torch.tensor([1.0, 2.0]), 2.5, None], ids=["float-tensor", "float", "None"])
def test_params_influence_wrong_index_type(fitted, idx):
    with pytest.raises(ik.InputTypeError, match=r"`idx` must (hold integer indices|be an int or a sequence of ints)"):
        fitted.params_influence(idx)


@pytest.mark.parametrize("idx", [[1.5], np.array([0.7])], ids=["list", "numpy"])
def test_params_influence_non_integral_indices(fitted, idx):
    with pytest.raises(ik.InputTypeError, match=r"`idx` must"):
        fitted.params_influence(idx)


@pytest.mark.parametrize("idx", ["12", "3"])
def test_params_influence_string_index(fitted, idx):
    with pytest.raises(ik.InputTypeError, match=r"`idx` must be an int or a sequence of ints"):
        fitted.params_influence(idx)


def test_unflatten_wrong_length(fitted):
    with pytest.raises(ik.InputError, match=r"`vector` must end in n_params = 18\. Got shape \(3, 17\)"):
        fitted.unflatten(torch.zeros(3, 17))


# ===================================================================================== V for solvers
@pytest.mark.parametrize(
    "shape, shown",
    [((2, 17), "(2, 17)"), ((17,), "(1, 17)"), ((2, 3, 18), "(2, 3, 18)"), ((18, 2), "(18, 2)")],
    ids=["k-by-17", "vector-17", "3d", "transposed"],
)
@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_solver_V_of_the_wrong_shape(trained_model, data, fitted, solver, shape, shown):
    if solver == "exact":
        s = fitted.solver_
    else:
        task = ik.ClassificationTask(copy.deepcopy(trained_model), l2=L2)
        s = ik.Influence(task, data, solver="cg").fit().solver_
    with pytest.raises(
        ik.InputError, match=rf"`V` must have shape \(k, n_params\) = \(k, 18\)\. Got {re.escape(shown)}"
    ):
        s.solve(torch.zeros(*shape, dtype=torch.float64))


def test_solver_V_with_nan(fitted):
    V = torch.ones(2, 18, dtype=torch.float64)
    V[1, 4] = math.nan
    with pytest.raises(ik.InputError, match=r"`V` must hold only finite values\. Got NaN/inf"):
        fitted.solver_.solve(V)


# ======================================================================== LiSSA scale far too small
def test_lissa_scale_far_too_small_diverges_quickly(task, data):
    X, y = data
    # depth=100_000 would take minutes: the divergence check must stop the recursion at once
    inf = ik.Influence(
        task, data, solver="lissa", solver_options={"scale": 1e-4, "depth": 100_000, "eigen_steps": 2}
    ).fit()
    start = time.perf_counter()
    with pytest.raises(
        ik.SolverDivergenceError,
        match=r"LiSSA diverged after \d+ step\(s\) of repeat 1.*`scale`=0\.0001 is below the largest eigenvalue.*leave "
        r"scale unset \(automatic\)",
    ):
        inf.scores((X[:2], y[:2]))
    assert time.perf_counter() - start < 10.0


def test_lissa_divergence_is_a_numerical_error(task, data):
    X, y = data
    inf = ik.Influence(task, data, solver="lissa", solver_options={"scale": 1e-4, "eigen_steps": 2}).fit()
    with pytest.raises(ik.NumericalError, match="diverged"):
        inf.params_influence([0])


def test_lissa_divergence_suggests_a_scale_that_can_work(task, data):
    X, y = data
    solver = ik.LissaSolver(scale=1e-4, depth=100, eigen_steps=5)
    inf = ik.Influence(task, data, solver=solver).fit()
    with pytest.raises(ik.SolverDivergenceError, match=r"'scale': ") as excinfo:
        inf.scores((X[:2], y[:2]))
    suggested = float(re.search(r"Use `solver_options=\{'scale': ([0-9.eE+-]+)\}` ", str(excinfo.value)).group(1))
    assert suggested >= solver.lambda_max_


# ============================================================================ negative curvature
def test_cg_negative_curvature_concave_loss(data):
    task, train = concave_problem(data)
    X, y = train
    inf = ik.Influence(task, train, solver="cg").fit()
    with pytest.raises(
        ik.NumericalError,
        match=r"CG met negative curvature: .* ≤ 0, so H \+ δI is not positive definite \(δ = 0\)\. Raise "
        r"`damping` above "
        r"[0-9.e+-]+ \(non-convex models need it\)",
    ):
        inf.scores((X[:2], y[:2]))


def test_cg_negative_curvature_mlp_away_from_a_minimum(data):
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)).double()
    X, y = data
    inf = ik.Influence(ik.ClassificationTask(mlp), data, solver="cg").fit()
    with pytest.raises(ik.NumericalError, match=r"not positive definite.*Raise `damping`"):
        inf.scores((X[:3], y[:3]))


def test_exact_solver_warns_on_negative_eigenvalues(data):
    task, train = concave_problem(data)
    with pytest.warns(
        ik.CurvatureWarning,
        match=r"H \+ δI has negative eigenvalues \(smallest -[0-9.e+-]+\): θ̂ is not a minimum.*use damping >= "
        r"[0-9.e+-]+",
    ):
        ik.Influence(task, train, solver="exact").fit()


def test_lissa_warns_on_negative_curvature(data):
    task, train = concave_problem(data)
    with pytest.warns(
        ik.CurvatureWarning,
        match=r"H \+ δI has negative curvature.*LiSSA diverges on it\. Use `damping=[0-9.e+-]+` or more",
    ):
        ik.Influence(task, train, solver="lissa", solver_options={"eigen_steps": 3, "depth": 5}).fit()


def test_exact_solver_singular_hessian(data):
    # multiclass softmax without L2: the logits are shift-invariant across classes, so H is singular
    task = untrained_task(l2=0.0)
    with pytest.raises(
        ik.NumericalError,
        match=r"H \+ δI is singular: its smallest eigenvalue is .*Add damping \(e\.g\. damping=[0-9.e+-]+\) or an L2 "
        r"term \(`l2=` of the task\)",
    ):
        ik.Influence(task, data, solver="exact").fit()


# ============================================================================ stationarity
def test_stationarity_warning_names_the_gradient_norm(data):
    inf = ik.Influence(untrained_task(), data, solver="exact")
    with pytest.warns(
        ik.StationarityWarning,
        match=r"far from a stationary point of the training objective: \|\|grad R\(theta\)\|\| = [0-9.e+-]+ > "
        r"stationarity_tol=0\.001\..*train longer or check that `l2` matches",
    ) as record:  # noqa: E501
        inf.fit()
    message = next(str(w.message) for w in record if issubclass(w.category, ik.StationarityWarning))
    shown = float(re.search(r"= ([0-9.e+-]+) >", message).group(1))
    assert shown == pytest.approx(inf.grad_norm_, rel=1e-2)
    assert inf.grad_norm_ > 1e-3


def test_stationarity_warning_with_a_mismatched_l2(trained_model, data):
    """A model trained with l2=1e-2 but described with l2=1.0 is not at a stationary point of that objective."""
    task = ik.ClassificationTask(copy.deepcopy(trained_model), l2=1.0)
    with pytest.warns(ik.StationarityWarning, match=r"\|\|grad R\(theta\)\|\| = "):
        ik.Influence(task, data, solver="exact").fit()


def test_trained_model_gives_no_stationarity_warning(task, data):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ik.StationarityWarning)
        inf = ik.Influence(task, data, solver="exact").fit()
    assert inf.grad_norm_ <= 1e-3


# ====================================================================================== fit_lbfgs
@pytest.mark.parametrize(
    "weights, shown",
    [
        (torch.ones(N - 1), r"\(39,\)"),
        (torch.ones(N, 1), r"\(40, 1\)"),
        (torch.ones(2, N), r"\(2, 40\)"),
        (torch.tensor(1.0), r"\(\)"),
    ],
    ids=["short", "column", "2d", "scalar"],
)
def test_fit_lbfgs_weights_of_the_wrong_shape(task, data, weights, shown):
    with pytest.raises(
        ik.InputError,
        match=r"`weights` must be a finite, non-negative tensor of shape \(40,\) with a positive sum\. Got "
        rf"shape {shown}",
    ):
        ik.fit_lbfgs(task, data, weights=weights)


@pytest.mark.parametrize("bad", ["negative", "nan", "all-zero"])
def test_fit_lbfgs_weights_bad_values(task, data, bad):
    w = torch.ones(N, dtype=torch.float64)
    if bad == "negative":
        w[3] = -1.0
    elif bad == "nan":
        w[3] = math.nan
    else:
        w.zero_()
    with pytest.raises(
        ik.InputError, match=r"`weights` must be a finite, non-negative tensor of shape \(40,\) with a positive sum"
    ):
        ik.fit_lbfgs(task, data, weights=w)
