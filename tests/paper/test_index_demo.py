"""The ready-made explorer indexes on the real data sets of ../shared/data (skipped, saying why, where absent): built
as `influencekit index build --demo mnist|enron` builds them and reopened as `influencekit serve` reopens them."""

from __future__ import annotations

import pytest

from influencekit_paper.index_demo import build_demo_index, open_served_index
from problems import SHARED_DATA

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["mnist", "enron"])
def test_real_data_demo_index_builds_reopens_and_answers(name, tmp_path):
    data = SHARED_DATA / name
    if not data.exists():
        pytest.skip(f"{data} is absent (the {name} demo reads its data from there)")
    index = build_demo_index(name, tmp_path, data=data)
    reopened = open_served_index(tmp_path)
    assert reopened.influence.solver_loaded_
    expected = index.explain_test([0, 1], k=5)
    again = reopened.explain_test([0, 1], k=5)
    assert (expected.harmful.indices == again.harmful.indices).all()
    if name == "enron":
        import json

        words = json.loads((tmp_path / "demo.json").read_text())["words"]
        example, label = reopened.new_input("Subject: cheap meds, click here to buy now at a discount")
        assert example[0].shape == (1, words) and 3 <= float(example[0].sum()) <= 12  # the known words are set
        assert index.config["width"] == 2 * (words + 1)  # Linear(words, 2): weight and bias
        assert label == 1  # the model calls it spam, and the explanation is of that prediction
        assert reopened.display_meta("train")["kind"] == "text" and isinstance(reopened.display_item("train", 0), str)
    else:
        assert index.n_train == 9000 and index.config["n_test"] == 1000 and index.config["solver"]["solver"] == "ekfac"
