"""`influencekit inspect`: CSV encoding, mislabel ranking on a table, clear errors and no partial reports."""

import copy
import csv
import re
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import influencekit as ik
from influencekit import ClassificationTask
from influencekit.applications import inspect as inspect_app
from influencekit.applications.inspect import run_inspect
from influencekit.cli import app, main
from influencekit.core.errors import InputError
from influencekit.data.tabular import OTHER, TabularEncoder, read_rows

torch.set_num_threads(1)

HEADER = ["id", "x1", "x2", "color", "bought"]


def write_csv(path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def table(n, *, seed=0, flip=(), missing=True):
    """Rows of a separable-ish buying decision: 2.5·x1 − 0.25·(x2 − 50) + colour effect + small noise > 0.

    With ``missing``, x2 is empty in every 17th row and colour is 'NA' in every 23rd. ``flip`` lists
    0-based positions whose label is inverted.
    """
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(50, 10, size=n)
    color = rng.choice(["red", "green", "blue"], size=n)
    effect = {"red": 1.5, "green": 0.0, "blue": -1.5}
    score = 2.5 * x1 - 0.25 * (x2 - 50) + np.array([effect[c] for c in color]) + 0.3 * rng.normal(size=n)
    y = np.where(score > 0, "yes", "no")
    for i in flip:
        y[i] = "no" if y[i] == "yes" else "yes"
    rows = []
    for i in range(n):
        x2_text = "" if (missing and i % 17 == 3) else f"{x2[i]:.2f}"
        color_text = "NA" if (missing and i % 23 == 5) else color[i]
        rows.append([f"id{i}", f"{x1[i]:.4f}", x2_text, color_text, y[i]])
    return rows


@pytest.fixture(scope="module")
def flipped_run(tmp_path_factory):
    """300 training rows with 6 labels flipped at random, a separate 80-row test file (with missing values),
    logistic regression."""
    folder = tmp_path_factory.mktemp("flip")
    flips = np.sort(np.random.default_rng(1).choice(300, size=6, replace=False))
    train = write_csv(folder / "train.csv", table(300, seed=0, flip=flips, missing=False))
    test = write_csv(folder / "test.csv", table(80, seed=1))
    result = run_inspect(train, "bought", test=test, out_dir=folder / "report", ignore=("id",), max_test_rows=10)
    return result, flips + 1  # data-row numbers are 1-based


# ------------------------------------------------------------------------------------------ the workflow
def test_flipped_labels_rank_at_the_top_of_the_mislabel_list(flipped_run):
    result, flipped_rows = flipped_run
    listed = [s["row"] for s in result.suspicious]
    ranks = sorted(listed.index(r) + 1 for r in flipped_rows if r in listed)
    # measured: ranks 1, 2, 3, 4, 5, 7 of 300 (checking 10 rows at random finds 0.2 of the 6 flips on average).
    # Over flip seeds 1-5 the worst flipped row ranked 45th (seed 2); seeds 3 and 4 give exactly the top 6.
    assert len(ranks) == 6 and ranks[-1] <= 10 and ranks[4] <= 6, ranks
    # the list is ordered by self-influence and carries each row's original values
    values = [s["self_influence"] for s in result.suspicious]
    assert values == sorted(values, reverse=True)
    first = result.suspicious[0]
    _, raw = read_rows(result.train.path, [first["row"]])
    assert first["values"] == raw[first["row"]] and first["values"][4] == first["label"]


def test_report_folder_holds_tables_figures_and_the_influence_lists(flipped_run):
    result, flipped_rows = flipped_run
    out = result.out_dir
    for name in (
        "report.html",
        "mislabeled.csv",
        "influence.csv",
        "self_influence.png",
        "test_influence.png",
        "inspect.json",
    ):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert page.count("<table>") >= 3 + len(result.explained)
    assert 'src="self_influence.png"' in page and 'src="test_influence.png"' in page
    with open(out / "mislabeled.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["row"]) for r in rows[:6]] == [s["row"] for s in result.suspicious[:6]]
    assert set(flipped_rows.tolist()) <= set(int(r["row"]) for r in rows[:10])
    # 80 test rows, capped at 10: the 10 highest-loss ones, each with k=5 helpful and 5 harmful training rows
    assert len(result.explained) == 10
    with open(out / "influence.csv") as f:
        infl = list(csv.DictReader(f))
    assert len(infl) == 10 * 2 * 5
    for row in infl:  # helpful rows lower the test loss: removing them raises it (I_up,loss < 0)
        value = float(row["influence"])
        assert (value < 0) if row["kind"] == "helpful" else (value > 0)
        assert float(row["predicted_loo_change"]) == pytest.approx(-value / 300, rel=1e-12)


def test_missing_values_are_imputed_and_reported(flipped_run, tmp_path):
    path = write_csv(tmp_path / "train.csv", table(300, seed=0))
    enc = TabularEncoder("bought", ignore=["id"])
    train = enc.fit_transform(path)
    x2 = next(c for c in enc.columns_ if c.name == "x2")
    color = next(c for c in enc.columns_ if c.name == "color")
    # every 17th row (from the 4th) has no x2, every 23rd (from the 6th) colour 'NA'
    assert train.missing == {"x2": 18, "color": 13} == {"x2": len(range(3, 300, 17)), "color": len(range(5, 300, 23))}
    assert x2.kind == "numeric" and x2.indicator and x2.n_missing == 18
    assert color.kind == "categorical" and color.categories[-1] == "(missing)"
    rows = np.arange(300) % 17 == 3
    value, flag = train.X[:, x2.features[0]], train.X[:, x2.features[1]]
    assert np.all(value[rows] == 0.0) and np.all(flag[rows] == 1.0) and np.all(flag[~rows] == 0.0)
    # the observed values are standardised with the training mean and std (population): mean 0, std 1 to round-off
    assert abs(value[~rows].mean()) < 1e-12 and abs(value[~rows].std() - 1) < 1e-12
    assert np.all(train.X[np.arange(300) % 23 == 5, color.features[-1]] == 1.0)
    described = {s["column"]: s["encoding"] for s in enc.summary()}
    assert (
        "18 missing imputed by the mean" in described["x2"] and "13 missing as their own category" in described["color"]
    )

    # the workflow reports them: here only the test file has missing values (the training file has none)
    result, _ = flipped_run
    assert result.train.missing == {} and result.test.missing == {"x2": 5, "color": 4}
    page = (result.out_dir / "report.html").read_text()
    assert re.search(r"<td>x2</td><td>numeric</td><td class=\"num\">0</td><td class=\"num\">5</td>", page)
    assert "missing values imputed: color 0 train / 4 test, x2 0 train / 5 test" in result.text


def test_test_file_is_encoded_with_training_statistics(tmp_path):
    train = write_csv(
        tmp_path / "train.csv",
        [["a", "1", "10", "red", "yes"], ["b", "3", "", "blue", "no"], ["c", "5", "30", "red", "no"]],
    )
    test = write_csv(
        tmp_path / "test.csv",
        [["7", "purple", "no", "9"], ["3", "", "yes", "x"]],
        header=["x1", "color", "bought", "extra"],
    )
    enc = TabularEncoder("bought", ignore=["id", "x2"])
    enc.fit(train)
    data = enc.transform(test)
    x1 = enc.columns_[0]
    assert (x1.mean, x1.scale) == pytest.approx((3.0, np.sqrt(8 / 3)), rel=1e-15)
    assert data.X[:, 0] == pytest.approx([(7 - 3) / np.sqrt(8 / 3), 0.0], rel=1e-15)
    # 'purple' was never seen and colour had no missing value in training: both rows have no colour column set
    assert enc.feature_names_ == ["x1", "color=red", "color=blue"]
    assert np.all(data.X[:, 1:] == 0) and data.unseen == {"color": 1} and data.missing == {"color": 1}
    assert data.y.tolist() == [0, 1] and enc.classes_ == ["no", "yes"]
    # rare values share '(other)', which then also takes unseen test values
    enc2 = TabularEncoder("bought", ignore=["id", "x2"], max_categories=1).fit(train)
    assert enc2.columns_[1].categories == ("red", OTHER)
    assert enc2.transform(test).X[0].tolist()[1:] == [0.0, 1.0]


def test_a_mostly_numeric_column_can_be_declared_categorical(tmp_path):
    rows = [[f"r{i}", str(i % 3), "1", "red", "yes" if i % 2 else "no"] for i in range(20)]
    rows[4][1] = "L"
    path = write_csv(tmp_path / "codes.csv", rows)
    with pytest.raises(InputError, match=r"row 5 \(line 6\), column 'x1': 'L' is not a number"):
        TabularEncoder("bought", ignore=["id"]).fit(path)
    enc = TabularEncoder("bought", ignore=["id"], categorical=["x1"]).fit(path)
    assert enc.columns_[0].kind == "categorical" and set(enc.columns_[0].categories) == {"0", "1", "2", "L"}


def test_chunked_read_equals_reading_at_once(tmp_path):
    path = write_csv(tmp_path / "big.csv", table(20_000, seed=3))
    whole = TabularEncoder("bought", ignore=["id"], chunk_size=10**6)
    small = TabularEncoder("bought", ignore=["id"], chunk_size=777)
    a, b = whole.fit_transform(path), small.fit_transform(path)
    assert a.X.shape == (20_000, 7)  # x1, x2, "x2 missing", 3 colours and "(missing)"
    # bitwise equal: statistics are accumulated in file order whatever the chunk size
    assert np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y) and np.array_equal(a.rows, b.rows)
    assert np.array_equal(a.rows, np.arange(1, 20_001)) and np.array_equal(a.lines, a.rows + 1)
    assert a.missing == b.missing == {"x2": len(range(3, 20_000, 17)), "color": len(range(5, 20_000, 23))}
    # a held-out mask reads only its rows, with the same encoding
    mask = np.zeros(20_000, dtype=bool)
    mask[::5] = True
    part = small.transform(path, rows=mask)
    assert np.array_equal(part.X, a.X[mask]) and np.array_equal(part.rows, a.rows[mask])


def test_mlp_model_finds_the_flipped_rows(tmp_path):
    flips = [10, 60, 110, 160]
    train = write_csv(tmp_path / "train.csv", table(200, seed=4, flip=flips, missing=False))
    test = write_csv(tmp_path / "test.csv", table(60, seed=12))
    result = run_inspect(
        train,
        "bought",
        test=test,
        out_dir=tmp_path / "mlp",
        model="mlp",
        hidden=8,
        steps=300,
        lr=0.02,
        ignore=("id",),
    )
    assert result.metadata["damping"] == 0.01 and result.test_accuracy > 0.85  # measured 0.967
    # a fixed budget of Adam steps stops short of the minimum: the warning is recorded, not lost
    assert any(w.startswith("StationarityWarning") for w in result.warnings)  # measured ||grad R|| = 0.0047
    listed = [s["row"] for s in result.suspicious]
    ranks = sorted(listed.index(r + 1) + 1 for r in flips)
    assert ranks[-1] <= 8, ranks  # measured ranks 1, 2, 4, 5 of 200
    assert (tmp_path / "mlp" / "report.html").is_file()


def test_three_numeric_classes_softmax_and_a_held_out_split(tmp_path):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(150, 2))
    cls = np.where(x[:, 0] > 0.5, "10", np.where(x[:, 1] > 0, "2", "1"))
    path = write_csv(
        tmp_path / "three.csv", [[f"{a:.3f}", f"{b:.3f}", c] for (a, b), c in zip(x, cls)], header=["a", "b", "grade"]
    )
    result = run_inspect(path, "grade", out_dir=tmp_path / "out", l2=1e-2)
    assert result.encoder.classes_ == ["1", "2", "10"]
    assert len(result.train) == 120 and not set(result.train.rows.tolist()) & set(result.test.rows.tolist())
    assert result.metadata["n_features"] == 2 and result.ranked.metadata["n_params"] == 3 * 2 + 3  # 3 logits
    # 30 held-out rows, 20 explained (the cap): the highest-loss ones
    assert len(result.test) == 30 and result.ranked.helpful.indices.shape == (20, 5)
    X, y = result.test.tensors()
    with torch.no_grad():
        p_label = torch.softmax(result.model(X), dim=1)[torch.arange(30), y].numpy()
    explained = np.searchsorted(result.test.rows, [e["row"] for e in result.explained])
    assert np.array_equal(np.sort(explained), np.sort(np.argsort(p_label, kind="stable")[:20]))
    assert [e["p_label"] for e in result.explained] == pytest.approx(p_label[explained].tolist(), rel=1e-12)
    assert result.test_accuracy > 0.85  # measured 1.0 (30 of 30)


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_writes_the_report(tmp_path):
    train = write_csv(tmp_path / "train.csv", table(120, seed=5, flip=[7], missing=False))
    test = write_csv(tmp_path / "test.csv", table(4, seed=6))
    out = tmp_path / "out"
    args = [
        "inspect",
        str(train),
        "--label",
        "bought",
        "--test",
        str(test),
        "--out",
        str(out),
        "--ignore",
        "id",
        "--k",
        "3",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    shown = re.search(r"most likely mislabeled \(row: label, self-influence\): (.*)", result.output).group(1)
    assert re.findall(r"(\d+): (?:yes|no), ", shown)[0] == "8"  # the flipped row comes first (measured)
    assert (out / "report.html").is_file() and len((out / "influence.csv").read_text().splitlines()) == 1 + 4 * 2 * 3
    # a second run replaces the earlier report
    again = CliRunner().invoke(app, args + ["--k", "2"])
    assert again.exit_code == 0, again.output
    assert len((out / "influence.csv").read_text().splitlines()) == 1 + 4 * 2 * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "test.csv", "train.csv"]


