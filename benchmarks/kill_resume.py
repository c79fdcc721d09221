"""SIGKILL at random points of the three calls that write to disk, then resume: bit for bit, or the script fails.

For each kind of stored work —

- ``scores``: ``Influence.scores(test, folder=...)`` (one ``scores-*.npy`` per 20 test rows, 60 files),
- ``store``: ``GradientStore.build(influence, folder, ...)`` (one ``grads-*.npy`` per 24 training points, 25 chunks),
- ``cache``: ``Influence(..., cache_dir=...).fit()`` (the fitted exact solver's state, ``solver-state.pt``) —

the script first runs the work once, uninterrupted, in a child process (the reference, and the timing of the
window in which that call writes its files: from the first data file to 50 ms after the last; for the cache, whose
one file is written after a fit, 30 ms either side of its appearance), then ``--trials`` times: a fresh child on a fresh
folder, killed
with SIGKILL at a uniformly random moment of that window; the work is then resumed in this process on the same
folder (the folder's checksums decide what is reused) and compared with the reference: every array returned and
every data file on disk must be equal bit for bit, and every file left damaged by the kill must have been named in
a CorruptFileWarning and recomputed — never returned (a returned damaged chunk would show as a difference).

    python benchmarks/kill_resume.py                    # 20 kills of each kind (about 4 minutes on 2 cores)
    python benchmarks/kill_resume.py --trials 2 --json out.json

Prints one line per kill (the moment, what the folder held, what the resume reused and recomputed) and a
summary per kind; exits with status 1 if any resume differed. Not a timed test: tests/test_faults.py runs it
with one kill per kind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

KINDS = ("scores", "store", "cache")
DATA_FILES = {"scores": "scores-*.npy", "store": "grads-*.npy", "cache": "solver-state.pt"}


def _problem(cache_dir: Path | None = None):
    """Digits logistic regression (600 train, 500 test, 650 parameters) in float64, trained to ‖∇R‖ ≤ 1e-9."""
    import torch

    import influencekit as ik
    from influencekit.data.bundled import load_digits_split
    from influencekit.engine.training import fit_lbfgs

    torch.set_num_threads(1)
    (X, y), (Xt, yt) = load_digits_split(600)
    model = torch.nn.Linear(64, 10).double()
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    task = ik.ClassificationTask(model, l2=1e-2)
    fit_lbfgs(task, (X, y))
    inf = ik.Influence(task, (X, y), solver="exact", damping=0.01, batch_size=100, cache_dir=cache_dir)
    return inf, (Xt, yt)


def work(kind: str, folder: Path) -> np.ndarray:
    """Run (or resume) the stored work of ``kind`` in ``folder`` and return what it computed, as one array."""
    from influencekit.index.store import GradientStore

    if kind == "cache":
        inf, test = _problem(cache_dir=folder)
        _ready()
        inf.fit()
        return inf.scores((test[0][:50], test[1][:50])).values.numpy()
    inf, test = _problem()
    inf.fit()
    _ready()
    if kind == "scores":
        return inf.scores(test, folder=folder, rows_per_file=20).values.numpy()
    store = GradientStore.build(inf, folder, dim=256, kind="gaussian", seed=1, chunk=24)
    return store.scores(test).values.numpy()


_IN_CHILD = {"ready_at": None}


def _ready() -> None:
    """In a child: tell the parent that setup is over (the kill clock starts now)."""
    if _IN_CHILD.get("child"):
        _IN_CHILD["ready_at"] = time.perf_counter()
        print("ready", flush=True)


def _child(kind: str, folder: Path) -> None:
    _IN_CHILD["child"] = True
    work(kind, folder)


def _spawn(kind: str, folder: Path) -> tuple[subprocess.Popen, float]:
    """A child running ``kind`` into ``folder``; returns it once it printed 'ready' (setup done), with that moment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the {kind} child did not start (printed {line!r})")
    return proc, time.perf_counter()


