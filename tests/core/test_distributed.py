"""Sharding across torch.distributed ranks gives the single-process results (2 CPU processes, gloo).

The parent trains the models and computes the single-process results; two spawned ranks load the same
parameters and data (file:// rendezvous in tmp_path), shard the training set, and write what they get.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import influencekit as ik
from influencekit.core.distributed import shard_bounds
from influencekit.core.errors import DistributedError
from problems import digits_logistic, small_mlp

N_TEST = 9
K = 7
# float64 throughout: sharding changes only the order of summation, so results agree to round-off.
TOL = 1e-10


def _logistic_model() -> torch.nn.Module:
    return torch.nn.Linear(64, 10).double()


def _mlp_model() -> torch.nn.Module:
    return small_mlp(d_in=64, hidden=8, d_out=10)


MODELS = {"logistic": _logistic_model, "mlp": _mlp_model}


def _cases() -> list[tuple[str, str, dict]]:
    """(name, solver, Influence options) run in both the single-process and the sharded run."""
    return [
        ("logistic-exact", "exact", {}),
        ("logistic-cg", "cg", {"solver_options": {"rtol": 1e-12}}),
        (
            "logistic-lissa",
            "lissa",
            {"solver_options": {"warn": False, "depth": 30, "eigen_steps": 10, "batch_size": 40}},
        ),
        ("mlp-cg", "cg", {"damping": 0.01, "batch_size": 50, "solver_options": {"rtol": 1e-12}}),
        ("mlp-exact", "exact", {"damping": 0.01}),
        # K-FAC/EK-FAC: factor sums all-reduced across ranks. Sampled labels depend on the global example index
        # only, so with batch_size 50 (chunks start at 60 on rank 1, at 50 and 100 alone) they are unchanged.
        ("logistic-kfac", "kfac", {"solver_options": {"fisher": "expected"}}),
        ("logistic-ekfac", "ekfac", {"batch_size": 40, "solver_options": {"fisher": "empirical", "probes": 0}}),
        ("mlp-kfac", "kfac", {"damping": 0.01, "solver_options": {"fisher": "expected", "probes": 0}}),
        (
            "mlp-ekfac",
            "ekfac",
            {"damping": 0.01, "batch_size": 50, "solver_options": {"fisher": "sampled", "samples": 2, "probes": 0}},
        ),
    ]


def _run_case(problem: dict, name: str, solver: str, options: dict, distributed: bool | None) -> dict:
    kind = name.split("-")[0]
    model = MODELS[kind]()
    model.load_state_dict(problem[kind]["state"])
    task = ik.ClassificationTask(model, l2=problem[kind]["l2"])
    inf = ik.Influence(task, problem[kind]["train"], solver=solver, distributed=distributed, **options).fit()
    test = problem[kind]["test"]
    scores = inf.scores(test).values
    ranked = inf.top_k(test, k=K)
    groups = {}
    if name in ("logistic-exact", "mlp-cg"):  # group effects: sums over each rank's members, all-reduced
        labels = problem[kind]["train"][1] % 3
        # newton_tol far below TOL: a rank-summed residual a hair across the stopping line must not move the result by
        # TOL
        found = inf.group_influence(labels, test, order=[1, 2, "newton"], newton_tol=1e-12)
        groups = {o: r.values for o, r in found.items()}
    return {
        "groups": groups,
        "scores": scores,
        "self": inf.self_influence(),
        "helpful": (ranked.helpful.indices, ranked.helpful.values),
        "harmful": (ranked.harmful.indices, ranked.harmful.values),
        "grad_norm": inf.grad_norm_,
        "world_size": inf.shard_.world_size if inf.shard_ is not None else 1,
    }


def _worker(rank: int, world: int, folder: str, job: str) -> None:
    torch.set_num_threads(1)
    folder = Path(folder)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder / 'rendezvous'}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        problem = torch.load(folder / "problem.pt", weights_only=False)
        out = {}
        if job == "agree":
            for name, solver, options in _cases():
                t = time.perf_counter()
                out[name] = _run_case(problem, name, solver, options, distributed=None)
                out[name]["seconds"] = time.perf_counter() - t
        else:
            out = _error_cases(rank, problem, folder)
        torch.save(out, folder / f"rank{rank}.pt")
        # leave together: a rank tearing its process group down while the other still ran aborted in gloo
        dist.barrier()
    except BaseException:
        (folder / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _outcome(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


class _OwnSolver(ik.solvers.CGSolver):
    """A user's solver under its own name: not known to shard, so refused."""

    name = "own"


