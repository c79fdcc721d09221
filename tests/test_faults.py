"""Nothing silently wrong on disk: every stored file is verified before use (checksum written after the file, shape,
dtype, finiteness). A replaced, truncated, NaN-filled or checksum-less file is named in a CorruptFileWarning and
recomputed (score folders, the fitted-solver cache, the gradient store's chunks) — never returned."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.core.errors import CorruptFileWarning


def _fitted(d, cache_dir=None):
    return ik.Influence(
        d.task, d.train, solver="exact", damping=0.01, memory_budget=4 * 8 * 650 * 40, cache_dir=cache_dir
    ).fit()


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


FAULTS = {
    "wrong length": (_replace_with_wrong_length, "changed after it was written"),
    "NaN": (_fill_with_nan, "changed after it was written"),
    "truncated": (_truncate, "changed after it was written"),
    "one value changed": (_flip_one_value, "changed after it was written"),
    "checksum missing": (_drop_checksum, "checksum file is missing"),
}


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


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((40, 300), np.nan), r"it holds 12000 NaN/inf values"),
        (np.zeros((3, 300)), r"it holds shape \(3, 300\) float64, expected \(40, 300\) float64"),
        (np.zeros((40, 300), dtype=np.float32), r"it holds shape \(40, 300\) float32, expected \(40, 300\) float64"),
    ],
)
def test_a_block_written_with_a_valid_checksum_is_still_checked(digits_small, tmp_path, array, message):
    from influencekit.core.folders import save_array

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
    {
        "truncated": _truncate,
        "garbage": lambda p: p.write_bytes(b"not a torch file"),
        "checksum missing": _drop_checksum,
    }[fault](state)
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
        rebuilt = ik.GradientStore.build(
            inf, tmp_path, dim=64, chunk=100, seed=0
        )  # resumes: recomputes that chunk only
    assert torch.equal(rebuilt.scores(d.test).values, reference)
    _fill_with_nan(chunk)  # damaged after the store was opened: scoring refuses it rather than reading NaN scores
    with (
        pytest.warns(CorruptFileWarning),
        pytest.raises(ik.InputError, match="lacks its chunk at rows 100:200; rerun GradientStore.build"),
    ):
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

    monkeypatch.setattr(
        retraining.Retrainer, "run", lambda *a, **k: pytest.fail("retrained before checking the resolution")
    )
    with pytest.raises(
        ik.InputError, match=r"`tol`=1e-09 cannot be reached in float32: .* compute in float64 \(model.double\(\)"
    ):
        ik.leave_one_out(inf, test, test_indices=[0], top_k=5, n_random=5)
    with pytest.raises(ik.InputError, match=r"`tol`=1e-09 cannot be reached in float32"):
        ik.validate_groups(inf, [[0, 1, 2]], test, test_indices=[0])


def test_retraining_that_does_not_move_the_model_is_flagged(float32_logistic):
    inf, test = float32_logistic
    # a fixed budget far too small to move θ̂: the "actual" changes are float32 round-off, the predictions are not
    with pytest.warns(
        ik.ConvergenceWarning,
        match=r"leave-one-out changes are round-off: .*the correlations of this result mean nothing",
    ):
        ik.leave_one_out(
            inf,
            test,
            test_indices=[0, 1],
            top_k=5,
            n_random=5,
            retrain=ik.validation.StepRetrain(steps=1, lr=1e-9, optimizer="sgd"),
        )


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
    with pytest.raises(
        ik.InputError,
        match=rf"the model cannot take the examples of `{side}`: each has \[0\] shape \(7,\) float64"
        r".* expects 5 features per example, in torch.float64.*mat1 and mat2",
    ):
        if side == "train":
            ik.Influence(task, (wrong, y), stationarity_tol=10).fit()
        else:
            ik.Influence(task, (X, y), stationarity_tol=10).fit().scores((wrong[:4], y[:4]))


def test_integer_inputs_get_the_conversion(small):
    model, X, y = small
    with pytest.raises(
        ik.InputError, match=r"shape \(5,\) int64\. .*The inputs are integers: convert them, e.g. X.to\(torch.float64\)"
    ):
        ik.Influence(ik.ClassificationTask(model), (X.long(), y), stationarity_tol=10).fit()


def test_labels_of_shape_n_by_1_are_shown_as_such(small):
    model, X, y = small
    with pytest.raises(
        ik.InputError,
        match=r"must be a 1-D tensor of shape \(n,\)\. Got shape \(n, 1\); flatten them with y.reshape\(-1\)",
    ):
        ik.Influence(ik.ClassificationTask(model), (X, y[:, None]), stationarity_tol=10).fit()


def test_dropout_in_training_mode_is_refused_when_the_influence_is_built(small):
    _, X, y = small
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)).double()
    with pytest.raises(
        ik.InputError, match=r"the model's Dropout '1' is in training mode .*call model.eval\(\) before building"
    ):
        ik.Influence(ik.ClassificationTask(net), (X, y))
    net.eval()
    ik.Influence(ik.ClassificationTask(net), (X, y))  # eval mode: accepted
    # a wrapper left in training mode around modules already in eval (a PooledClassifier around from_pretrained) is fine
    wrapper = torch.nn.Sequential(net)
    wrapper.train(True)
    net.eval()
    ik.Influence(ik.ClassificationTask(wrapper), (X, y))


# ================================================================ LiSSA that tells the truth
class DenseOperator:
    """(A + δI)V for an explicit symmetric A: the operator protocol as LiSSA reads it, with known eigenvalues."""

    capabilities = frozenset({"minibatch"})
    progress = False

    def __init__(self, eigenvalues, damping=0.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=torch.float64, generator=g))
        self.Q, self.evals = Q, torch.as_tensor(eigenvalues, dtype=torch.float64)
        self.A = Q @ torch.diag(self.evals) @ Q.T
        self.damping, self.hvp_count, self.n_params, self.n_examples = damping, 0, len(eigenvalues), 100
        self.dtype, self.device = torch.float64, torch.device("cpu")

    def matvec(self, V, *, damped=True):
        return V @ self.A + (self.damping * V if damped else 0.0)

    def minibatch_matvec(self, V, indices, *, damped=True):  # every "mini-batch" is the whole data set
        return self.matvec(V, damped=damped)


def test_lissa_that_diverges_slowly_is_stopped_at_a_residual_check_with_no_estimate_returned():
    """A negative eigenvalue −0.02 with scale 2: the recursion grows by 1.01 per step along it. With the right-hand
    side 1e-3 along that direction, ‖h_j‖ stays far inside its bound for hundreds of steps; the residual check
    (every 10 steps, deterministic recursion) must stop it once the residual passes 2 and grows, i.e. after about
    log(2000)/log(1.01) ≈ 764 steps, never at the end of depth=100,000."""
    op = DenseOperator(torch.cat([torch.tensor([-0.02]), torch.linspace(0.1, 1.0, 19, dtype=torch.float64)]))
    v = (op.Q[:, 1:].sum(dim=1) / 19**0.5 + 1e-3 * op.Q[:, 0])[None]
    with pytest.warns(ik.CurvatureWarning, match="negative curvature"):
        solver = ik.LissaSolver(depth=100_000, batch_size=1000, scale=2.0, eigen_steps=20).fit(op)
    with pytest.raises(
        ik.SolverDivergenceError,
        match=r"LiSSA diverged after \d+ step\(s\) of repeat 1: its relative residual "
        r"went .* \(factor 1\.0(09|10|11)\d* per step\); no estimate is returned\. "
        r"H \+ δI has negative curvature .*use `damping=0\.04` or more",
    ) as info:
        solver.solve(v)
    steps = int(str(info.value).split("after ")[1].split(" ")[0])
    assert 650 <= steps <= 800, steps


def test_lissa_reports_the_measured_rate_and_the_trend():
    """A converging deterministic recursion: eigenvalues 0.1 and [0.5, 1], scale 2: the slowest mode shrinks by exactly
    1 − 0.1/2 = 0.95 per step (the others by 0.75 or less), which the least-squares fit over the residual checks of
    the second half of the run must measure (to 0.002)."""
    op = DenseOperator(torch.cat([torch.tensor([0.1]), torch.linspace(0.5, 1.0, 19, dtype=torch.float64)]))
    v = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.warns(
        ik.ConvergenceWarning,
        match=r"the residual is converging, measured factor 0\.95\d* per step \(1 − λ_min/scale predicts",
    ):
        x, report = ik.LissaSolver(depth=100, batch_size=1000, scale=2.0, rtol=1e-9).fit(op).solve(v)
    details = report.details
    assert details["trend"] == "converging" and abs(details["measured_rate"] - 0.95) < 2e-3, details
    assert [j for j, _ in details["residual_history"]] == [0, *range(10, 100, 10), 100]
    assert details["residual_history"][-1][1] == pytest.approx(report.relative_residual, rel=1e-12)
    # enough depth: converged, no warning, the same trend reported
    with warnings.catch_warnings():
        warnings.simplefilter("error", ik.ConvergenceWarning)
        x, report = ik.LissaSolver(depth=600, batch_size=1000, scale=2.0, rtol=1e-9).fit(op).solve(v)
    assert report.converged and report.details["trend"] == "converged"
    expected = torch.linalg.solve(op.A, v.T).T
    assert float((x - expected).norm() / expected.norm()) < 1e-9


def test_lissa_far_worse_than_zero_at_the_end_is_refused():
    """Mini-batch Hessians that are 0.3 times the full one (a biased sampler): the recursion converges, to
    (0.3A)⁻¹v, whose relative residual is 1/0.3 − 1 ≈ 2.33 > 2. With no check inside depth (10·n/batch steps
    apart), the final residual must refuse it rather than return it."""
    op = DenseOperator(torch.linspace(0.1, 1.0, 20, dtype=torch.float64))
    op.minibatch_matvec = lambda V, idx, damped=True: 0.3 * op.matvec(V)
    op.n_examples = 10_000
    with pytest.raises(
        ik.SolverDivergenceError,
        match=r"its relative residual went 1 at step 0, 2\.33 at step 3000.*no estimate is returned",
    ):
        ik.LissaSolver(depth=3000, batch_size=10, scale=2.0).fit(op).solve(torch.ones(1, 20, dtype=torch.float64))


def test_advice_names_the_setting_where_the_user_is():
    from influencekit.core.errors import command_line_settings, setting_hint

    assert setting_hint("depth", 2000) == "`solver_options={'depth': 2000}`"
    assert setting_hint("damping", scope="influence") == "`damping`"
    with command_line_settings({"--damping", "--solver-option"}):
        assert setting_hint("depth", 2000) == "`--solver-option depth=2000`"
        assert setting_hint("damping", 0.1, scope="influence") == "`--damping 0.1`"
    with command_line_settings({"--solver"}):
        assert (
            setting_hint("batch_size", 64)
            == "`solver_options={'batch_size': 64}` (from Python; this command has no --solver-option)"
        )
    assert setting_hint("depth") == "`solver_options['depth']`"  # the context is left behind


def test_inspect_with_lissa_advises_command_line_flags(tmp_path):
    from typer.testing import CliRunner

    from influencekit.cli import app

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3))
    rows = ["a,b,c,y"] + [f"{a:.4f},{b:.4f},{c:.4f},{int(a + 0.5 * b > 0)}" for a, b, c in x]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(
        app,
        [
            "inspect",
            str(tmp_path / "t.csv"),
            "--label",
            "y",
            "--out",
            str(tmp_path / "o"),
            "--solver",
            "lissa",
            "--solver-option",
            "depth=3",
            "--solver-option",
            "eigen_steps=5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "LiSSA did not converge" in result.output and "Raise `--solver-option depth=" in result.output, result.output
    assert "solver_options" not in result.output
    report = (tmp_path / "o" / "inspect.json").read_text()
    assert '"depth": 3' in report


def test_a_malformed_solver_option_is_named():
    from typer.testing import CliRunner

    from influencekit.cli import app

    result = CliRunner().invoke(app, ["explain", "--solver", "lissa", "--solver-option", "depth"])
    assert result.exit_code != 0
    assert "--solver-option must be NAME=VALUE (e.g. depth=2000). Got 'depth'." in str(result.exception)


# ================================================================ inspect: identifiers, misclassified rows first
def test_inspect_leaves_identifier_columns_out_with_a_notice(tmp_path):
    """The issue's case: an ID column with 178 distinct values in 178 rows was one-hot encoded. Text IDs and a row
    counter are left out (listed in the summary and the report); naming one in --categorical keeps it."""
    from influencekit.applications.inspect import run_inspect

    rng = np.random.default_rng(1)
    x = rng.normal(size=(178, 2))
    rows = ["patient,visit,a,b,y"] + [
        f"P{1000 + i},{i + 1},{a:.4f},{b:.4f},{int(a - b > 0)}" for i, (a, b) in enumerate(x)
    ]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    result = run_inspect(tmp_path / "t.csv", "y", out_dir=tmp_path / "o", l2=1e-2)
    kinds = {c.name: c.kind for c in result.encoder.columns_}
    assert kinds == {"patient": "identifier", "visit": "identifier", "a": "numeric", "b": "numeric"}
    assert result.metadata["n_features"] == 2
    n_train = len(result.train)
    assert (
        f"notice: left out as identifiers (a value per row, nothing to learn from): 'patient' ({n_train} distinct "
        "values "
        f"in {n_train} rows), 'visit' ({n_train} distinct values in {n_train} rows)"
    ) in result.text
    assert "looks like an identifier" in result.report_path.read_text()
    kept = run_inspect(tmp_path / "t.csv", "y", out_dir=tmp_path / "o2", l2=1e-2, numeric=("visit",))
    assert {c.name: c.kind for c in kept.encoder.columns_}["visit"] == "numeric" and kept.metadata["n_features"] == 3


def test_inspect_lists_the_misclassified_test_rows_first_then_by_loss(tmp_path):
    from influencekit.applications.inspect import run_inspect

    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 2))
    noisy = (x[:, 0] + 0.8 * rng.normal(size=200) > 0).astype(int)  # label noise: some test rows are misclassified
    rows = ["a,b,y"] + [f"{a:.4f},{b:.4f},{t}" for (a, b), t in zip(x, noisy)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    result = run_inspect(tmp_path / "t.csv", "y", out_dir=tmp_path / "o", l2=1e-2, max_test_rows=25)
    wrong = [e["predicted"] != e["label"] for e in result.explained]
    assert 0 < sum(wrong) < len(wrong) and wrong == sorted(
        wrong, reverse=True
    )  # every misclassified one before the rest
    n_wrong = sum(wrong)
    for part in (result.explained[:n_wrong], result.explained[n_wrong:]):
        losses = [e["loss"] for e in part]
        assert losses == sorted(losses, reverse=True)


# ================================================================ SIGKILL mid-write, then resume
def test_sigkill_at_a_random_point_then_resume_is_bit_identical(tmp_path):
    """benchmarks/kill_resume.py with one kill per kind (score folder, gradient store, fitted-solver cache): a child
    process killed with SIGKILL inside the window of its writes; the resume (checksums decide what is reused) must
    return arrays and leave data files equal bit for bit to an uninterrupted run. 20 kills per kind: run the script."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_resume.py"
    out = tmp_path / "kills.json"
    done = subprocess.run(
        [sys.executable, str(script), "--trials", "1", "--seed", "3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert sorted(r["kind"] for r in results) == ["cache", "scores", "store"]
    assert all(r["bit_identical"] for r in results), results
    # each kill fell inside the call (the child works on after its last write, so it cannot have finished)
    assert not any(r["finished_before_kill"] for r in results), results


def test_lissa_self_influence_shows_its_progress(digits_small, capsys):
    """The issue's 580-second self_influence() ran without a bar: with progress=True the LiSSA recursion and the
    self-influence solves each show one (tqdm writes to stderr)."""
    d = digits_small
    inf = ik.Influence(
        d.task,
        d.train,
        solver="lissa",
        damping=0.05,
        progress=True,
        solver_options={"depth": 20, "batch_size": 300, "eigen_steps": 4, "warn": False},
    ).fit()
    capsys.readouterr()
    inf.self_influence()
    err = capsys.readouterr().err
    assert "self-influence solves" in err and "LiSSA recursion" in err, err[-500:]
