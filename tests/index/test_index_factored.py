"""Factored index rows (issue 17, item 1): a layer seen once per example kept as its layer taps.

Reference: the engine's own Influence.top_k / scores / self_influence with the same fitted solver, float64. The
factored rows hold the same gradient (g ãᵀ) in another form, so the scores agree to round-off: 1e-12 relative to
the largest score (sums of the same products in another order), the indices exactly.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.core.errors import CorruptFileWarning, UnsupportedError
from influencekit.index import InfluenceIndex
from problems import small_cnn_problem

TOL = 1e-12


@pytest.fixture(scope="module")
def cnn():
    return small_cnn_problem(n=120, n_test=16)


def _fit(task, train, solver, options=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the short training is not stationary: irrelevant against the same solver
        options = options or ({"probes": 0} if "kfac" in solver else None)
        return ik.Influence(task, train, solver=solver, damping=1e-2, solver_options=options, **kw).fit()


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("solver, rows", [("ekfac", "auto"), ("kfac", "auto"), ("exact", "factored")])
def test_factored_rows_answer_as_influence_top_k(cnn, tmp_path, solver, rows):
    """The CNN's two Linear layers (one position each) are kept as taps, the convolution (36 positions) as gradient
    entries; chunks of ~22 examples (a 1 MB budget) so that every query crosses chunk borders; the L2 term (1e-2,
    inside each example's loss) is part of the rows' scores."""
    task, train, test = cnn
    inf = _fit(task, train, solver, memory_budget="1MB")
    assert inf.gradients_.chunk < 60
    index = InfluenceIndex.build(inf, tmp_path, test=test, rows=rows)
    assert index.config["space"] == "factored" and index.config["factored"] == ["3", "5"]
    expected, got = inf.top_k(test, k=6), index.explain_test(range(len(test[0])), k=6)
    for part in ("helpful", "harmful"):
        e, g = getattr(expected, part), getattr(got, part)
        assert torch.equal(e.indices, g.indices), part
        assert _close(g.values, e.values) < TOL
    assert got.metadata["score_space"] == "index (parameters, factored rows)"
    assert _close(torch.from_numpy(np.array(index.self_influence())), inf.self_influence()) < TOL
    # storage: 40 conv entries + (145 + 12) + (13 + 3) tap values per example, against 1,819 gradient entries
    stored = sum(
        np.load(p, mmap_mode="r").shape[0] * int(np.prod(np.load(p, mmap_mode="r").shape[1:]))
        for p in list(tmp_path.glob("rows-*.npy")) + list(tmp_path.glob("taps-*.npy"))
    )
    assert stored == len(train[0]) * (40 + 157 + 16)
    # reopened from the folder: the same answers
    again = InfluenceIndex.open(tmp_path, inf).explain_test([0, 5], k=6)
    assert torch.equal(again.harmful.indices, got.harmful.indices[[0, 5]])


def test_two_stage_search_on_factored_rows_returns_exact_scores(cnn, tmp_path):
    """The sketch is the projection of the full gradients; each query's candidates are re-scored from their taps:
    every value returned equals the dense score (1e-12), and with all 120 examples as candidates the answer is the
    exact one."""
    task, train, test = cnn
    inf = _fit(task, train, "ekfac")
    index = InfluenceIndex.build(inf, tmp_path, test=test, sketch_dim=64)
    full = inf.scores(test).values
    approx = index.explain_test(range(8), k=4, candidates=30)
    assert _close(approx.helpful.values, full[:8].gather(1, approx.helpful.indices)) < TOL
    everything = index.explain_test(range(8), k=4, candidates=120)
    assert torch.equal(everything.harmful.indices, inf.top_k((test[0][:8], test[1][:8]), k=4).harmful.indices)


def test_a_damaged_taps_file_is_refused_and_rebuilt(cnn, tmp_path):
    task, train, test = cnn
    inf = _fit(task, train, "ekfac")
    reference = InfluenceIndex.build(inf, tmp_path, test=test).explain_test([1], k=3)
    path = tmp_path / "taps-000000000-1-a.npy"
    path.write_bytes(path.read_bytes()[:-8] + b"XXXXXXXX")
    with pytest.raises(
        ik.InputError,
        match=r"the index file .*taps-000000000-1-a\.npy: its contents changed after it was written.*Rebuild",
    ):
        InfluenceIndex.open(tmp_path, inf).explain_test([1], k=3)
    with pytest.warns(CorruptFileWarning, match=r"taps-000000000-1-a\.npy"):
        rebuilt = InfluenceIndex.build(inf, tmp_path, test=test)
    assert torch.equal(rebuilt.explain_test([1], k=3).helpful.values, reference.helpful.values)


def test_rows_dense_and_bad_rows_are_named(cnn, tmp_path):
    task, train, test = cnn
    inf = _fit(task, train, "ekfac")
    dense = InfluenceIndex.build(inf, tmp_path / "dense", test=test, rows="dense")
    assert dense.config["space"] == "parameters" and dense.config["factored"] is None
    got, expected = dense.explain_test([2], k=3).helpful, inf.top_k((test[0][2:3], test[1][2:3]), k=3).helpful
    # the index multiplies whole rows, top_k adds up per-layer products: the same numbers, another rounding
    assert torch.equal(got.indices, expected.indices)
    assert float((got.values - expected.values).abs().max() / expected.values.abs().max()) < 1e-12
    with pytest.raises(ik.InputError, match=r"`rows` must be one of 'auto', 'dense', 'factored'\. Got 'sparse'"):
        InfluenceIndex.build(inf, tmp_path / "x", rows="sparse")
    arnoldi = _fit(task, train, "arnoldi", {"rank": 20, "remainder": "drop"})
    with pytest.raises(
        ik.InputError, match=r"`rows='factored'` keeps parameter gradients, but this index stores basis rows"
    ):
        InfluenceIndex.build(arnoldi, tmp_path / "y", rows="factored")


def test_an_embedding_model_gets_dense_rows_or_a_named_refusal(tmp_path):
    """Layer taps cover Linear/Conv layers only: `auto` falls back to dense rows, `factored` says why it cannot."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.Flatten(), torch.nn.Linear(6, 2)).double()
    X, y = torch.randint(0, 7, (40, 2)), torch.randint(0, 2, (40,))
    inf = _fit(ik.ClassificationTask(model, l2=1e-2), (X, y), "ekfac")
    assert InfluenceIndex.build(inf, tmp_path / "auto").config["space"] == "parameters"
    with pytest.raises(UnsupportedError, match=r"`rows='factored'` needs layer taps: .*nn\.Embedding"):
        InfluenceIndex.build(inf, tmp_path / "f", rows="factored")


def test_low_rank_queries_scan_factored_rows_as_influence_top_k(cnn, tmp_path):
    """`explain(..., query_rank=r)` scores the same low-rank queries as `Influence.top_k(..., query_rank=r)` against
    the stored taps: equal indices and values to 1e-10 (TOL of tests/core/test_lowrank.py: another order of the sums); a
    rank that keeps every block whole gives the exact answer; a dense index refuses it by name."""
    task, train, test = cnn
    inf = _fit(task, train, "ekfac")
    index = InfluenceIndex.build(inf, tmp_path, test=test)
    for rank in (2, 12):
        expected, got = (
            inf.top_k(test, k=5, query_rank=rank),
            index.explain_test(range(len(test[0])), k=5, query_rank=rank),
        )
        for part in ("helpful", "harmful"):
            e, g = getattr(expected, part), getattr(got, part)
            assert torch.equal(e.indices, g.indices), (rank, part)
            assert _close(g.values, e.values) < 1e-10
        assert got.metadata["search"] == f"low-rank queries (rank {rank})"
    exact = index.explain_test(range(len(test[0])), k=5)
    assert (
        torch.equal(got.harmful.indices, exact.harmful.indices)
        and _close(got.harmful.values, exact.harmful.values) < 1e-10
    )
    dense = InfluenceIndex.build(inf, tmp_path / "dense", rows="dense")
    with pytest.raises(ik.InputError, match=r"`query_rank` scans factored rows .*this index has parameters rows"):
        dense.explain(test, k=3, query_rank=4)