def _error_cases(rank: int, problem: dict, folder: Path) -> dict:
    p = problem["logistic"]

    def influence(train=p["train"], state=p["state"], **kw):
        model = _logistic_model()
        model.load_state_dict(state)
        return ik.Influence(ik.ClassificationTask(model, l2=p["l2"]), train, **kw)

    X, y = p["train"]
    bad = X.clone()
    bad[-1, 0] = float("nan")  # in rank 1's shard only
    other = {k: v + (1e-3 if rank == 1 else 0.0) for k, v in p["state"].items()}
    fitted = influence(solver="cg").fit()
    test = p["test"] if rank == 0 else (p["test"][0][:3], p["test"][1][:3])
    cache = folder / "solver-cache"

    def cached_twice() -> str:
        first = influence(solver="exact", cache_dir=cache).fit()
        second = influence(solver="exact", cache_dir=cache).fit()
        same = torch.equal(first.self_influence(), second.self_influence())
        return f"loaded {first.solver_loaded_} then {second.solver_loaded_}, same {same}"

    def scores_on_disk_twice() -> str:
        a = fitted.scores(p["test"], folder=folder / "scores", rows_per_file=7)
        b = fitted.scores(p["test"], folder=folder / "scores", rows_per_file=7)
        files = len(list((folder / "scores").glob("scores-*.npy")))
        return (
            f"reused {a.metadata['score_files_reused']} then {b.metadata['score_files_reused']} of {files}, same "
            f"{torch.equal(a.values, b.values)}"
        )

    def gradient_store() -> dict:
        # chunks of 50 rows: 7 chunks of the 301 examples, written round robin (rank 0: 0, 2, 4, 6; rank 1: 1, 3, 5)
        import influencekit.index.store as store_module

        written, save = [], store_module.save_array
        store_module.save_array = lambda path, array: (written.append(Path(path).name), save(path, array))[1]
        try:
            store = ik.GradientStore.build(fitted, folder / "store", dim=32, chunk=50)
        finally:
            store_module.save_array = save
        files = {f.name: f.read_bytes() for f in sorted((folder / "store").glob("*.npy"))}
        return {"files": files, "written": written, "scores": store.scores(p["test"]).values}

    return {
        "gradient_store": gradient_store(),
        "cache_twice": cached_twice(),
        "scores_on_disk_twice": scores_on_disk_twice(),
        "nan_on_rank1": _outcome(lambda: influence(train=(bad if rank == 1 else X, y), solver="cg").fit()),
        "different_params": _outcome(lambda: influence(state=other, solver="cg").fit()),
        "different_solver": _outcome(lambda: influence(solver="cg" if rank == 0 else "exact").fit()),
        "own_solver": _outcome(lambda: influence(solver=_OwnSolver()).fit()),
        "too_few_examples": _outcome(lambda: influence(train=(X[:1], y[:1]), solver="cg").fit()),
        "different_test_sets": _outcome(lambda: fitted.scores(test)),
        "still_usable": _outcome(lambda: fitted.self_influence()),
    }


