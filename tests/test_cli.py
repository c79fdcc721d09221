"""The CLI, in-process: it parses arguments and prints what the library computes."""

import re

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
