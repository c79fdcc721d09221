"""Query batching (issue 20, item 5): low-rank queries per layer, scored against layer taps.

References: the engine's own dense scores with the same solver (float64), and numpy-free closed checks of the
randomized SVD. A rank that keeps every block whole must reproduce the dense scores to 1e-10 (relative to the
largest score); a truncated rank is an approximation whose agreement is measured (Spearman, stated below).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from scipy.stats import spearmanr

import influencekit as ik
from influencekit.core.errors import InputError, UnsupportedError
from influencekit.core.spectrum import randomized_svd
from influencekit.data.examples import Examples
from problems import small_cnn_problem as _cnn_problem

TOL = 1e-10  # float64 round-off of the same sums taken in another order


def _sequence_problem(n: int = 80, n_test: int = 10):
    """A dense layer applied at 4 positions per example (T = 4), then mean pooling and a head."""
    torch.manual_seed(1)

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(5, 6)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.inner(x)).mean(dim=1))

    X = torch.randn(n + n_test, 4, 5, dtype=torch.float64)
    y = (X.sum((1, 2)) > 0).long() + (X[:, 0, 0] > 1).long()
    return ik.ClassificationTask(Pooled().double(), l2=1e-2), (X[:n], y[:n]), (X[n:], y[n:])


def _fit(task, train, solver):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the short training is not stationary: irrelevant against the same solver
        return ik.Influence(
            task, train, solver=solver, damping=1e-2, solver_options={"probes": 0} if "kfac" in solver else None
        ).fit()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_randomized_svd_is_exact_on_a_low_rank_batch_and_truncates_like_the_svd():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 40, 3, generator=g, dtype=torch.float64) @ torch.randn(
        5, 3, 70, generator=g, dtype=torch.float64
    )
    U, s, V = randomized_svd(M, 3)
    assert U.shape == (5, 40, 3) and s.shape == (5, 3) and V.shape == (5, 70, 3)
    assert float(((U * s[:, None, :]) @ V.mT - M).abs().max() / M.abs().max()) < TOL
    ref = torch.linalg.svdvals(M)[:, :3]
    assert float(((s - ref).abs() / ref).max()) < TOL
    # a sketch as wide as the matrix falls back to the exact SVD: rank 33 (+ 8 oversampling ≥ 40) of 40 × 70
    N = torch.randn(2, 40, 70, generator=g, dtype=torch.float64)
    U, s, V = randomized_svd(N, 33)
    u_ref, s_ref, vh_ref = torch.linalg.svd(N, full_matrices=False)
    assert float((s - s_ref[:, :33]).abs().max()) < TOL
    assert (
        float(((U * s[:, None, :]) @ V.mT - (u_ref[..., :33] * s_ref[:, None, :33]) @ vh_ref[:, :33]).abs().max()) < TOL
    )


@pytest.mark.parametrize("problem", [_cnn_problem, _sequence_problem], ids=["cnn", "sequence"])
@pytest.mark.parametrize("solver", ["ekfac", "kfac", "exact"])
def test_full_rank_factored_queries_reproduce_the_dense_scores(problem, solver):
    """Every layer forced factored at a rank that keeps it whole: K-FAC's solve from the taps (in the Kronecker
    eigenbasis) and the generic dense solve + SVD must both give the dense scores, the L2 term included."""
    task, train, test = problem()
    inf = _fit(task, train, solver)
    dense = inf.scores(test).values
    _, f = next(inf.gradients_.layer_factors(Examples(test, name="test"), side="test"))
    assert len(f) == len(test[1])
    rank = max(min(b.index.shape) for b in f.blocks)
    queries, report = inf.solver_.low_rank_solve(f, [True] * len(f.blocks), rank)
    assert report.n_rhs == len(f) and queries.describe()["dense"] == []
    assert _relative(inf.training_side_.score_rows(queries, None), dense) < TOL


@pytest.mark.parametrize("solver", ["ekfac", "exact"])
def test_query_rank_approximates_the_dense_scores_and_top_k_follows_it(solver):
    task, train, test = _cnn_problem()
    inf = _fit(task, train, solver)
    dense = inf.scores(test).values
    errors = {}
    for rank in (1, 2, 4):
        low = inf.scores(test, query_rank=rank)
        # Linear(144→12) is cheaper factored, Linear(12→3) up to rank 2 (r·16 < 39); the convolution (36 positions)
        # never
        assert low.metadata["factored"] == (["3", "5"] if rank < 4 else ["3"])
        assert low.metadata["dense"] == (["0"] if rank < 4 else ["0", "5"])
        assert low.metadata["score_space"].startswith("low-rank queries")
        errors[rank] = _relative(low.values, dense)
        rho = min(spearmanr(low.values[i].numpy(), dense[i].numpy())[0] for i in range(len(dense)))
        assert rho > {1: 0.8, 2: 0.9, 4: 0.97}[rank], (rank, rho)
    assert errors[4] < errors[1]
    # top_k with query_rank ranks exactly the low-rank scores
    low = inf.scores(test, query_rank=2).values
    top = inf.top_k(test, k=5, query_rank=2)
    assert torch.equal(top.harmful.indices, low.topk(5, dim=1).indices)
    assert torch.allclose(top.helpful.values, low.topk(5, dim=1, largest=False).values, rtol=0, atol=1e-12)


def test_query_rank_that_keeps_every_layer_whole_is_the_dense_result():
    """At rank 12 no layer is cheaper factored (r·(out + k) ≥ out·k), so all are scored densely: exact."""
    task, train, test = _cnn_problem()
    inf = _fit(task, train, "ekfac")
    low = inf.scores(test, query_rank=12)
    assert low.metadata["factored"] == []
    assert _relative(low.values, inf.scores(test).values) < TOL


def test_query_rank_refuses_what_it_cannot_do(tmp_path):
    task, train, test = _cnn_problem(n=40, n_test=4)
    inf = _fit(task, train, "ekfac")
    with pytest.raises(InputError, match="query_rank"):
        inf.scores(test, query_rank=0)
    with pytest.raises(InputError, match="`folder` and `query_rank`"):
        inf.scores(test, query_rank=2, folder=tmp_path / "s")

    class WithScale(torch.nn.Module):  # a parameter outside any layer
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(36, 3)
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale * self.fc(x.flatten(1))

    other = ik.ClassificationTask(WithScale().double(), l2=1e-2)
    inf = _fit(other, train, "exact")
    with pytest.raises(UnsupportedError, match="'scale'.*params="):
        inf.scores(test, query_rank=2)

    class Embedded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(x).mean(1))

    tokens = torch.randint(0, 10, (30, 5))
    labels = (tokens[:, 0] > 4).long()
    emb = ik.ClassificationTask(Embedded().double(), l2=1e-2)
    inf = _fit(emb, (tokens, labels), "exact")
    with pytest.raises(UnsupportedError, match="nn.Embedding"):
        inf.top_k((tokens[:3], labels[:3]), k=2, query_rank=2)


def test_low_rank_query_blocks_split_the_test_set_without_changing_a_score():
    """Blocks of 5 test points (each its own taps and solve) give the scores of one block, bit for bit up to round-off;
    a dense layer at 4 positions and a factored head on the sequence model."""
    task, train, test = _sequence_problem()
    inf = _fit(task, train, "ekfac")
    whole = inf.scores(test, query_rank=1)
    assert whole.metadata["factored"] == ["head"] and whole.metadata["dense"] == ["inner"]
    blocks = list(inf.queries(test, block=5, query_rank=1))
    assert [lo for lo, _, _ in blocks] == [0, 5] and [r.n_rhs for _, _, r in blocks] == [5, 5]
    parts = torch.cat([inf.training_side_.score_rows(q, None) for _, q, _ in blocks])
    assert _relative(parts, whole.values) < TOL
    assert spearmanr(whole.values.flatten().numpy(), inf.scores(test).values.flatten().numpy())[0] > 0.9


@pytest.mark.parametrize("problem", [_cnn_problem, _sequence_problem], ids=["cnn", "sequence"])
@pytest.mark.parametrize("solver", ["ekfac", "kfac"])
def test_queries_solved_from_test_taps_equal_the_solve_of_their_gradients(problem, solver, monkeypatch):
    """K-FAC/EK-FAC solve dense queries from the test layer taps (solve_taps: a layer with few positions rotated in as
    (gQ_S)ᵀ(ãQ_A), the CNN's 36-position convolution by rotating its formed gradient): the scores equal −solve(G_test)
    G_trainᵀ to 1e-10 relative, and no test gradient row is solved."""
    task, train, test = problem()
    inf = _fit(task, train, solver)
    G_test = inf.gradients_.block(Examples(test), side="test")
    reference = -(inf.solver_.solve(G_test)[0] @ inf.gradients_.block(Examples(train), side="train").T)
    monkeypatch.setattr(type(inf.solver_), "solve", lambda *a, **k: pytest.fail("a block of gradient rows was solved"))
    got = inf.scores(test)
    assert _relative(got.values, reference) < TOL
    assert sum(r["n_rhs"] for r in got.metadata["solve_reports"]) == len(test[1])
