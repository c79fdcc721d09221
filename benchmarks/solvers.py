"""Benchmark of the inverse-Hessian solvers (exact, cg, lissa, arnoldi) on scikit-learn's bundled digits.

Two problems, both float64, 1,200 training and 597 test images (``influencekit.data.load_digits_split``):

* ``logreg``: multiclass logistic regression, ``nn.Linear(64, 10)`` (650 parameters), ``l2=1e-3``,
  trained with ``ik.fit_lbfgs``; influence with ``damping=0``.
* ``mlp``: ``Linear(64, H)-Tanh-Linear(H, 10)`` (H=128: 9,610 parameters), ``l2=1e-3``, trained with
  ``ik.fit_lbfgs(task, train, max_iter=3000, tol=1e-6)``; influence with ``damping=0.01`` (non-convex).

For every (problem, solver) pair a fresh Python process (``subprocess``) loads the trained model, runs

    t_fit   = time of ik.Influence(task, train, solver=..., damping=...).fit()
    t_score = time of inf.scores(test)          # all 597 test points × all 1,200 training points
    t_grad  = time of list(inf.gradients_.stream(inf.train_, side="train"))   # one per-example-gradient pass
                                                # over the training set, best of 10: 5 after fit, 5 after scoring

and reports its own peak resident memory (``VmHWM`` on Linux, else ``ru_maxrss``) and the resident
memory it had before ``fit`` (imports, data, model), so that ``peak - base`` is what the solver and the
scoring added. Times are reported in seconds and in units of the problem's reference gradient pass: the
fastest t_grad over all of that problem's workers in this run (the same pass measures 60-250 ms for the
MLP depending on whether the allocator hands back fresh pages, so one common unit keeps the rows
comparable). The parent process compares each score matrix with the exact one (relative Frobenius error
and Pearson r over all 597 × 1,200 entries) and checks the targets:

* exact: ``t_score <= 3 t_grad`` (scoring costs about one gradient pass once fitted), t_grad the reference;
* cg, lissa, arnoldi: ``t_fit + t_score <= 10 (t_fit + t_score)`` of exact.

Warnings raised in a worker are recorded (never silenced) and printed with the table. Workers run with
one torch intra-op thread by default (``--threads``): on a 2-core machine shared with other work, two
OpenMP threads stall on each other and the same gradient pass measured 4 ms or 200 ms from run to run.

Usage::

    python benchmarks/solvers.py                              # both problems, all solvers (~15 min)
    python benchmarks/solvers.py --lissa-options '{}' --lissa-options '{"depth": 100}' \
        --write docs/benchmarks.md                            # the run in docs/benchmarks.md
    python benchmarks/solvers.py --problems logreg --solvers exact,cg

``--write`` replaces the text between ``<!-- BEGIN GENERATED -->`` and ``<!-- END GENERATED -->`` when the
file has those markers (so hand-written text around them survives), and otherwise writes a new file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROBLEMS = ("logreg", "mlp")
SOLVERS = ("exact", "cg", "lissa", "arnoldi")
BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
L2 = 1e-3
DAMPING = {"logreg": 0.0, "mlp": 0.01}


# ----------------------------------------------------------------------------------------- models
def build_model(problem: str, hidden: int) -> torch.nn.Module:
    if problem == "logreg":
        return torch.nn.Linear(64, 10).double()
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)).double()


def accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


# ----------------------------------------------------------------------------------------- worker
def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    On Linux this is ``VmHWM``: ``ru_maxrss`` of a child started with fork + exec starts at the parent's peak
    (the benchmark's parent holds ~650 MiB), so it hides any smaller peak of the worker. Elsewhere ``ru_maxrss``.
    """
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def current_rss_mib() -> float:
    """Resident set size now, MiB (``VmRSS`` on Linux; the peak so far elsewhere)."""
    rss = _proc_status_mib("VmRSS")
    return rss if rss is not None else rss_mib()


