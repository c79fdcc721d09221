"""Influence(cache_dir=...): a fitted solver is stored once and loaded instead of refitted, with identical scores;
a folder of another configuration (damping, θ̂, data) is refused."""

from __future__ import annotations

import pytest
import torch

import influencekit as ik
from influencekit.engine.persistence import SOLVER_STATE

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # LiSSA's mini-batch noise floor (~0.1 here) is not what these tests are about: they compare two runs bit for bit
    pytest.mark.filterwarnings("ignore::influencekit.core.errors.ConvergenceWarning"),
]

CASES = [
    ("exact", {"method": "eigh"}),
    ("exact", {"method": "cholesky"}),
    ("arnoldi", {"rank": 30, "examples": 200}),
    ("lissa", {"depth": 100, "batch_size": 100}),
    ("kfac", {}),
    ("ekfac", {"probes": 1}),
]


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).double()


@pytest.mark.parametrize("solver, options", CASES)
def test_a_stored_solver_gives_the_same_scores_without_refitting(digits_small, tmp_path, solver, options):
    d = digits_small
    model = _mlp()
    task = ik.ClassificationTask(model, l2=1e-2)

    def fitted() -> ik.Influence:
        with pytest.warns(ik.StationarityWarning):
            return ik.Influence(
                task, d.train, solver=solver, damping=1.0, solver_options=options, cache_dir=tmp_path
            ).fit()

    first = fitted()
    assert not first.solver_loaded_ and (tmp_path / SOLVER_STATE).exists()
    second = fitted()
    assert second.solver_loaded_
    test = (d.test[0][:30], d.test[1][:30])
    a, b = first.scores(test), second.scores(test)
    assert torch.equal(a.values, b.values)  # LiSSA too: its seeded samples are the same
    assert torch.equal(first.self_influence(), second.self_influence())


def test_cg_keeps_no_state_but_the_folder_still_guards_the_configuration(digits_small, tmp_path):
    d = digits_small
    inf = ik.Influence(d.task, d.train, solver="cg", damping=0.01, cache_dir=tmp_path).fit()
    assert not (tmp_path / SOLVER_STATE).exists() and (tmp_path / "manifest.json").exists()
    assert not inf.solver_loaded_
    with pytest.raises(ik.InputError, match="different configuration.*damping"):
        ik.Influence(d.task, d.train, solver="cg", damping=0.1, cache_dir=tmp_path).fit()


def test_another_theta_or_other_data_is_refused(digits_small, tmp_path):
    d = digits_small
    ik.Influence(d.task, d.train, solver="exact", damping=0.01, cache_dir=tmp_path).fit()
    X, y = d.train
    with pytest.raises(ik.InputError, match="differs in: data_fingerprint"):
        ik.Influence(d.task, (X.flip(0), y.flip(0)), solver="exact", damping=0.01, cache_dir=tmp_path).fit()
    moved = torch.nn.Linear(64, 10).double()
    moved.load_state_dict(d.model.state_dict())
    with torch.no_grad():
        moved.bias.add_(1e-9)
    with pytest.raises(
        ik.InputError, match="differs in: theta_fingerprint"
    ):  # 1e-9 keeps ||grad R|| under the tolerance
        ik.Influence(
            ik.ClassificationTask(moved, l2=d.task.l2), d.train, solver="exact", damping=0.01, cache_dir=tmp_path
        ).fit()