def _window(kind: str, folder: Path) -> tuple[float, float]:
    """Run ``kind`` uninterrupted; the window of its writes, in seconds after 'ready': from the first data file to 50 ms
    after the last (its checksum follows it); for the cache's one file, 30 ms either side of its appearance."""
    proc, ready = _spawn(kind, folder)
    count, first, last = 0, None, 0.0
    while proc.poll() is None:
        now = len(list(folder.glob(DATA_FILES[kind]))) if folder.exists() else 0
        if now != count:
            count, last = now, time.perf_counter() - ready
            first = last if first is None else first
        time.sleep(0.002)
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"the uninterrupted {kind} run failed (exit {proc.returncode}, data files {count})")
    if kind == "cache":
        return max(0.0, first - 0.03), first + 0.03
    return first, last + 0.05


def _files(folder: Path, kind: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(DATA_FILES[kind]))}


def trial(kind: str, folder: Path, at: float, reference: np.ndarray, reference_files: dict[str, bytes]) -> dict:
    """Kill a child ``at`` seconds after it is ready, resume here, compare with the reference."""
    from influencekit.core.errors import CorruptFileWarning

    proc, ready = _spawn(kind, folder)
    while time.perf_counter() - ready < at and proc.poll() is None:
        time.sleep(0.0005)
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = work(kind, folder)
    damaged = [str(w.message).split(":")[0] for w in caught if issubclass(w.category, CorruptFileWarning)]
    files = _files(folder, kind)
    same = bool(np.array_equal(values, reference)) and files == reference_files
    return {
        "kind": kind,
        "killed_at_s": round(at, 4),
        "finished_before_kill": finished,
        "files_left": len(left),
        "data_files_left": sum(1 for name in left if Path(name).match(DATA_FILES[kind])),
        "temporary_files_left": sum(1 for name in left if name.endswith(".tmp")),
        "damaged_named": damaged,
        "bit_identical": same,
    }


def run(kinds: tuple[str, ...], trials: int, seed: int, root: Path) -> list[dict]:
    rng = random.Random(seed)
    results = []
    for kind in kinds:
        ref_folder = root / f"{kind}-reference"
        first, end = _window(kind, ref_folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = work(kind, ref_folder)  # read back: the reference the resumes must equal
        reference_files = _files(ref_folder, kind)
        print(
            f"{kind}: uninterrupted, {len(reference_files)} data file(s) written from {first:.2f} s to {end:.2f} s "
            "after setup; "
            "kills fall uniformly in that window"
        )
        for t in range(trials):
            result = trial(kind, root / f"{kind}-{t}", rng.uniform(first, end), reference, reference_files)
            results.append(result)
            print(
                f"  kill {t + 1:2d} at {result['killed_at_s']:.3f} s: {result['data_files_left']} data file(s) and "
                f"{result['temporary_files_left']} temporary left, damaged named {len(result['damaged_named'])}, "
                f"{'bit-identical' if result['bit_identical'] else 'DIFFERENT'}"
                f"{' (finished before the kill)' if result['finished_before_kill'] else ''}",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="kills per kind (20)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: scores, store, cache")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], Path(args.child[1]))
        return
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds must be among {', '.join(KINDS)}; got {unknown}")
    with tempfile.TemporaryDirectory(prefix="influencekit-kill-") as tmp:
        results = run(kinds, args.trials, args.seed, Path(tmp))
    for kind in kinds:
        mine = [r for r in results if r["kind"] == kind]
        print(
            f"{kind}: {sum(r['bit_identical'] for r in mine)}/{len(mine)} resumes bit-identical; "
            f"{sum(not r['finished_before_kill'] for r in mine)} killed mid-run; "
            f"{sum(bool(r['damaged_named']) for r in mine)} left a damaged file, named and recomputed"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    sys.exit(0 if all(r["bit_identical"] for r in results) else 1)


if __name__ == "__main__":
    main()
