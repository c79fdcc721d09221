"""The explorer's JSON API over the digits demo index: answers equal the library's, and every bad request gets a
4xx with a message (never a 500 or a traceback). The page itself is tested in a real browser (test_explorer_page.py)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the explorer needs the [serve] extra (fastapi, uvicorn)")
from fastapi.testclient import TestClient  # noqa: E402

from influencekit.index.serve import create_app  # noqa: E402
from influencekit_paper.index_demo import build_demo_index, open_served_index  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("index")
    build_demo_index("digits", folder)
    index = open_served_index(folder)  # as `influencekit serve` opens it: weights read back, solver loaded
    assert index.influence.solver_loaded_
    return index, TestClient(create_app(index))


def test_info_and_examples(demo):
    index, client = demo
    info = client.get("/api/info").json()
    assert (info["n_train"], info["n_test"], info["space"], info["width"]) == (1200, 597, "parameters", 650)
    assert info["display"]["train"]["kind"] == "image" and info["display"]["train"]["classes"][3] == "3"
    assert info["image_input"] == {"height": 8, "width": 8, "low": 0.0, "high": 1.0} and info["input"] == "numbers"
    e = client.get("/api/examples/train/5").json()
    assert e["label"] == int(index.influence.train_._tensors[1][5]) and len(e["display"]) == 8
    assert e["self_influence"] == pytest.approx(float(index.self_influence()[5]), rel=1e-15)
    assert "explain" in client.get("/openapi.json").json()["paths"]["/api/explain"]["post"]["operationId"]
    assert "influencekit explorer" in client.get("/").text


def test_explain_equals_the_library(demo):
    index, client = demo
    body = client.post("/api/explain", json={"split": "test", "index": 7, "k": 6}).json()
    ranked = index.influence.top_k(tuple(t[7:8] for t in index.test_examples()._tensors), k=6)
    assert [e["index"] for e in body["helpful"]] == ranked.helpful.indices[0].tolist()
    # the index multiplies whole rows, Influence.top_k adds up per-layer products: the same numbers, another rounding
    assert [e["score"] for e in body["harmful"]] == pytest.approx(ranked.harmful.values[0].tolist(), rel=1e-12)
    assert body["harmful"][0]["loo_change"] == pytest.approx(-body["harmful"][0]["score"] / 1200, rel=1e-15)
    # a new input: the same test image typed in, at its label
    X, y = index.test_examples()._tensors
    typed = client.post("/api/explain", json={"input": X[7].reshape(8, 8).tolist(), "label": int(y[7]), "k": 6}).json()
    assert [e["index"] for e in typed["helpful"]] == [e["index"] for e in body["helpful"]]
    # a training example can be the query too
    train = client.post("/api/explain", json={"split": "train", "index": 0, "k": 3}).json()
    assert len(train["harmful"]) == 3 and train["query"]["split"] == "train"


def test_self_influence_tab(demo):
    index, client = demo
    body = client.get("/api/self-influence?k=20").json()
    values = [e["self_influence"] for e in body["examples"]]
    assert len(values) == 20 and values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(float(np.max(index.self_influence())), rel=1e-15)


@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        (
            "post",
            "/api/explain",
            {"split": "test", "index": 597},
            404,
            r"test example 597 does not exist: the index has 597 test examples \(0\.\.596\)",
        ),
        ("post", "/api/explain", {"split": "valid", "index": 1}, 422, r"split: Input should be 'test' or 'train'"),
        (
            "post",
            "/api/explain",
            {"split": "test", "index": -1},
            422,
            r"index: Input should be greater than or equal to 0",
        ),
        (
            "post",
            "/api/explain",
            {"split": "test", "index": 1, "k": 10_000},
            422,
            r"k: Input should be less than or equal to 200",
        ),
        (
            "post",
            "/api/explain",
            {"split": "test", "index": 1, "k": 0},
            422,
            r"k: Input should be greater than or equal to 1",
        ),
        (
            "post",
            "/api/explain",
            {"input": [0.5] * 63},
            422,
            r"`input` must have 64 values \(one example of shape \(64,\)\)\. Got 63",
        ),
        ("post", "/api/explain", {"input": [[0.5, "x"]]}, 422, r"`input` must be numbers shaped like one example"),
        ("post", "/api/explain", {}, 422, r"give either a stored example .* or a new one"),
        ("post", "/api/explain", {"index": 1, "input": [1.0]}, 422, r"not both or neither"),
        ("post", "/api/explain", {"index": 1, "colour": "red"}, 422, r"colour: Extra inputs are not permitted"),
        ("post", "/api/explain", "{not json", 422, r"JSON decode error"),
        (
            "post",
            "/api/explain",
            {"index": 1, "query_rank": 0},
            422,
            r"query_rank: Input should be greater than or equal to 1",
        ),
        (
            "post",
            "/api/explain",
            {"index": 1, "query_rank": 4},
            422,
            r"`query_rank` scans factored rows .*this index has parameters rows",
        ),
        ("get", "/api/examples/valid/1", None, 404, r"unknown split 'valid'"),
        ("get", "/api/examples/train/1200", None, 404, r"train example 1200 does not exist"),
        ("get", "/api/examples/train/x", None, 422, r"i: Input should be a valid integer"),
        ("get", "/api/self-influence?k=100000", None, 422, r"k: Input should be less than or equal to 200"),
        ("get", "/api/nothing", None, 404, r"Not Found"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(demo, method, path, body, status, message):
    import re

    _, client = demo
    if method == "post":
        response = (
            client.post(path, content=body, headers={"Content-Type": "application/json"})
            if isinstance(body, str)
            else client.post(path, json=body)
        )
    else:
        response = client.get(path)
    assert response.status_code == status, response.text
    assert re.search(message, response.json()["detail"]), response.json()
    assert "Traceback" not in response.text


def test_query_rank_on_an_index_with_factored_rows(digits_small, tmp_path):
    """EK-FAC on the digits model (one Linear layer, kept as its taps): `query_rank` is answered as the library's
    `explain(..., query_rank=)`, the exact request as before."""
    import influencekit as ik
    from influencekit.index import InfluenceIndex

    d = digits_small
    inf = ik.Influence(d.task, d.train, solver="ekfac", damping=0.01).fit()
    index = InfluenceIndex.build(inf, tmp_path, test=(d.test[0][:20], d.test[1][:20]))
    client = TestClient(create_app(index))
    assert client.get("/api/info").json()["space"] == "factored"
    body = client.post("/api/explain", json={"split": "test", "index": 3, "k": 5, "query_rank": 2}).json()
    ranked = index.explain_test([3], k=5, query_rank=2)
    assert [e["index"] for e in body["harmful"]] == ranked.harmful.indices[0].tolist()
    assert [e["score"] for e in body["helpful"]] == ranked.helpful.values[0].tolist()


def test_serve_refuses_a_folder_without_an_index_or_recipe(tmp_path):
    import influencekit as ik

    with pytest.raises(
        ik.InputError, match=r"holds no influence index \(no manifest\.json\).*influencekit index build --demo digits"
    ):
        open_served_index(tmp_path)
    (tmp_path / "manifest.json").write_text('{"recipe": null}')
    with pytest.raises(ik.InputError, match=r"built from Python with your own model.*serve it from Python"):
        open_served_index(tmp_path)
