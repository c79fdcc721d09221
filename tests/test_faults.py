"""Nothing silently wrong on disk: every stored file is verified before use (checksum written after the file, shape,
dtype, finiteness). A replaced, truncated, NaN-filled or checksum-less file is named in a CorruptFileWarning and
recomputed (score folders, the fitted-solver cache, the gradient store's chunks) — never returned."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.errors import CorruptFileWarning


def _fitted(d, cache_dir=None):
    return ik.Influence(d.task, d.train, solver="exact", damping=0.01, memory_budget=4 * 8 * 650 * 40, cache_dir=cache_dir).fit()


def _replace_with_wrong_length(path):
    np.save(path, np.zeros((3, 300)))


def _fill_with_nan(path):
    a = np.load(path)
    np.save(path, np.full_like(a, np.nan))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_one_value(path):  # the same shape, dtype and finiteness: only the checksum can tell
    a = np.load(path)
    a[0, 0] += 1.0
    np.save(path, a)


def _drop_checksum(path):
    path.with_name(path.name + ".sha256").unlink()


FAULTS = {"wrong length": (_replace_with_wrong_length, "changed after it was written"), "NaN": (_fill_with_nan, "changed after it was written"),
          "truncated": (_truncate, "changed after it was written"), "one value changed": (_flip_one_value, "changed after it was written"),
          "checksum missing": (_drop_checksum, "checksum file is missing")}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_damaged_score_file_is_named_and_recomputed(digits_small, tmp_path, fault):
    d = digits_small
    inf = _fitted(d)
    reference = inf.scores(d.test, folder=tmp_path).values
    damage, message = FAULTS[fault]
    victim = tmp_path / "scores-000000040.npy"
    damage(victim)
    with pytest.warns(CorruptFileWarning, match=rf"scores-000000040\.npy: .*{message}.*recomputing") as caught:
        again = inf.scores(d.test, folder=tmp_path)
    assert len([w for w in caught if issubclass(w.category, CorruptFileWarning)]) == 1
    assert again.metadata["score_files_reused"] == 37  # every other file read, the damaged one computed again
    assert torch.equal(again.values, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptFileWarning)  # the rewritten file passes its checks
        assert torch.equal(inf.scores(d.test, folder=tmp_path).values, reference)


@pytest.mark.parametrize("array, message", [
    (np.full((40, 300), np.nan), r"it holds 12000 NaN/inf values"),
    (np.zeros((3, 300)), r"it holds shape \(3, 300\) float64, expected \(40, 300\) float64"),
    (np.zeros((40, 300), dtype=np.float32), r"it holds shape \(40, 300\) float32, expected \(40, 300\) float64"),
])
def test_a_block_written_with_a_valid_checksum_is_still_checked(digits_small, tmp_path, array, message):
    from influencekit.folders import save_array

    d = digits_small
    inf = _fitted(d)
    reference = inf.scores(d.test, folder=tmp_path).values
    save_array(tmp_path / "scores-000000000.npy", array)  # a valid checksum of the wrong contents
    with pytest.warns(CorruptFileWarning, match=r"scores-000000000\.npy: " + message):
        assert torch.equal(inf.scores(d.test, folder=tmp_path).values, reference)


@pytest.mark.parametrize("fault", ["truncated", "garbage", "checksum missing"])
def test_a_damaged_solver_cache_is_named_and_refitted(digits_small, tmp_path, fault):
    d = digits_small
    first = _fitted(d, cache_dir=tmp_path)
    state = tmp_path / "solver-state.pt"
    {"truncated": _truncate, "garbage": lambda p: p.write_bytes(b"not a torch file"), "checksum missing": _drop_checksum}[fault](state)
    with pytest.warns(CorruptFileWarning, match=r"solver-state\.pt: .*refitting the solver"):
        second = _fitted(d, cache_dir=tmp_path)
    assert not second.solver_loaded_
    assert torch.equal(second.self_influence(), first.self_influence())
    third = _fitted(d, cache_dir=tmp_path)  # the refitted state was stored again, with its checksum
    assert third.solver_loaded_


def test_a_damaged_gradient_store_chunk_is_recomputed_by_build_and_refused_by_scoring(digits_small, tmp_path):
    d = digits_small
    inf = _fitted(d)
    store = ik.GradientStore.build(inf, tmp_path, dim=64, chunk=100, seed=0)
    reference = store.scores(d.test).values
    chunk = tmp_path / "grads-000001.npy"
    _flip_one_value(chunk)
    with pytest.warns(CorruptFileWarning, match=r"grads-000001\.npy: .*changed after it was written"):
        rebuilt = ik.GradientStore.build(inf, tmp_path, dim=64, chunk=100, seed=0)  # resumes: recomputes that chunk only
    assert torch.equal(rebuilt.scores(d.test).values, reference)
    _fill_with_nan(chunk)  # damaged after the store was opened: scoring refuses it rather than reading NaN scores
    with pytest.warns(CorruptFileWarning), pytest.raises(ik.InputError, match="lacks its chunk at rows 100:200; rerun GradientStore.build"):
        rebuilt.scores(d.test)


# ------------------------------------------------------------------------------------------ validation resolution
@pytest.fixture(scope="module")
def float32_logistic():
    from influencekit.data import load_digits_split

    (X, y), (Xt, yt) = load_digits_split(300, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)  # float32
    task = ik.ClassificationTask(model, l2=1e-2)
    ik.fit_lbfgs(task, (X.float(), y), tol=1e-5, warn=False)
    inf = ik.Influence(task, (X.float(), y), solver="exact", stationarity_tol=1e-2).fit()
    return inf, (Xt.float(), yt)


def test_float32_leave_one_out_with_an_unreachable_tol_is_refused_before_retraining(float32_logistic, monkeypatch):
    inf, test = float32_logistic
    from influencekit.validation import retraining

    monkeypatch.setattr(retraining.Retrainer, "run", lambda *a, **k: pytest.fail("retrained before checking the resolution"))
    with pytest.raises(ik.InputError, match=r"`tol`=1e-09 cannot be reached in float32: .* compute in float64 \(model.double\(\)"):
        ik.leave_one_out(inf, test, test_indices=[0], top_k=5, n_random=5)
    with pytest.raises(ik.InputError, match=r"`tol`=1e-09 cannot be reached in float32"):
        ik.validate_groups(inf, [[0, 1, 2]], test, test_indices=[0])


def test_retraining_that_does_not_move_the_model_is_flagged(float32_logistic):
    inf, test = float32_logistic
    # a fixed budget far too small to move θ̂: the "actual" changes are float32 round-off, the predictions are not
    with pytest.warns(ik.ConvergenceWarning, match=r"leave-one-out changes are round-off: .*the correlations of this result mean nothing"):
        ik.leave_one_out(inf, test, test_indices=[0, 1], top_k=5, n_random=5,
                         retrain=ik.validation.StepRetrain(steps=1, lr=1e-9, optimizer="sgd"))


# ------------------------------------------------------------------------------------------ the boundary
@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    X = torch.randn(50, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    return torch.nn.Linear(5, 3).double(), X, y


@pytest.mark.parametrize("side", ["train", "test"])
def test_inputs_the_model_cannot_take_are_named_with_the_expected_shape(small, side):
    model, X, y = small
    task = ik.ClassificationTask(model)
    wrong = torch.randn(len(y), 7, dtype=torch.float64)
    with pytest.raises(ik.InputError, match=rf"the model cannot take the examples of `{side}`: each has \[0\] shape \(7,\) float64"
                                            r".* expects 5 features per example, in torch.float64.*mat1 and mat2"):
        if side == "train":
            ik.Influence(task, (wrong, y), stationarity_tol=10).fit()
        else:
            ik.Influence(task, (X, y), stationarity_tol=10).fit().scores((wrong[:4], y[:4]))


def test_integer_inputs_get_the_conversion(small):
    model, X, y = small
    with pytest.raises(ik.InputError, match=r"shape \(5,\) int64\. .*The inputs are integers: convert them, e.g. X.to\(torch.float64\)"):
        ik.Influence(ik.ClassificationTask(model), (X.long(), y), stationarity_tol=10).fit()


def test_labels_of_shape_n_by_1_are_shown_as_such(small):
    model, X, y = small
    with pytest.raises(ik.InputError, match=r"must be a 1-D tensor of shape \(n,\)\. Got shape \(n, 1\); flatten them with y.reshape\(-1\)"):
        ik.Influence(ik.ClassificationTask(model), (X, y[:, None]), stationarity_tol=10).fit()


def test_dropout_in_training_mode_is_refused_when_the_influence_is_built(small):
    _, X, y = small
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)).double()
    with pytest.raises(ik.InputError, match=r"the model's Dropout '1' is in training mode .*call model.eval\(\) before building"):
        ik.Influence(ik.ClassificationTask(net), (X, y))
    net.eval()
    ik.Influence(ik.ClassificationTask(net), (X, y))  # eval mode: accepted
    # a wrapper left in training mode around modules already in eval (a PooledClassifier around from_pretrained) is fine
    wrapper = torch.nn.Sequential(net)
    wrapper.train(True)
    net.eval()
    ik.Influence(ik.ClassificationTask(wrapper), (X, y))
