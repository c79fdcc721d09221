"""`influencekit serve`: the influence explorer, a local web application over an
:class:`~influencekit.index.InfluenceIndex`.

A FastAPI application (:func:`create_app`; run by uvicorn, :func:`serve`) with a JSON API, documented by its
OpenAPI schema at ``/docs`` and ``/openapi.json``:

- ``GET /api/info``: the index (sizes, solver, damping, what its examples look like, class names);
- ``GET /api/examples/{split}/{i}``: one example: label, prediction, loss, self-influence (train), what to show;
- ``POST /api/explain``: ``{"split": "test", "index": i, "k": 10}`` or ``{"input": [...], "label": 3, "k": 10}``: the
  ``k`` most helpful and most harmful training examples, with I_up,loss and the predicted leave-one-out change
  (``"query_rank": r`` on an index with factored rows: low-rank queries, faster and approximate);
- ``GET /api/self-influence?k=50``: the training examples of highest self-influence (likely mislabeled first);

and the page at ``/`` (``explorer/index.html``): pick a test example, see its helpful and harmful training examples,
mark examples (also on the self-influence tab) and export the marked indices as CSV or JSON.

Every request is validated: an unknown split or index, an input of the wrong shape, a k out of range or malformed
JSON gets a 4xx with a message naming the problem, never a 500 or a traceback (library errors become 422). It binds
to 127.0.0.1 unless told otherwise, and reads only the index's ``.npy``/JSON files (no pickle).
"""

# no `from __future__ import annotations`: FastAPI reads the request model from the endpoints' annotations at
# run time, and that model is defined inside create_app (fastapi and pydantic are an optional extra)
import contextlib
import threading
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any, Literal

from ..core.errors import InfluenceKitError, InputError
from ..data.examples import take
from .influence_index import InfluenceIndex

__all__ = ["create_app", "serve", "serving", "MAX_K"]

MAX_K = 200
MAX_QUERY_RANK = 512


def _require_web() -> Any:
    try:
        import fastapi
    except ImportError as exc:  # an optional extra
        raise InputError("the explorer needs FastAPI and uvicorn: pip install 'influencekit[serve]'.") from exc
    return fastapi


