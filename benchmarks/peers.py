"""influencekit side by side with peer libraries (Captum, pyDVL, Kronfluence, dattri) on the same problem.

Environment (never the main test venv: pyDVL 0.10 pins numpy<2, the peers pull many packages)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -c constraints.txt -e ".[bench]"   # torch stays the pinned 2.13.0 (CPU)
    .venv-bench/bin/pip uninstall -y torchvision    # pulled by kronfluence, cannot import beside torch 2.13, unused
    .venv-bench/bin/python benchmarks/peers.py --write docs/benchmarks.md

The ``bench`` extra pins captum==0.9.0, kronfluence==1.0.1, dattri==0.3.0 and pydvl[influence]==0.10.0.

Problem: ``benchmarks/solvers.py``'s multiclass logistic regression on scikit-learn's digits (``nn.Linear(64, 10)``,
650 parameters, float64, ``l2=1e-3``, trained by ``ik.fit_lbfgs``), all 597 test × 1,200 training points,
influence ``damping=0.01``.

Common convention. Every adapter returns the **predicted change of the test loss when the training point is
removed**, ``−I_up,loss/n`` (docs/conventions.md), shape ``(n_test, n_train)``. The matrix inverted is the same
for every system: ours is ``∇²R + δI`` with ``R`` the mean of ``ℓ + (λ/2)‖θ‖²``, i.e. ``∇²(mean ℓ) + (λ+δ)I``;
the peers only see the data loss ``ℓ``, so they are given the regularisation ``λ + δ = 0.011``. The one
difference left is on the training side: our ∇L(z) carries ``+λθ``, the peers' ∇ℓ(z) does not. That shifts each
test row by the constant ``g_testᵀ(H+δI)⁻¹λθ/n``; the row ``influencekit exact (peer convention)`` (task with
``l2=0``, ``damping=0.011``) computes the peers' quantity exactly, and ``rel. err vs peer-conv exact`` checks each
adapter's sign and normalisation against it (round-off for an exact peer).

Each (system, method) runs in a fresh process (``subprocess``, one torch thread) that reports fit time (what the
method does once, before any test point: Hessian, factors, ...), score time (all 597 × 1,200 scores), its peak
resident memory (``VmHWM``) and the memory it had before fitting. Times are also given in units of one
per-example-gradient pass over the training set (influencekit's ``vmap(grad)`` pass, best of 10, measured in
the parent in the same run). The parent compares every score matrix with influencekit's exact one (Pearson,
Spearman over all 597 × 1,200 entries) and with actual leave-one-out retraining (``ik.leave_one_out``, cached
on disk): the 3 highest-loss test points × (top 50 by |influence| of our exact scores + 50 random).

Usage::

    .venv-bench/bin/python benchmarks/peers.py                       # all methods, ~3 minutes
    .venv-bench/bin/python benchmarks/peers.py --methods ik-exact,captum-naive
    .venv-bench/bin/python benchmarks/peers.py --write docs/benchmarks.md   # replaces the PEERS markers only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# benchmarks/distributed.py must not shadow the `distributed` package (dask) that pyDVL imports: drop this
# script's folder, which Python puts first on sys.path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _load_solvers_module() -> Any:
    # benchmarks/ is not put on sys.path: its distributed.py would shadow the `distributed` package pyDVL imports.
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ik_bench_solvers", Path(__file__).resolve().parent / "solvers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_solvers = _load_solvers_module()
L2, build_model, current_rss_mib = _solvers.L2, _solvers.build_model, _solvers.current_rss_mib
group_warnings, rss_mib, source_line = _solvers.group_warnings, _solvers.rss_mib, _solvers.source_line

DAMPING = 0.01
PEER_DAMPING = L2 + DAMPING  # the peers' Hessian has no L2 term: same matrix (H_data + (λ+δ)I)
BEGIN, END = "<!-- BEGIN PEERS GENERATED -->", "<!-- END PEERS GENERATED -->"
ROOT = Path(__file__).resolve().parents[1]


def load_problem(state: str) -> tuple[torch.nn.Module, tuple, tuple]:
    from influencekit.data import load_digits_split

    (X, y), (Xt, yt) = load_digits_split(1200)
    model = build_model("logreg", 0)
    model.load_state_dict(torch.load(state, weights_only=True))
    model.eval()
    return model, (X, y), (Xt, yt)


# ------------------------------------------------------------------------------------------ adapters
# Each adapter: (model, train, test, fit_timer) -> predicted LOO change (n_test, n_train) as a numpy array.
# `timer(name)` is a context manager recording the phase; the worker reads "fit" and "score".

class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, name: str) -> "Timer":
        self._name = name
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.times[self._name] = self.times.get(self._name, 0.0) + time.perf_counter() - self._t0


def ik_method(solver: str, *, peer_convention: bool = False, **options: Any) -> Callable:
    def run(model, train, test, timer, info):
        import influencekit as ik

        task = ik.ClassificationTask(model, l2=0.0 if peer_convention else L2)
        damping = PEER_DAMPING if peer_convention else DAMPING
        inf = ik.Influence(task, train, solver=solver, damping=damping, solver_options=options)
        with timer("fit"):
            inf.fit()
        with timer("score"):
            scores = inf.scores(test)
        info["solve_reports"] = scores.metadata.get("solve_reports", [])
        return scores.predicted_loo_change().numpy()
    return run


def captum_naive(projection_dim: int | None) -> Callable:
    return lambda model, train, test, timer, info: _captum_naive(model, train, test, timer, info, projection_dim)


def _captum_naive(model, train, test, timer, info, projection_dim):
    # captum/influence/_core/influence_function.py: scores are ∇ℓ(test)ᵀ (H_sum + hessian_reg I)⁻¹ ∇ℓ(train), positive
    # for proponents (helpful), with H_sum the Hessian of the *summed* loss over the data (_compute_dataset_func and
    # _compute_batch_loss_influence_function_base sum, whatever the reduction). H_sum = n H_mean, so with
    # hessian_reg = n (λ + δ) the score is g_testᵀ(H_mean + (λ+δ)I)⁻¹ g / n = −I_up,loss/n as it stands.
    # It keeps the top `projection_dim` eigenpairs of H_sum + reg (default 50, a low-rank inverse); None = all 650.
    # The checkpoint is reloaded by captum itself.
    from captum.influence import NaiveInfluenceFunction
    from torch.utils.data import DataLoader, TensorDataset

    X, y = train
    path = info["state"]

    def load(m: torch.nn.Module, p: str) -> float:
        m.load_state_dict(torch.load(p, weights_only=True))
        return 1.0

    with timer("fit"):
        tracin = NaiveInfluenceFunction(
            model, DataLoader(TensorDataset(X, y), batch_size=len(X)), path, load,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), hessian_reg=len(X) * PEER_DAMPING, batch_size=len(X),
            projection_dim=projection_dim or sum(p.numel() for p in model.parameters()),
        )
    with timer("score"):
        s = tracin.influence(test)
    return s.detach().numpy()


def _pydvl(cls_name: str, **kwargs: Any) -> Callable:
    # pydvl/influence/base_influence_function_model.py: influences(x_test, y_test, x, y, mode="up") is
    # <(H + reg I)⁻¹∇ℓ(test), ∇ℓ(train)> with H the Hessian of the mean loss over the fitted DataLoader (checked
    # numerically below: sign +, so −I_up,loss/n = +value/n).
    def run(model, train, test, timer, info):
        import pydvl.influence.torch as pt
        from torch.utils.data import DataLoader, TensorDataset

        X, y = train
        loss = torch.nn.functional.cross_entropy
        cls = getattr(pt, cls_name)
        if cls_name == "EkfacInfluence":
            est = cls(model, hessian_regularization=PEER_DAMPING, **kwargs)
        else:
            est = cls(model, loss, regularization=PEER_DAMPING, **kwargs)
        with timer("fit"):
            est.fit(DataLoader(TensorDataset(X, y), batch_size=len(X)))
        with timer("score"):
            s = est.influences(test[0], test[1], X, y, mode="up")
        return s.detach().numpy() / len(X)
    return run


def kronfluence_ekfac(model, train, test, timer, info):
    # kronfluence/score/pairwise.py: pairwise scores are ∇f(test)ᵀ (G_ekfac + damping I)⁻¹ ∇ℓ(train), positive
    # = helpful (no minus sign); covariances are averaged over examples (factor/eigen.py divides by the count),
    # the training loss summed per batch. −I_up,loss/n = +score/n. True Fisher by labels sampled from the model
    # (use_empirical_fisher=False, the default), every factor and score in float64.
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class Digits(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, t = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    t = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return F.cross_entropy(logits, t, reduction="sum")

        def compute_measurement(self, batch, model):
            x, t = batch
            return F.cross_entropy(model(x), t, reduction="sum")

    X, y = train
    torch.manual_seed(0)
    f64 = torch.float64
    task = Digits()
    # prepare_model replaces tracked layers inside their parent; a bare nn.Linear has none (infinite recursion)
    model = prepare_model(torch.nn.Sequential(model), task)
    out = tempfile.mkdtemp(prefix="kronfluence-")
    analyzer = Analyzer("digits", model, task, cpu=True, disable_tqdm=True, output_dir=out)
    fargs = FactorArguments(strategy="ekfac", activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
                            eigendecomposition_dtype=f64, lambda_dtype=f64)
    sargs = ScoreArguments(damping_factor=PEER_DAMPING, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                           score_dtype=f64)
    with timer("fit"):
        analyzer.fit_all_factors("ekfac", TensorDataset(X, y), per_device_batch_size=len(X), factor_args=fargs,
                                 overwrite_output_dir=True)
    with timer("score"):
        analyzer.compute_pairwise_scores("s", "ekfac", TensorDataset(*test), TensorDataset(X, y),
                                                  per_device_query_batch_size=len(test[0]),
                                                  per_device_train_batch_size=len(X), score_args=sargs,
                                                  overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("s")  # computed scores are written to disk, not returned
    return scores["all_modules"].detach().numpy() / len(X)


def _dattri(cls_name: str, **kwargs: Any) -> Callable:
    # dattri/algorithm/influence_function.py + base.py: attribute(train_loader, test_loader) returns
    # (n_train, n_test) inner products ∇ℓ(train)ᵀ(H + regularization·I)⁻¹∇ℓ(test), H the Hessian of `loss_func` on
    # the full-training batch (a mean here); sign and 1/n checked numerically against the peer-convention exact.
    def run(model, train, test, timer, info):
        import dattri.algorithm.influence_function as dif
        from dattri.task import AttributionTask
        from torch.utils.data import DataLoader, TensorDataset

        def loss_func(params, data):
            x, t = data
            return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), t)

        X, y = train
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        att = getattr(dif, cls_name)(task, device="cpu", regularization=PEER_DAMPING, **kwargs)
        train_loader = DataLoader(TensorDataset(X, y), batch_size=len(X))
        with timer("fit"):
            att.cache(train_loader)
        with timer("score"):
            s = att.attribute(train_loader, DataLoader(TensorDataset(*test), batch_size=len(test[0])))
        return s.detach().T.numpy() / len(X)
    return run


METHODS: dict[str, tuple[str, str, Callable]] = {
    # key: (system, method, adapter)
    "ik-exact": ("influencekit", "exact", ik_method("exact")),
    "ik-exact-peer": ("influencekit", "exact (peer convention)", ik_method("exact", peer_convention=True)),
    "ik-cg": ("influencekit", "cg", ik_method("cg")),
    "ik-ekfac": ("influencekit", "ekfac", ik_method("ekfac")),
    "captum-naive": ("captum 0.9.0", "NaiveInfluenceFunction (full rank)", captum_naive(None)),
    "captum-naive-50": ("captum 0.9.0", "NaiveInfluenceFunction (default projection_dim=50)", captum_naive(50)),
    "pydvl-direct": ("pydvl 0.10.0", "DirectInfluence", _pydvl("DirectInfluence")),
    "pydvl-cg": ("pydvl 0.10.0", "CgInfluence (block)", _pydvl("CgInfluence", solve_simultaneously=True)),
    "pydvl-lissa": ("pydvl 0.10.0", "LissaInfluence (defaults, maxiter=1000)", _pydvl("LissaInfluence")),
    "pydvl-lissa-100": ("pydvl 0.10.0", "LissaInfluence (maxiter=100)", _pydvl("LissaInfluence", maxiter=100)),
    "pydvl-arnoldi": ("pydvl 0.10.0", "ArnoldiInfluence (rank 10)", _pydvl("ArnoldiInfluence")),
    "pydvl-ekfac": ("pydvl 0.10.0", "EkfacInfluence", _pydvl("EkfacInfluence")),
    "kronfluence-ekfac": ("kronfluence 1.0.1", "EK-FAC", kronfluence_ekfac),
    "dattri-explicit": ("dattri 0.3.0", "IFAttributorExplicit", _dattri("IFAttributorExplicit")),
    "dattri-cg": ("dattri 0.3.0", "IFAttributorCG (max_iter=10 default)", _dattri("IFAttributorCG")),
}
# pyDVL's LiSSA with its defaults (1,000 full-batch steps × 597 right-hand sides) ran past a minute here and is
# left to --methods; the default run has it at maxiter=100.
DEFAULT_METHODS = [k for k in METHODS if k != "pydvl-lissa"]


# -------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, train, test = load_problem(args.state)
    info: dict[str, Any] = {"state": args.state}
    base = current_rss_mib()
    timer = Timer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S = METHODS[args.method][2](model, train, test, timer, info)
    info.pop("state")
    result = {"t_fit": timer.times.get("fit", 0.0), "t_score": timer.times.get("score", 0.0), "rss_base_mib": base,
              "rss_peak_mib": rss_mib(), "warnings": group_warnings(caught), **info}
    S = np.asarray(S, dtype=np.float64)
    if S.shape != (len(test[0]), len(train[0])):
        raise ValueError(f"{args.method}: scores of shape {S.shape}, expected {(len(test[0]), len(train[0]))}")
    np.save(args.out + ".npy", S)
    Path(args.out + ".json").write_text(json.dumps(result, default=str))


def run_worker(key: str, state: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", key, "--state", str(state),
           "--out", str(out), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.worker_timeout:.0f} s"}
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return {"error": f"exit {proc.returncode}: {lines[-1] if lines else '(no output)'}", "stderr": proc.stderr[-4000:]}
    r = json.loads(Path(str(out) + ".json").read_text())
    r["wall"] = time.perf_counter() - t0
    r["S"] = np.load(str(out) + ".npy")
    return r


# -------------------------------------------------------------------------------------------- parent
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def grad_pass_seconds(model, train, repeats: int = 10) -> float:
    import influencekit as ik

    inf = ik.Influence(ik.ClassificationTask(model, l2=L2), train, solver="exact", damping=DAMPING)
    best = float("inf")
    inf.fit()
    for _ in range(repeats):
        t0 = time.perf_counter()
        list(inf._grads(inf.train_, train_side=True))
        best = min(best, time.perf_counter() - t0)
    return best


HEADER = ["system", "method", "fit s", "score s", "total s", "total /grad", "peak RSS MiB (+ over base)",
          "rel. err vs peer-conv exact", "slope vs peer-conv exact", "Pearson vs exact", "Spearman vs exact", "LOO Pearson", "LOO Spearman"]


def fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def rows_of(results: list[dict[str, Any]], unit: float) -> list[list[str]]:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["system"], r["method"]] + ["—"] * (len(HEADER) - 3) + [f"FAILED: {r['error']}"])
            continue
        total = r["t_fit"] + r["t_score"]
        rows.append([r["system"], r["method"], f"{r['t_fit']:.2f}", f"{r['t_score']:.2f}", f"{total:.2f}",
                     f"{total / unit:.0f}", f"{r['rss_peak_mib']:.0f} (+{r['rss_peak_mib'] - r['rss_base_mib']:.0f})",
                     fmt(r.get("rel_err_peer"), ".1e"), fmt(r.get("slope_peer"), ".4f"), fmt(r.get("pearson"), ".6f"), fmt(r.get("spearman"), ".6f"),
                     fmt(r.get("loo_pearson"), ".4f"), fmt(r.get("loo_spearman"), ".4f")])
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADER)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths))
                     for cells in [HEADER, ["-" * w for w in widths], *rows])


def md_table(rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)])


def write_markdown(path: Path, body: str) -> None:
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        start, stop = text.index(BEGIN), text.index(END) + len(END)
        path.write_text(text[:start] + block + text[stop:])
    else:
        path.write_text(text.rstrip() + "\n\n## Peers: measured table\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated: " + ",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--worker-timeout", type=float, default=300.0)
    parser.add_argument("--loo-cache", default=str(Path(tempfile.gettempdir()) / "influencekit-peers-loo"),
                        help="folder caching the leave-one-out retrainings (reused across runs)")
    parser.add_argument("--no-loo", action="store_true", help="skip the leave-one-out ground truth")
    parser.add_argument("--write", metavar="PATH", help="write the table into PATH between the PEERS markers")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        try:
            worker(args)
        except Exception:
            traceback.print_exc()
            return 1
        return 0
    keys = [k for k in args.methods.split(",") if k]
    for k in keys:
        if k not in METHODS:
            parser.error(f"unknown method {k!r}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    import influencekit as ik
    from influencekit.data import load_digits_split

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    (X, y), (Xt, yt) = load_digits_split(1200)
    torch.manual_seed(0)
    model = build_model("logreg", 0)
    task = ik.ClassificationTask(model, l2=L2)
    rep = ik.fit_lbfgs(task, (X, y))
    print(f"trained logreg: {rep.iterations} iterations, ||grad R|| = {rep.grad_norm:.2e}", flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ik-peers-") as tmp:
        state = Path(tmp) / "logreg.pt"
        torch.save(model.state_dict(), state)
        for i, key in enumerate(keys):
            system, method, _ = METHODS[key]
            print(f"running {system} / {method} ...", flush=True)
            r = run_worker(key, state, Path(tmp) / f"{i}-{key}", args)
            r.update(key=key, system=system, method=method)
            print(f"  {r['error']}" if "error" in r else
                  f"  fit {r['t_fit']:.2f} s, score {r['t_score']:.2f} s, peak RSS {r['rss_peak_mib']:.0f} MiB", flush=True)
            results.append(r)
    unit = grad_pass_seconds(model, (X, y))
    print(f"reference per-example-gradient pass: {unit * 1e3:.1f} ms", flush=True)

    by = {r["key"]: r for r in results if "error" not in r}
    ref, ref_peer = by.get("ik-exact"), by.get("ik-exact-peer")
    for r in by.values():
        if ref is not None:
            r["pearson"], r["spearman"] = pearson(r["S"].ravel(), ref["S"].ravel()), spearman(r["S"].ravel(), ref["S"].ravel())
        if ref_peer is not None:
            r["rel_err_peer"] = float(np.linalg.norm(r["S"] - ref_peer["S"]) / np.linalg.norm(ref_peer["S"]))
            # least-squares slope through 0 against the peers' exact quantity: 1 when sign and 1/n are right
            r["slope_peer"] = float((r["S"] * ref_peer["S"]).sum() / (ref_peer["S"] ** 2).sum())

    loo_line = "leave-one-out ground truth skipped"
    if not args.no_loo:
        t0 = time.perf_counter()
        inf = ik.Influence(task, (X, y), solver="exact", damping=DAMPING).fit()
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(model(Xt), yt, reduction="none")
        tests = torch.argsort(losses, descending=True)[:3].tolist()
        loo = ik.leave_one_out(inf, (Xt, yt), test_indices=tests, top_k=50, n_random=50, cache_dir=args.loo_cache)
        ti, tr = np.asarray(loo.test_index), np.asarray(loo.train_index)
        for r in by.values():
            pred = r["S"][ti, tr]
            r["loo_pearson"], r["loo_spearman"] = pearson(pred, loo.actual), spearman(pred, loo.actual)
        loo_line = (f"leave-one-out: test points {tests} (highest test loss) × (top 50 by |influence| of influencekit "
                    f"exact + 50 random) = {len(loo)} pairs, retrained with ik.leave_one_out (cache {args.loo_cache}; "
                    f"{loo.metadata.get('n_from_cache', '?')} from cache) in {time.perf_counter() - t0:.1f} s; "
                    f"{len(loo.not_converged)} not converged")
    load_end = os.getloadavg()[0]
    total = time.perf_counter() - started
    rows = rows_of(results, unit)
    print()
    print(text_table(rows))
    print(loo_line)
    notes = []
    for r in results:
        if "error" in r:
            notes.append(f"{r['system']} / {r['method']} failed: {r['error']}")
        for w in r.get("warnings", []):
            if "torch.jit.script" in w["message"]:
                continue
            notes.append(f"{r['system']} / {r['method']}: {w['category']} x{w['count']} from {w['origin']}: {w['message'][:300]}")
    for line in notes:
        print("note: " + line)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s) per worker, "
               f"Python {platform.python_version()}")
    print(f"machine: {machine}; load {load_start:.2f} -> {load_end:.2f}; total {total:.0f} s")
    if args.write:
        body = "\n".join([
            f"Command: `.venv-bench/bin/python benchmarks/peers.py {shlex.join(sys.argv[1:])}`",
            "",
            f"Machine: {machine}; load average {load_start:.2f} at start, {load_end:.2f} at end; total {total:.0f} s. "
            f"Source: {source_line()}.",
            "",
            f"Problem: logistic regression on digits (650 parameters, float64, l2 = {L2:g}), damping {DAMPING:g} "
            f"(peers: regularisation {PEER_DAMPING:g} = l2 + damping, the same matrix), all 597 × 1,200 scores. "
            f"Unit of `/grad`: one per-example-gradient pass over the 1,200 training points, {unit * 1e3:.1f} ms "
            "(best of 10, this run). Peak RSS: the worker's `VmHWM`; `+`: its rise over the memory before fitting.",
            "",
            md_table(rows),
            "",
            f"- {loo_line}.",
            *(f"- {line}" for line in notes),
        ])
        write_markdown(Path(args.write), body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
