"""The CLI, in-process: it parses arguments and prints what the library computes."""

import re

from typer.testing import CliRunner

from influencekit.cli import app


def test_demo_prints_helpful_and_harmful_points():
    result = CliRunner().invoke(app, ["demo", "--n-test", "2", "--k", "3", "--solver", "exact"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "multiclass logistic regression on scikit-learn digits" in out
    assert out.count("most helpful:") == 2 and out.count("most harmful:") == 2
    values = [float(v) for v in re.findall(r"I_up,loss ([+-][0-9.]+)", out)]
    assert len(values) == 12
    # each block is ordered: helpful values negative-most first, harmful positive-most first
    assert values[0] <= values[1] <= values[2] and values[3] >= values[4] >= values[5]


def test_demo_rejects_an_unknown_solver():
    result = CliRunner().invoke(app, ["demo", "--solver", "magic"])
    assert result.exit_code != 0
    assert "`solver` must be one of 'exact', 'cg', 'lissa'" in str(result.exception) + result.output