def worker(args: argparse.Namespace) -> None:
    """One (problem, solver) measurement in this fresh process; writes <out>.json and <out>.npy."""
    if args.threads:
        torch.set_num_threads(args.threads)
    import influencekit as ik
    from influencekit.data import load_digits_split

    (X, y), (Xt, yt) = load_digits_split(1200)
    model = build_model(args.problem, args.hidden)
    model.load_state_dict(torch.load(args.state, weights_only=True))
    model.eval()
    task = ik.ClassificationTask(model, l2=L2)
    options = json.loads(args.options)
    base, base_peak = current_rss_mib(), rss_mib()
    result: dict[str, Any] = {
        "problem": args.problem,
        "solver": args.solver,
        "options": options,
        "damping": DAMPING[args.problem],
    }
    load_before = os.getloadavg()[0]

    def grad_pass_times(repeats: int) -> list[float]:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(inf.gradients_.stream(inf.train_, side="train"))
            times.append(time.perf_counter() - t0)
        return times

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # record every warning (they are all printed by the parent)
        inf = ik.Influence(task, (X, y), solver=args.solver, damping=DAMPING[args.problem], solver_options=options)
        t0 = time.perf_counter()
        inf.fit()
        t_fit = time.perf_counter() - t0
        grad_times = grad_pass_times(5)
        t0 = time.perf_counter()
        scores = inf.scores((Xt, yt))
        t_score = time.perf_counter() - t0
        grad_times += grad_pass_times(5)
    peak = rss_mib()
    reports = scores.metadata.get("solve_reports", [])
    result.update(
        t_fit=t_fit,
        t_score=t_score,
        t_grad=min(grad_times),
        t_grad_all=grad_times,
        rss_base_mib=base,
        rss_base_peak_mib=base_peak,
        rss_peak_mib=peak,
        n_params=inf.n_params,
        grad_norm=inf.grad_norm_,
        chunks=vars(inf.chunks_) if hasattr(inf.chunks_, "__dict__") else str(inf.chunks_),
        solver_describe=inf.solver_.describe(),
        solve_reports=reports,
        solver_fitted={
            k: getattr(inf.solver_, k) for k in ("scale_", "lambda_min_", "lambda_max_") if hasattr(inf.solver_, k)
        },
        hvps=getattr(inf.operator_, "hvp_count", None),
        warnings=group_warnings(caught),
        threads=torch.get_num_threads(),
        load_before=load_before,
        load_after=os.getloadavg()[0],
    )
    np.save(args.out + ".npy", scores.values.numpy() if hasattr(scores, "values") else np.asarray(scores))
    Path(args.out + ".json").write_text(json.dumps(result, default=str))


def group_warnings(caught: list[warnings.WarningMessage]) -> list[dict[str, Any]]:
    """Identical warnings (category, message, origin) once each, with how often they fired."""
    groups: dict[tuple[str, str, str], int] = {}
    for w in caught:
        key = (w.category.__name__, str(w.message), f"{Path(w.filename).name}:{w.lineno}")
        groups[key] = groups.get(key, 0) + 1
    return [{"category": c, "message": m, "origin": o, "count": n} for (c, m, o), n in groups.items()]


# ------------------------------------------------------------------------------------------ parent
def run_worker(
    problem: str, solver: str, options: dict[str, Any], state: Path, out: Path, args: argparse.Namespace
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--problem",
        problem,
        "--solver",
        solver,
        "--options",
        json.dumps(options),
        "--state",
        str(state),
        "--out",
        str(out),
        "--hidden",
        str(args.hidden),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return {
            "problem": problem,
            "solver": solver,
            "options": options,
            "error": f"timed out after {args.worker_timeout:.0f} s",
        }
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"problem": problem, "solver": solver, "options": options, "error": f"exit {proc.returncode}: {tail[0]}"}
    result = json.loads(Path(str(out) + ".json").read_text())
    result["wall"] = wall
    result["scores_path"] = str(out) + ".npy"
    return result