def _spawn(folder: Path, job: str, *, world: int = 2, timeout: float = 60.0) -> list[dict]:
    """Start ``world`` ranks; every one must finish within ``timeout`` seconds (no hang)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.spawn(_worker, args=(world, str(folder), job), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"the ranks did not finish within {timeout} s (a hang)")
    except mp.ProcessRaisedException as exc:
        errors = "\n".join(p.read_text() for p in sorted(folder.glob("rank*.err")))
        raise AssertionError(f"a rank failed:\n{errors or exc}") from None
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def problem() -> dict:
    return make_problem()


def make_problem() -> dict:
    """Logistic regression on 301 digits and a tanh MLP on 120, both trained to ‖∇R‖ < 1e-10 (float64)."""
    torch.set_num_threads(1)
    digits = digits_logistic(n_train=301)  # odd: shards of 151 and 150
    Xte, yte = digits.test
    mlp = _mlp_model()
    task = ik.ClassificationTask(mlp, l2=1e-2)
    Xtr, ytr = digits.train[0][:120], digits.train[1][:120]
    report = ik.fit_lbfgs(task, (Xtr, ytr), tol=1e-10)
    assert report.converged, report
    return {
        "logistic": {
            "state": digits.model.state_dict(),
            "l2": digits.task.l2,
            "train": digits.train,
            "test": (Xte[:N_TEST], yte[:N_TEST]),
        },
        "mlp": {"state": mlp.state_dict(), "l2": 1e-2, "train": (Xtr, ytr), "test": (Xte[:N_TEST], yte[:N_TEST])},
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_shard_bounds_cover_contiguously():
    for n, world in [(301, 2), (10, 3), (4, 4), (7, 1)]:
        bounds = [shard_bounds(n, world, r) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_two_ranks_match_one_process(problem, tmp_path):
    torch.save(problem, tmp_path / "problem.pt")
    ranks = _spawn(tmp_path, "agree", timeout=120.0)  # every case in one run; a hang detector, not a timing
    for name, solver, options in _cases():
        single = _run_case(problem, name, solver, options, distributed=False)
        assert single["world_size"] == 1
        for rank, got in enumerate(ranks):
            res = got[name]
            assert res["world_size"] == 2
            # the bar: the same scores and self-influence as one process, to 1e-10 in float64
            assert _rel(res["scores"], single["scores"]) < TOL, (name, rank)
            assert _rel(res["self"], single["self"]) < TOL, (name, rank)
            for order, values in single["groups"].items():
                assert _rel(res["groups"][order], values) < TOL, (name, rank, order)
            assert abs(res["grad_norm"] - single["grad_norm"]) <= 1e-12 + TOL * single["grad_norm"], (name, rank)
            for side in ("helpful", "harmful"):
                torch.testing.assert_close(res[side][0], single[side][0], rtol=0, atol=0)
                torch.testing.assert_close(res[side][1], single[side][1], rtol=TOL, atol=0)
        # every rank returns the same matrix, bit for bit (all_reduce hands every rank the same sums)
        assert torch.equal(ranks[0][name]["scores"], ranks[1][name]["scores"]), name


def test_error_paths_end_every_rank(problem, tmp_path):
    torch.save(problem, tmp_path / "problem.pt")
    start = time.monotonic()
    r0, r1 = _spawn(tmp_path, "errors", timeout=60.0)
    assert time.monotonic() - start < 60.0
    # a bad example on rank 1: rank 1 raises its own error, rank 0 an error naming rank 1 (no hang)
    assert r1["nan_on_rank1"].startswith("InputError") and "NaN" in r1["nan_on_rank1"]
    assert r0["nan_on_rank1"].startswith("DistributedError: rank 1 of 2 failed") and "NaN" in r0["nan_on_rank1"]
    # GradientStore.build under 2 ranks: each writes its own chunks; the files equal a single process's (the
    # chunks byte for byte, ΦᵀΦ to round-off: its sum is taken in another order), and so do the scores
    p = problem["logistic"]
    model = _logistic_model()
    model.load_state_dict(p["state"])
    single = ik.GradientStore.build(
        ik.Influence(ik.ClassificationTask(model, l2=p["l2"]), p["train"], solver="cg").fit(),
        tmp_path / "single-store",
        dim=32,
        chunk=50,
    )
    expected = {f.name: f.read_bytes() for f in sorted((tmp_path / "single-store").glob("*.npy"))}
    assert len(expected) == 7 + 1 and r0["gradient_store"]["files"].keys() == expected.keys()
    assert r0["gradient_store"]["written"] == [f"grads-{c:06d}.npy" for c in (0, 2, 4, 6)] + ["curvature.npy"]
    assert r1["gradient_store"]["written"] == [f"grads-{c:06d}.npy" for c in (1, 3, 5)]
    for name, data in expected.items():
        if name.startswith("grads-"):
            assert r0["gradient_store"]["files"][name] == data, name
    import io

    import numpy as np

    ptp = np.load(io.BytesIO(r0["gradient_store"]["files"]["curvature.npy"]))
    assert np.abs(ptp - np.load(io.BytesIO(expected["curvature.npy"]))).max() <= 1e-12 * np.abs(ptp).max()
    for out in (r0, r1):
        assert _rel(out["gradient_store"]["scores"], single.scores(p["test"]).values) < TOL
    for out in (r0, r1):
        # Influence(cache_dir=): rank 0 writes the fitted exact solver, then both ranks load it, same results
        assert out["cache_twice"] == "loaded False then True, same True"
        # scores(folder=): rank 0 writes each block's file, every rank reads them all back on the second call
        files = -(-len(problem["logistic"]["test"][0]) // 7)
        assert out["scores_on_disk_twice"] == f"reused 0 then {files} of {files}, same True"
        assert out["different_params"].startswith("DistributedError") and "theta_sha256" in out["different_params"]
        assert out["different_solver"].startswith("DistributedError") and "solver" in out["different_solver"]
        assert out["own_solver"].startswith("UnsupportedError") and "'own'" in out["own_solver"]
        assert out["too_few_examples"].startswith("InputError") and "one example per rank" in out["too_few_examples"]
        assert out["different_test_sets"].startswith("DistributedError") and "n_test" in out["different_test_sets"]
        assert out["still_usable"] == "ok"


def test_distributed_true_needs_a_process_group(problem):
    p = problem["logistic"]
    model = _logistic_model()
    model.load_state_dict(p["state"])
    inf = ik.Influence(ik.ClassificationTask(model, l2=p["l2"]), p["train"], distributed=True)
    with pytest.raises(
        ik.InputError, match="`distributed` is True but torch.distributed has no initialised process group"
    ):
        inf.fit()
    with pytest.raises(ik.InputTypeError, match="`distributed` must be None, True or False"):
        ik.Influence(ik.ClassificationTask(model), p["train"], distributed="yes")


def test_distributed_error_is_exported():
    assert issubclass(DistributedError, ik.InfluenceKitError) and issubclass(DistributedError, RuntimeError)


def test_a_ddp_wrapped_model_gives_the_unwrapped_scores(tmp_path):
    """DistributedDataParallel keeps the real model in .module; the task unwraps it (one-rank gloo group)."""
    torch.manual_seed(0)
    model = small_mlp()
    X, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,))
    assert ik.fit_lbfgs(ik.ClassificationTask(model, l2=1e-2), (X, y), tol=1e-9).converged
    plain = ik.Influence(ik.ClassificationTask(model, l2=1e-2), (X, y), solver="exact", damping=0.5).fit()
    expected = plain.scores((X[:4], y[:4])).values
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        task = ik.ClassificationTask(wrapped, l2=1e-2)
        assert task.model is model
        got = ik.Influence(task, (X, y), solver="exact", damping=0.5).fit().scores((X[:4], y[:4])).values
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
