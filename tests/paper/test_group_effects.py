"""`influencekit paper groups` on the real data (slow; skipped where ../shared/data lacks the files).

The figures of docs/reproduction.md ("Group effects"): the Newton step within a few percent of retraining on every
grouping, and the mismatch's cause (the 4 training children) the most harmful age group at every order.
"""

import numpy as np
import pytest

from influencekit.validation.groups import metrics_of
from influencekit_paper.group_effects import run_group_effects
from problems import SHARED_DATA

ENRON = SHARED_DATA / "enron" / "enron1.tar.gz"
DIABETES = SHARED_DATA / "diabetes" / "dataset_diabetes.zip"


def _mean_metrics(v, order):
    keep = np.isfinite(v.actual).all(axis=1)
    return metrics_of(v.predicted[order][keep].mean(axis=1), v.actual[keep].mean(axis=1))


@pytest.mark.slow
@pytest.mark.skipif(not ENRON.is_file(), reason="../shared/data/enron/enron1.tar.gz is absent")
def test_spam_groups(tmp_path):
    result = run_group_effects("spam", ENRON.parent, tmp_path)
    for name, v in result.validations.items():
        newton, first = _mean_metrics(v, "newton"), _mean_metrics(v, "1")
        assert newton["spearman"] > 0.99 and abs(newton["slope"] - 1) < 0.25, (name, newton)
        assert newton["mae"] < first["mae"], name  # measured: 3-20x smaller
    assert (tmp_path / "report.md").is_file() and (tmp_path / "groups.png").stat().st_size > 20_000


@pytest.mark.slow
@pytest.mark.skipif(not DIABETES.is_file(), reason="../shared/data/diabetes/dataset_diabetes.zip is absent")
def test_readmission_groups(tmp_path):
    result = run_group_effects("readmission", DIABETES, tmp_path)
    age = result.validations["age group"]
    child = age.names.index("[0-10)")
    for order, values in age.predicted.items():
        means = values.mean(axis=1)
        assert int(np.argmin(means)) == child, order  # removing the children helps the healthy test children most
    assert age.actual[child].mean() == pytest.approx(-0.218, abs=0.005)
    for v in result.validations.values():
        newton = _mean_metrics(v, "newton")
        assert newton["spearman"] > 0.99 and abs(newton["slope"] - 1) < 0.02