def run_main(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["influencekit", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


BROKEN = {
    "wrong type": (
        lambda rows: rows[:9] + [[*rows[9][:2], "fifty", *rows[9][3:]]] + rows[10:],
        None,
        r"train\.csv\), row 10 \(line 11\), column 'x2': 'fifty' is not a number",
    ),
    "unknown test label": (
        lambda rows: rows,
        [["t1", "0.1", "50", "red", "maybe"]],
        r"`test` \(test\.csv\), row 1 \(line 2\): the label 'bought' is 'maybe', a class not in the training data",
    ),
    "empty file": (lambda rows: None, None, r"`data` \(train\.csv\) is empty"),
    "missing label column": (
        lambda rows: [r[:4] for r in rows],
        None,
        r"`label` must name a column of train\.csv\. Got 'bought'; the columns are \['id', 'x1', 'x2', 'color'\]",
    ),
    "header only": (lambda rows: [], None, r"`data` \(train\.csv\) has a header but no data rows"),
    "short row": (
        lambda rows: rows[:3] + [rows[3][:4]] + rows[4:],
        None,
        r"`data` \(train\.csv\), row 4 \(line 5\) has 4 fields but the header has 5 columns",
    ),
    "test value not a number": (
        lambda rows: rows,
        [["t1", "0.1", "n/a?", "red", "yes"]],
        r"`test` \(test\.csv\), row 1 \(line 2\), column 'x2': 'n/a\?' is not a number",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_csv_exits_2_with_a_clear_message_and_no_report(tmp_path, monkeypatch, capsys, case):
    edit, test_rows, message = BROKEN[case]
    rows = edit(table(40, seed=7))
    train = tmp_path / "train.csv"
    if rows is None:
        train.write_text("")
    else:
        write_csv(train, rows, header=HEADER if not rows or len(rows[0]) == 5 else HEADER[:4])
    args = ["inspect", train, "--label", "bought", "--out", tmp_path / "out", "--ignore", "id"]
    if test_rows is not None:
        args += ["--test", write_csv(tmp_path / "test.csv", test_rows)]
    code, err = run_main(monkeypatch, capsys, args)
    assert code == 2
    assert re.search(message, err), err
    assert "Traceback" not in err and re.search(message, err[err.index("error: ") :])  # after the progress bars
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failure_while_writing_leaves_no_partial_report_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    train = write_csv(tmp_path / "train.csv", table(60, seed=8))
    out = tmp_path / "out"
    run_inspect(train, "bought", out_dir=out, ignore=("id",))
    before = (out / "report.html").read_text()

    def broken(*args, **kwargs):
        raise InputError("disk full (simulated)")

    monkeypatch.setattr(inspect_app, "_plot_test_influence", broken)
    with pytest.raises(InputError, match="simulated"):
        run_inspect(train, "bought", out_dir=out, ignore=("id",), k=2)
    assert (out / "report.html").read_text() == before  # the earlier, complete report is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.csv"]  # no staging folder left
    fresh = tmp_path / "fresh"
    with pytest.raises(InputError, match="simulated"):
        run_inspect(train, "bought", out_dir=fresh, ignore=("id",))
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.csv"]


def test_refuses_to_replace_a_folder_that_is_not_a_report(tmp_path):
    train = write_csv(tmp_path / "train.csv", table(60, seed=9))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"exists and is not an earlier report of `influencekit inspect`"):
        run_inspect(train, "bought", out_dir=tmp_path / "mine", ignore=("id",))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ --group-by
def _sourced(tmp_path):
    """300 training rows from four sources; every label of source 'd' is flipped (a careless annotator)."""
    rows = table(300, seed=3, missing=False)
    sources = np.random.default_rng(4).choice(["a", "b", "c", "d"], size=300, p=[0.3, 0.3, 0.3, 0.1])
    out = []
    for row, s in zip(rows, sources):
        label = ("no" if row[4] == "yes" else "yes") if s == "d" else row[4]
        out.append([*row[:4], s, label])
    header = [*HEADER[:4], "source", "bought"]
    return (
        write_csv(tmp_path / "train.csv", out, header),
        write_csv(tmp_path / "test.csv", table(100, seed=8, missing=False)),
        sources,
    )


def test_group_by_ranks_the_flipped_source_as_the_most_harmful(tmp_path):
    train, test, sources = _sourced(tmp_path)
    result = run_inspect(
        train, "bought", test=test, out_dir=tmp_path / "report", ignore=("id", "source"), group_by="source"
    )
    rows = result.groups.rows  # largest |predicted change| first
    assert [abs(r["newton"]) for r in rows] == sorted((abs(r["newton"]) for r in rows), reverse=True)
    assert {r["group"]: r["size"] for r in rows} == {s: int((sources == s).sum()) for s in "abcd"}
    by_name = {r["group"]: r for r in rows}
    assert [r["group"] for r in rows if r["effect"] == "harmful"] == ["d"], rows  # the flipped source alone hurts
    # the Newton step against retraining without the source (the trained copy, L-BFGS to ||grad R|| <= 1e-9)
    task = ClassificationTask(copy.deepcopy(result.model), l2=1e-3)
    X, y = result.train.tensors()
    weights = torch.as_tensor(sources != "d", dtype=torch.float64)
    test_xy = result.test.tensors()
    before = task.loss(task.params(), test_xy).mean()
    assert ik.fit_lbfgs(task, (X, y), weights=weights, tol=1e-9).converged
    actual = float(task.loss(task.params(), test_xy).mean() - before)
    print("removing source d: actual", actual, "newton", by_name["d"]["newton"], "order 1", by_name["d"]["order1"])
    # measured: actual −0.174, Newton −0.098, order 1 −0.131: both predictions see the harm and, as Koh et al. (2019)
    # report for coherent groups, underestimate it (the model moves far: one Newton step from θ̂ stops short)
    assert actual < by_name["d"]["order1"] < 0 and actual < by_name["d"]["newton"] < 0
    out = result.out_dir
    assert (out / "groups.png").stat().st_size > 5_000
    with open(out / "groups.csv") as f:
        table_rows = list(csv.DictReader(f))
    assert [r["source"] for r in table_rows] == [r["group"] for r in rows]
    page = (out / "report.html").read_text()
    assert "Groups of &#x27;source&#x27;" in page or "Groups of 'source'" in page
    assert 'src="groups.png"' in page and "groups of 'source'" in result.text


def test_group_by_a_missing_column_is_refused_before_training(tmp_path, monkeypatch):
    train, test, _ = _sourced(tmp_path)
    monkeypatch.setattr(
        inspect_app, "_train_and_score", lambda *a, **k: pytest.fail("trained before checking --group-by")
    )
    with pytest.raises(
        InputError,
        match=r"`group_by` names no column of the data: 'sourse'; the columns are \['id', 'x1', .*'bought'\]; did you "
        r"mean 'source'\?",
    ):
        run_inspect(train, "bought", test=test, out_dir=tmp_path / "r", group_by="sourse")
    with pytest.raises(InputError, match="must not be the label column"):
        run_inspect(train, "bought", test=test, out_dir=tmp_path / "r", group_by="bought")
    monkeypatch.undo()
    with pytest.raises(InputError, match="looks like an identifier"):
        run_inspect(
            train, "bought", test=test, out_dir=tmp_path / "r", ignore=("id", "source"), group_by="id", max_test_rows=2
        )


def test_cli_group_by(tmp_path):
    train, test, _ = _sourced(tmp_path)
    args = [
        "inspect",
        str(train),
        "--label",
        "bought",
        "--test",
        str(test),
        "--out",
        str(tmp_path / "out"),
        "--ignore",
        "id,source",
        "--group-by",
        "source",
        "--k",
        "2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"groups of 'source' by predicted effect on the mean test loss: .*d \(\d+\): -", result.output), (
        result.output
    )


def test_a_misspelled_label_lists_every_column_and_the_closest(tmp_path):
    header = [f"feature_{j}" for j in range(14)] + ["churned"]
    rows = [[str(j * i % 7) for j in range(14)] + ["yes" if i % 2 else "no"] for i in range(30)]
    train = write_csv(tmp_path / "wide.csv", rows, header)
    with pytest.raises(
        InputError,
        match=r"Got 'churnd'; the columns are \['feature_0', .*'feature_13', 'churned'\]; did you mean 'churned'\?",
    ):
        run_inspect(train, "churnd", out_dir=tmp_path / "r")
