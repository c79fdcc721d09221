"""The CLI, in-process: it parses arguments and prints what the library computes."""

import os
import re
import subprocess
import sys

from typer.testing import CliRunner

from influencekit.cli import app


def test_explain_prints_helpful_and_harmful_points():
    result = CliRunner().invoke(app, ["explain", "--n-test", "2", "--k", "3", "--solver", "exact"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "multiclass logistic regression on scikit-learn digits" in out
    assert out.count("most helpful:") == 2 and out.count("most harmful:") == 2
    values = [float(v) for v in re.findall(r"I_up,loss ([+-][0-9.]+)", out)]
    assert len(values) == 12
    # each block is ordered: helpful values negative-most first, harmful positive-most first
    assert values[0] <= values[1] <= values[2] and values[3] >= values[4] >= values[5]


def test_explain_rejects_an_unknown_solver():
    result = CliRunner().invoke(app, ["explain", "--solver", "magic"])
    assert result.exit_code != 0
    assert "`solver` must be one of 'exact', 'cg', 'lissa'" in str(result.exception) + result.output


def test_demo_writes_report_figures_and_a_table(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n-test", "1", "--top-k", "6", "--n-random", "4", "--solvers", "exact,cg"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = re.findall(r"^(exact|cg)\s+([0-9.-]+)\s", result.output, flags=re.M)
    assert [name for name, _ in rows] == ["exact", "cg"]
    assert all(float(r) > 0.95 for _, r in rows)  # 10 pairs on the highest-loss digit; measured ≈ 0.999
    for name in ("report.md", "loo_exact.png", "loo_cg.png", "influential.png", "loo-cache/manifest.json"):
        assert (out / name).is_file(), name
    assert "| exact |" in (out / "report.md").read_text()
    # a second run reuses every cached retraining
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    assert re.findall(r"^(exact|cg)\s+([0-9.-]+)\s", again.output, flags=re.M) == rows


def test_demo_under_torchrun_with_two_processes(tmp_path):
    # torchrun starts 2 CPU ranks (gloo); each runs the command line. The influence computations are sharded,
    # rank 0 alone retrains, prints and writes, and the table equals a single process's (same 4 printed decimals).
    args = ["demo", "--n-test", "1", "--top-k", "6", "--n-random", "4", "--solvers", "exact,cg,kfac"]
    single = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "influencekit.cli",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("influence vs actual leave-one-out retraining") == 1  # printed by rank 0 only
    table = r"^(exact|cg|kfac)\s+([0-9.-]+)\s+([0-9.-]+)\s"
    rows = re.findall(table, run.stdout, flags=re.M)
    assert [name for name, *_ in rows] == ["exact", "cg", "kfac"]
    assert rows == re.findall(table, single.output, flags=re.M)
    # rank 0's scoring bar counts its own shard: 600 of the 1,200 training digits
    assert "/600 " in run.stderr and "/1200 " not in run.stderr.split("leave-one-out retraining")[-1]
    for name in ("report.md", "loo_exact.png", "loo_kfac.png", "influential.png", "loo-cache/manifest.json"):
        assert (tmp_path / "two" / name).is_file(), name
