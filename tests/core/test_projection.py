"""Projector: the Johnson–Lindenstrauss property (statistically, with a stated failure probability),
unbiased inner products, and bit-identical results for any chunk size."""

import math

import pytest
import torch
from scipy import stats

import influencekit as ik
from influencekit.core.projection import UNIT, Projector, jl_failure_bound

N_SEEDS = 400
TEST_FAILURE = 1e-6  # the probability, over the choice of seeds, that a correct projector fails these tests


def _fixed_vectors(p: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    X = torch.randn(3, p, generator=g, dtype=torch.float64)
    X[1] = X[1] ** 3  # heavy-tailed coordinates
    X[2, : p // 2] = 0.0  # half sparse
    return X


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_jl_squared_norms_within_eps_with_stated_probability(kind):
    # For each fixed x, Pr[|‖Pᵀx‖²/‖x‖² − 1| > ε] ≤ δ = 2exp(−(ε²/2 − ε³/3)k/2) (Achlioptas 2003, Thm 1.1).
    # Over N independent seeds the number of violations is stochastically below Binomial(N, δ); we allow the
    # count t with Pr[Binomial(N, δ) > t] ≤ 1e-6, so a correct projector fails this test with probability ≤ 1e-6.
    p, k, eps = 700, 64, 0.5
    delta = jl_failure_bound(k, eps)
    assert 0.13 < delta < 0.15  # the bound is informative at this size
    allowed = int(stats.binom.isf(TEST_FAILURE, N_SEEDS, delta))
    X = _fixed_vectors(p)
    ratios = torch.stack(
        [(Projector(p, k, kind=kind, seed=s).project(X) ** 2).sum(1) / (X**2).sum(1) for s in range(N_SEEDS)]
    )  # (seeds, vectors)
    violations = ((ratios - 1).abs() > eps).sum(0)
    assert (violations <= allowed).all(), (violations.tolist(), allowed)
    # E ratio = 1; Var ratio ≤ 2/k (equality for Gaussian; Rademacher is smaller): mean over seeds within
    # 5.5 standard errors (two-sided normal tail 4e-8 per vector)
    se = math.sqrt(2 / k / N_SEEDS)
    assert ((ratios.mean(0) - 1).abs() < 5.5 * se).all(), ratios.mean(0)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_products_unbiased(kind):
    # E[φ(x)ᵀφ(y)] = xᵀy; Var ≤ (‖x‖²‖y‖² + (xᵀy)²)/k (Gaussian, equality). Mean over seeds within 5.5 s.e.
    p, k = 700, 32
    X = _fixed_vectors(p)
    x, y = X[0], X[0] + X[1] / X[1].norm() * X[0].norm()
    exact = float(x @ y)
    vals = torch.tensor(
        [float(Projector(p, k, kind=kind, seed=s).project(torch.stack([x, y])).prod(0).sum()) for s in range(N_SEEDS)]
    )
    se = math.sqrt((float(x @ x) * float(y @ y) + exact**2) / k / N_SEEDS)
    assert abs(float(vals.mean()) - exact) < 5.5 * se, (float(vals.mean()), exact, se)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_chunk_size_does_not_change_a_bit(kind):
    p = 3 * UNIT + 17
    G = torch.randn(9, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = Projector(p, 48, kind=kind, seed=7, chunk=1).project(G)
    for chunk in (UNIT, 2 * UNIT + 1, 10**6):
        assert torch.equal(Projector(p, 48, kind=kind, seed=7, chunk=chunk).project(G), ref)
    G32 = G.float()
    assert torch.equal(
        Projector(p, 48, kind=kind, seed=7, chunk=1).project(G32),
        Projector(p, 48, kind=kind, seed=7, chunk=10**6).project(G32),
    )


def test_project_equals_dense_matrix_product_and_rows_are_independent_of_the_batch():
    p, k = 2 * UNIT + 5, 40
    proj = Projector(p, k, seed=3)
    G = torch.randn(11, p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    P = proj.matrix()
    assert P.shape == (p, k)
    assert torch.allclose(proj.project(G), G @ P, rtol=1e-12, atol=1e-12)  # the slow reference
    assert torch.allclose(proj.matrix(UNIT - 3, UNIT + 9), P[UNIT - 3 : UNIT + 9], rtol=0, atol=0)
    rows = torch.cat([proj.project(G[i : i + 1]) for i in range(len(G))])
    assert torch.allclose(rows, proj.project(G), rtol=1e-13, atol=1e-13)  # batch size: round-off at most


def test_entries_and_seeds():
    k = 64
    R = Projector(1000, k, seed=0).matrix()
    assert set(R.mul(math.sqrt(k)).unique().tolist()) == {-1.0, 1.0}
    assert abs(float(R.mul(math.sqrt(k)).mean())) < 5 / math.sqrt(R.numel())  # fair signs (5 s.e.)
    Gm = Projector(1000, k, kind="gaussian", seed=0).matrix()
    assert abs(float(Gm.var()) * k - 1) < 5 * math.sqrt(2 / Gm.numel())  # variance 1/k (5 s.e.)
    assert not torch.equal(Projector(1000, k, seed=1).matrix(), R)
    assert torch.equal(Projector(1000, k, seed=0).matrix(), R)


def test_errors():
    with pytest.raises(ik.InputError, match="`kind` must be one of 'rademacher', 'gaussian'. Got 'sparse'"):
        Projector(10, 4, kind="sparse")
    with pytest.raises(ik.InputError, match=r"`dim` must be an int in \[1, inf\]. Got 0"):
        Projector(10, 0)
    with pytest.raises(ik.InputError, match=r"`G` must have shape \(B, n_params=10\). Got \(2, 11\)"):
        Projector(10, 4).project(torch.zeros(2, 11))
    with pytest.raises(ik.InputTypeError, match="`G` must be a floating-point"):
        Projector(10, 4).project(torch.zeros(2, 10, dtype=torch.long))