class _Explorer:
    """What the routes answer, over one index (HTTP errors as ``(status, message)`` via :class:`_HTTPError`)."""

    def __init__(self, index: InfluenceIndex) -> None:
        self.index = index
        self.lock = threading.Lock()  # one query at a time: the engine's buffers are not shared between threads
        self.n = {"train": index.n_train, "test": int(index.config["n_test"])}
        solver = index.config.get("solver")
        self.solver = solver.get("solver") if isinstance(solver, dict) else solver
        self.image_input = self._image_input()
        index.rows()  # read and verified once at start-up, not by the first query (MNIST: 158 MB, ~0.3 s)
        index.self_influence()

    def _image_input(self) -> dict[str, Any] | None:
        """How the page turns an uploaded image into an input: the stored grey images' size and the inputs' range."""
        meta = self.index.display_meta("test")
        if meta is None or meta["kind"] != "image" or not self.n["test"]:
            return None
        try:
            inputs = self.index.test_examples()._tensors[0]
        except InfluenceKitError:
            return None
        shown = self.index.display_item("test", 0)
        height, width = len(shown), len(shown[0])
        if isinstance(shown[0][0], list) or inputs[0].numel() != height * width:
            return None  # colour images, or inputs that are not the pixels shown
        return {"height": height, "width": width, "low": float(inputs.min()), "high": float(inputs.max())}

    def checked(self, split: str, i: int) -> None:
        n = self.n
        if split not in n:
            raise _HTTPError(404, f"unknown split {split!r}: use 'train' or 'test'")
        if not 0 <= i < n[split]:
            raise _HTTPError(
                404,
                f"{split} example {i} does not exist: the index has {n[split]} {split} examples (0..{n[split] - 1})",
            )

    def describe(self, split: str, i: int) -> dict[str, Any]:
        index = self.index
        out: dict[str, Any] = {"split": split, "index": i}
        for name in ("label", "predicted", "loss"):
            values = index.split_array(name, split)
            out[name] = None if values is None else (float(values[i]) if name == "loss" else int(values[i]))
        meta = index.display_meta(split) or index.display_meta("train")
        names = None if meta is None else meta.get("classes")
        for name in ("label", "predicted"):
            if names and out[name] is not None and out[name] < len(names):
                out[f"{name}_name"] = names[out[name]]
        if split == "train":
            out["self_influence"] = float(index.self_influence()[i])
        out["display"] = index.display_item(split, i)
        return out

    def info(self) -> dict[str, Any]:
        config = self.index.config
        return {
            "n_train": self.n["train"],
            "n_test": self.n["test"],
            "solver": self.solver,
            "solver_settings": config.get("solver"),
            "damping": config.get("damping"),
            "task": config.get("task"),
            "space": config["space"],
            "width": config["width"],
            "max_k": min(MAX_K, self.n["train"]),
            "display": {s: self.index.display_meta(s) for s in ("train", "test")},
            "input": "text" if self.index.encoder is not None else "numbers",
            "image_input": self.image_input,
            "convention": (
                "I_up,loss: the change of the test loss per unit of upweighting; > 0 harmful (removing the example "
                "lowers the test loss), < 0 helpful. LOO change = −I_up,loss / n_train."
            ),
        }

    def self_influence(self, k: int) -> dict[str, Any]:
        k = min(k, self.n["train"])
        order = self.index.self_influence().argsort()[::-1][:k]
        return {"k": k, "examples": [self.describe("train", int(i)) for i in order]}

    def explain(
        self,
        split: str | None,
        i: int | None,
        values: list[Any] | str | None,
        label: int | None,
        k: int,
        query_rank: int | None = None,
    ) -> dict[str, Any]:
        index, n = self.index, self.n
        if (values is None) == (i is None):
            raise _HTTPError(
                422,
                "give either a stored example ({'split': 'test', 'index': i}) or a new one ({'input': [...]}), not "
                "both or neither",
            )
        if k > n["train"]:
            raise _HTTPError(422, f"k={k} is above the number of training examples ({n['train']})")
        start = time.perf_counter()
        with self.lock:
            if values is not None:
                example, used = index.new_input(values, label)
                ranked = index.explain(example, k=k, query_rank=query_rank)
                query: dict[str, Any] = {"split": None, "index": None, "label": used}
            else:
                split = split or "test"
                self.checked(split, i)
                engine = index.engine
                ranked = (
                    index.explain_test([i], k=k, query_rank=query_rank)
                    if split == "test"
                    else index.explain(
                        take(engine.train, [i], dtype=engine.layout.dtype, device=engine.layout.device),
                        k=k,
                        query_rank=query_rank,
                    )
                )
                query = self.describe(split, i)
        lists = {}
        for part in ("helpful", "harmful"):
            top = getattr(ranked, part)
            lists[part] = [
                {**self.describe("train", int(j)), "score": float(v), "loo_change": -float(v) / n["train"]}
                for j, v in zip(top.indices[0].tolist(), top.values[0].tolist())
            ]
        return {"query": query, **lists, "seconds": time.perf_counter() - start}


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def create_app(index: InfluenceIndex) -> Any:
    """The FastAPI application serving ``index`` (module docstring: the routes)."""
    fastapi = _require_web()
    from fastapi import Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    app = fastapi.FastAPI(
        title="influencekit explorer",
        version="1",
        description="Which training examples made the model predict this? Influence functions over a stored index.",
    )
    explorer = _Explorer(index)

    class ExplainRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        split: Literal["test", "train"] | None = Field(None, description="the split of a stored example to explain")
        index: int | None = Field(None, ge=0, description="its position in that split")
        input: list[Any] | str | None = Field(
            None,
            description="a new example: numbers shaped like one stored test input, "
            "or a text where the index has an encoder (GET /api/info: input)",
        )
        label: int | None = Field(None, ge=0, description="the new example's label (default: the model's prediction)")
        k: int = Field(10, ge=1, le=MAX_K, description=f"helpful and harmful examples returned (1..{MAX_K})")
        query_rank: int | None = Field(
            None,
            ge=1,
            le=MAX_QUERY_RANK,
            description="on an index with factored rows (GET /api/info: "
            "space 'factored'): score with the query's rank-r factors per layer, faster and approximate",
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return JSONResponse(status_code=422, content={"detail": f"invalid request: {problems}"})

    @app.exception_handler(_HTTPError)
    async def _http(request: Any, exc: _HTTPError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": exc.message})

    @app.exception_handler(InfluenceKitError)
    async def _library(request: Any, exc: InfluenceKitError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Any, exc: Exception) -> JSONResponse:  # never a traceback to the client
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(exc).__name__}"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("influencekit.index").joinpath("explorer/index.html").read_text(encoding="utf-8")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return explorer.info()

    @app.get("/api/examples/{split}/{i}")
    def example(split: str, i: int) -> dict[str, Any]:
        explorer.checked(split, i)
        return explorer.describe(split, i)

    @app.get("/api/self-influence")
    def self_influence(k: int = Query(50, ge=1, le=MAX_K)) -> dict[str, Any]:
        return explorer.self_influence(k)

    @app.post("/api/explain")
    def explain(request: ExplainRequest) -> dict[str, Any]:
        return explorer.explain(
            request.split, request.index, request.input, request.label, request.k, request.query_rank
        )

    return app


def serve(index: InfluenceIndex, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve the explorer for ``index`` with uvicorn until interrupted (Ctrl-C). Binds to localhost by default."""
    app = create_app(index)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def serving(index: InfluenceIndex, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve the explorer for ``index`` in a background thread for the duration of a ``with`` block (a notebook, a
    test, a benchmark); yields its base URL. ``port=0`` picks a free port."""
    import socket

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(index), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise InputError(f"the explorer could not start on {host}:{port} (is the port taken?).")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