def label(solver: str, options: dict[str, Any]) -> str:
    """The solver's name, with the options given to it (the library's defaults when there are none)."""
    return solver + (" (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "")


def agreement(S: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    rel = float(np.linalg.norm(S - ref) / np.linalg.norm(ref))
    r = float(np.corrcoef(S.ravel(), ref.ravel())[0, 1])
    return rel, r


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def reference_grad(results: list[dict[str, Any]]) -> dict[str, float]:
    """Per problem: the fastest gradient pass measured by any of its workers (the unit of the ratios)."""
    ref: dict[str, float] = {}
    for r in results:
        if "error" not in r:
            ref[r["problem"]] = min(ref.get(r["problem"], math.inf), r["t_grad"])
    return ref


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    unit = reference_grad(results)
    for r in results:
        if "error" in r:
            rows.append(
                [r["problem"], label(r["solver"], r["options"])] + ["—"] * (len(HEADER) - 3) + [f"FAILED: {r['error']}"]
            )
            continue
        g = unit[r["problem"]]
        reports = r["solve_reports"]
        solve_s = sum(rep["seconds"] for rep in reports)
        note = ""
        if reports:
            iters = max(rep["iterations"] for rep in reports)
            resid = max(rep["relative_residual"] for rep in reports)
            ok = all(rep["converged"] for rep in reports)
            note = f"{iters} iters, resid {resid:.1e}{'' if ok else ', NOT converged'}"
        rows.append(
            [
                r["problem"],
                label(r["solver"], r["options"]),
                f"{r['t_grad'] * 1e3:.0f}",
                f"{r['t_fit']:.2f}",
                f"{r['t_fit'] / g:.0f}",
                f"{r['t_score']:.2f}",
                f"{solve_s:.2f}",
                f"{r['t_score'] / g:.1f}",
                f"{(r['t_fit'] + r['t_score']) / g:.0f}",
                f"{r['rss_peak_mib']:.0f} (+{r['rss_peak_mib'] - r['rss_base_mib']:.0f})",
                fmt(r.get("rel_err"), ".1e"),
                fmt(r.get("pearson"), ".6f"),
                note,
            ]
        )
    return rows


HEADER = [
    "problem",
    "solver",
    "own grad pass ms",
    "fit s",
    "fit /grad",
    "score s",
    "of which solve s",
    "score /grad",
    "fit+score /grad",
    "peak RSS MiB (+ over base)",
    "rel. err vs exact",
    "Pearson r vs exact",
    "solve report",
]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADER)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(HEADER), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def targets(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    by = {(r["problem"], r["solver"]): r for r in results if r["solver"] == "exact"}
    unit = reference_grad(results)
    for problem in dict.fromkeys(r["problem"] for r in results):
        ex = by.get((problem, "exact"))
        if ex is None or "error" in ex:
            lines.append(f"{problem}: exact did not run, targets not checked")
            continue
        ratio = ex["t_score"] / unit[problem]
        lines.append(
            f"{problem}: exact scores in {ratio:.1f} gradient passes once fitted (target <= 3): "
            f"{'MET' if ratio <= 3 else 'NOT MET'} "
            f"({ex['t_score']:.3f} s; reference pass {unit[problem] * 1e3:.0f} ms; {ex['t_score'] / ex['t_grad']:.1f} "
            "of the exact worker's own pass)"
        )
        ex_total = ex["t_fit"] + ex["t_score"]
        for r in results:
            if r["problem"] != problem or r["solver"] == "exact":
                continue
            solver = label(r["solver"], r["options"])
            if "error" in r:
                lines.append(f"{problem}: {solver} failed ({r['error']}): NOT MET")
                continue
            x = (r["t_fit"] + r["t_score"]) / ex_total
            acc = f"rel. err {r['rel_err']:.1e} vs exact" if r.get("rel_err") is not None else ""
            lines.append(
                f"{problem}: {solver} fit+score = {x:.2f}x exact's fit+score (target <= 10x): "
                f"{'MET' if x <= 10 else 'NOT MET'} ({acc})"
            )
    for r in results:
        for w in r.get("warnings", []):
            if w["category"] in ("ConvergenceWarning", "CurvatureWarning", "StationarityWarning"):
                lines.append(
                    f"note: a {w['category']} fired in {r['problem']}/{label(r['solver'], r['options'])} (see the "
                    "warnings below)"
                )
    return lines


def settings_lines(results: list[dict[str, Any]], train_info: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lines = []
    for problem, info in train_info.items():
        lines.append(
            f"{problem}: {info['n_params']} params, trained with {info['trainer']} in {info['seconds']:.1f} s "
            f"({info['iterations']} iterations), ||grad R|| = {info['grad_norm']:.2e} (converged={info['converged']}), "
            f"train acc {info['train_acc']:.4f}, "
            f"test acc {info['test_acc']:.4f}, influence damping {DAMPING[problem]:g}"
        )
    for r in results:
        if "error" in r:
            continue
        rep = r["solve_reports"][0] if r["solve_reports"] else {}
        extra = ", ".join(f"{k}={v:.4g}" for k, v in r.get("solver_fitted", {}).items())
        lines.append(
            f"{r['problem']}/{label(r['solver'], r['options'])}: solver settings {r['solver_describe']}; "
            f"{extra + '; ' if extra else ''}"
            f"solve: {rep.get('iterations')} iterations, {rep.get('hvps', 0):.0f} full-data HVPs, residual "
            f"{rep.get('relative_residual', float('nan')):.2e}, converged={rep.get('converged')}, solve "
            f"{rep.get('seconds', float('nan')):.2f} s; "
            f"grad passes {', '.join(f'{t * 1e3:.0f}' for t in r['t_grad_all'])} ms; torch threads {r['threads']}; "
            f"1-min load average {r['load_before']:.2f} before, {r['load_after']:.2f} after"
        )
    return lines


def warning_lines(results: list[dict[str, Any]], train_info: dict[str, Any]) -> list[str]:
    """One line per distinct warning, naming the workers it fired in (and how often in each)."""
    seen: dict[tuple[str, str, str], list[str]] = {}
    for problem, info in train_info.items():
        for w in info.get("warnings", []):
            where = f"{problem}/training" + (f" x{w['count']}" if w["count"] > 1 else "")
            seen.setdefault((w["category"], w["origin"], w["message"]), []).append(where)
    for r in results:
        for w in r.get("warnings", []):
            where = f"{r['problem']}/{label(r['solver'], r['options'])}" + (f" x{w['count']}" if w["count"] > 1 else "")
            seen.setdefault((w["category"], w["origin"], w["message"]), []).append(where)
    return [f"{c} from {o} in {', '.join(where)}: {m}" for (c, o, m), where in seen.items()]


DEFAULT_THREADS = torch.get_num_threads()


def machine_line(threads: int) -> str:
    used = f"{threads} used" if threads else "torch's default used"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({DEFAULT_THREADS} intra-op "
        f"threads by default, {used}), Python {platform.python_version()}, {platform.system()}"
    )


def source_line() -> str:
    import influencekit

    root = Path(influencekit.__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=root, capture_output=True, timeout=10
        ).returncode
        return (
            f"influencekit {influencekit.__version__} from {root} at commit "
            f"{head}{' with uncommitted changes in src/' if dirty else ''}"
        )
    except (OSError, subprocess.SubprocessError):
        return f"influencekit {influencekit.__version__} from {root}"


def write_markdown(path: Path, body: str) -> None:
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            start, stop = text.index(BEGIN), text.index(END) + len(END)
            path.write_text(text[:start] + block + text[stop:])
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Solver benchmarks\n\n{block}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated: logreg,mlp")
    parser.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated: exact,cg,lissa,arnoldi")
    parser.add_argument("--hidden", type=int, default=128, help="MLP hidden units (128: 9,610 parameters)")
    parser.add_argument("--mlp-max-iter", type=int, default=3000, help="ik.fit_lbfgs max_iter for the MLP")
    parser.add_argument("--mlp-tol", type=float, default=1e-6, help="ik.fit_lbfgs tol (on ||grad R||) for the MLP")
    parser.add_argument(
        "--cg-options",
        action="append",
        metavar="JSON",
        help="solver_options for cg; repeat for several cg rows (default: one row with the defaults)",
    )
    parser.add_argument(
        "--lissa-options",
        action="append",
        metavar="JSON",
        help="solver_options for lissa, e.g. '{\"depth\": 100}'; repeat for several lissa rows "
        "(default: one row with the defaults)",
    )
    parser.add_argument(
        "--arnoldi-options",
        action="append",
        metavar="JSON",
        help='solver_options for arnoldi, e.g. \'{"rank": 100, "remainder": "damped"}\'; repeat for several '
        "arnoldi rows (default: one row with the defaults)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable on a shared machine; 0: torch's default)",
    )
    parser.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds before a worker is abandoned")
    parser.add_argument("--write", metavar="PATH", help="write the tables in markdown into PATH")
    parser.add_argument("--json", metavar="PATH", help="also save the raw measurements as JSON")
    # internal: one measurement in a fresh process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--solver", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    problems = [p for p in args.problems.split(",") if p]
    solvers = [s for s in args.solvers.split(",") if s]
    for p in problems:
        if p not in PROBLEMS:
            parser.error(f"unknown problem {p!r}; choose from {PROBLEMS}")
    for s in solvers:
        if s not in SOLVERS:
            parser.error(f"unknown solver {s!r}; choose from {SOLVERS}")
    configs: list[tuple[str, dict[str, Any]]] = []
    for solver in solvers:
        given = {"cg": args.cg_options, "lissa": args.lissa_options, "arnoldi": args.arnoldi_options}.get(solver) or [
            "{}"
        ]
        configs += [(solver, json.loads(text)) for text in given]
    if args.threads:
        torch.set_num_threads(args.threads)

    import influencekit as ik
    from influencekit.data import load_digits_split

    started = time.perf_counter()
    load_start = os.getloadavg()
    print(f"machine: {machine_line(args.threads)}")
    print(f"source: {source_line()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}")
    (X, y), (Xt, yt) = load_digits_split(1200)
    print(f"data: digits, {len(X)} train / {len(Xt)} test, {X.dtype}")

    results: list[dict[str, Any]] = []
    train_info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ik-bench-") as tmp:
        for problem in problems:
            torch.manual_seed(0)
            model = build_model(problem, args.hidden)
            task = ik.ClassificationTask(model, l2=L2)
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                kwargs = {} if problem == "logreg" else {"max_iter": args.mlp_max_iter, "tol": args.mlp_tol}
                rep = ik.fit_lbfgs(task, (X, y), **kwargs)
                info = {
                    "trainer": f"ik.fit_lbfgs({', '.join(f'{k}={v:g}' for k, v in kwargs.items()) or 'defaults'})",
                    "iterations": rep.iterations,
                    "grad_norm": rep.grad_norm,
                    "converged": rep.converged,
                }
            info["warnings"] = group_warnings(caught)
            for w in info["warnings"]:
                print(
                    f"note: training {problem} raised {w['category']} (x{w['count']}) from {w['origin']}: "
                    f"{w['message']}"
                )
            info.update(
                seconds=time.perf_counter() - t0,
                n_params=sum(p.numel() for p in model.parameters()),
                train_acc=accuracy(model, X, y),
                test_acc=accuracy(model, Xt, yt),
            )
            train_info[problem] = info
            print(f"trained {problem}: {info}", flush=True)
            state = Path(tmp) / f"{problem}.pt"
            torch.save(model.state_dict(), state)

            ref = None
            for i, (solver, opts) in enumerate(configs):
                print(f"running {problem}/{label(solver, opts)} ...", flush=True)
                r = run_worker(problem, solver, opts, state, Path(tmp) / f"{problem}-{i}-{solver}", args)
                if "error" not in r:
                    S = np.load(r["scores_path"])
                    if solver == "exact":
                        ref = S
                    if ref is not None:
                        r["rel_err"], r["pearson"] = agreement(S, ref)
                    print(
                        f"  fit {r['t_fit']:.2f} s, score {r['t_score']:.2f} s, grad pass {r['t_grad'] * 1e3:.0f} ms, "
                        f"peak RSS {r['rss_peak_mib']:.0f} MiB, worker wall {r['wall']:.1f} s",
                        flush=True,
                    )
                else:
                    print(f"  {r['error']}", flush=True)
                results.append(r)

    total = time.perf_counter() - started
    rows = table_rows(results)
    target_lines = targets(results)
    settings = settings_lines(results, train_info, args)
    warns = warning_lines(results, train_info)
    load_end = os.getloadavg()
    print()
    print(text_table(rows))
    print()
    print("targets:")
    for line in target_lines:
        print("  " + line)
    print("settings:")
    for line in settings:
        print("  " + line)
    if warns:
        print("warnings raised during training, fit and score (recorded, not silenced):")
        for line in warns:
            print("  " + line)
    else:
        print("no warnings raised")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load_end)}; total {total:.0f} s")

    if args.json:
        Path(args.json).write_text(
            json.dumps({"train": train_info, "results": results, "total_s": total}, indent=1, default=str)
        )
        print(f"wrote {args.json}")
    if args.write:
        body = "\n".join(
            [
                f"Command: `python benchmarks/solvers.py {shlex.join(sys.argv[1:])}`",
                "",
                f"Machine: {machine_line(args.threads)}; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} "
                "at end; "
                f"total run time {total:.0f} s.",
                "",
                f"Source: {source_line()}.",
                "",
                "Times are wall-clock seconds, and multiples (`/grad`) of one per-example-gradient pass over the 1,200 "
                "training "
                "points. Each worker times `list(inf.gradients_.stream(inf.train_, side='train'))` 10 times (5 after "
                "`fit`, 5 after "
                "`scores`) and keeps the fastest (`own grad pass`); the unit of the `/grad` columns is the fastest of "
                "these "
                "over the problem's workers "
                f"({', '.join(f'{k}: {v * 1e3:.0f} ms' for k, v in reference_grad(results).items())}). "
                "Peak RSS is the worker process's high-water mark (`VmHWM` from /proc; `ru_maxrss` would report the "
                "parent's "
                "peak, inherited through fork + exec); `+` is how far it rose above the resident memory "
                "just before `fit` (after imports, data and model).",
                "",
                md_table(rows),
                "",
                "Targets:",
                "",
                *(f"- {line}" for line in target_lines),
                "",
                "Settings and solve reports:",
                "",
                *(f"- {line}" for line in settings),
                "",
                "Warnings raised during training, fit and score (recorded, not silenced):"
                if warns
                else "No warnings were raised.",
                "",
                *(f"- {line}" for line in warns),
            ]
        )
        write_markdown(Path(args.write), body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
