"""scores(test, folder=...): the pairwise matrix kept on disk in atomic files, resumed after an interruption
with bit-identical values, and refused for another configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.engine.persistence import ScoreFolder


def _fitted(d, damping=0.01):
    return ik.Influence(d.task, d.train, solver="exact", damping=damping, memory_budget=4 * 8 * 650 * 40).fit()


def test_files_equal_the_in_memory_scores(digits_small, tmp_path):
    d = digits_small
    inf = _fitted(d)
    assert inf.chunks_.queries == 40 and len(d.test[0]) == 1497  # 38 files
    plain = inf.scores(d.test)
    kept = inf.scores(d.test, folder=tmp_path)
    assert torch.equal(plain.values, kept.values)
    files = sorted(tmp_path.glob("scores-*.npy"))
    assert len(files) == 38 and kept.metadata["score_files_reused"] == 0
    assert np.array_equal(np.load(files[1], mmap_mode="r"), plain.values[40:80].numpy())
    again = inf.scores(d.test, folder=tmp_path)  # everything read back, nothing computed
    assert again.metadata["score_files_reused"] == 38 and again.metadata["solve_reports"] == []
    assert torch.equal(again.values, plain.values)


def test_an_interrupted_run_resumes_bit_identically(digits_small, tmp_path, monkeypatch):
    d = digits_small
    inf = _fitted(d)
    reference = inf.scores(d.test).values
    original = ScoreFolder.write
    written = []

    def crash_after_three(self, path, block):
        if len(written) == 3:
            raise KeyboardInterrupt("killed")
        original(self, path, block)
        written.append(path)

    monkeypatch.setattr(ScoreFolder, "write", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        inf.scores(d.test, folder=tmp_path)
    monkeypatch.setattr(ScoreFolder, "write", original)
    assert len(list(tmp_path.glob("scores-*.npy"))) == 3 and not list(tmp_path.glob(".*.tmp"))
    resumed = _fitted(d).scores(d.test, folder=tmp_path)  # a fresh process would do the same
    assert resumed.metadata["score_files_reused"] == 3
    assert torch.equal(resumed.values, reference)


def test_another_configuration_is_refused(digits_small, tmp_path):
    d = digits_small
    _fitted(d).scores(d.test, folder=tmp_path)
    with pytest.raises(ik.InputError, match="differs in: damping"):
        _fitted(d, damping=0.1).scores(d.test, folder=tmp_path)
    with pytest.raises(ik.InputError, match="n_test"):
        _fitted(d).scores((d.test[0][:10], d.test[1][:10]), folder=tmp_path)
    with pytest.raises(ik.InputError, match="`rows_per_file` must be"):
        _fitted(d).scores(d.test, folder=tmp_path / "other", rows_per_file=0)
