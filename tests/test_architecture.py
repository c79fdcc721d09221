"""The package's shape, checked from its source: the layer order of docs/ARCHITECTURE.md, no import circles and
no module importing another's private names. The sizes of classes and functions are a report for review, not a
limit: ``python tests/test_architecture.py`` prints the largest.

Imports are read with ``ast`` (no import is executed). Every import counts, those inside functions (lazy imports)
and inside ``if TYPE_CHECKING:`` too: an annotation that needs a module above is a dependency on it all the same.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "influencekit"

# Bottom to top: a module may import modules of its own layer or of the layers below, never above.
# Patterns name modules relative to the package ("solvers.*" is every module of the solvers folder).
LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["core", "core.errors", "core.progress", "core.checks", "core.folders", "core.memory"]),
    (
        "data and model",
        [
            "core.autodiff",
            "data",
            "data.*",
            "core.distributed",
            "core.spectrum",
            "core.projection",
            "core.results",
            "core.task",
        ],
    ),
    ("structure", ["core.layers", "core.lowrank", "core.topk", "core.curvature", "hf", "hf.*", "report", "report.*"]),
    (
        "operators and gradients",
        ["engine.hessian", "engine.last_layer", "engine.gradients", "solvers.base", "solvers.costs", "solvers.fisher"],
    ),
    ("solvers", ["solvers", "solvers.*"]),
    (
        "engine parts",
        [
            "engine.config",
            "engine.persistence",
            "engine.pairwise",
            "engine.fitted",
            "engine.perturbation",
            "engine.groups",
            "engine.training",
            "engine.planner",
            "engine.choice",
        ],
    ),
    ("engine", ["engine", "engine.scoring", "engine.attributors"]),
    (
        "built on the engine",
        [
            "index",
            "index.store",
            "index.influence_index",
            "index.rows",
            "models",
            "models.*",
            "validation",
            "validation.*",
        ],
    ),
    ("applications", ["applications", "applications.*", "index.serve"]),
    ("command line", ["cli"]),
    ("public API", ["", "deprecated_paths"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(
        f"module {module!r} is in no layer of tests/test_architecture.py: add it (and to docs/ARCHITECTURE.md)"
    )


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import of a package module by ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "influencekit" or node.module.startswith("influencekit.")):
                target = node.module.removeprefix("influencekit").lstrip(".")
            else:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}".lstrip(".") for n in names if f"{target}.{n}".lstrip(".") in MODULES]
            for sub in submodules:
                found.append((sub, [], node.lineno))
            rest = [n for n in names if f"{target}.{n}".lstrip(".") not in MODULES]
            if rest or not submodules:
                found.append((target, rest, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "influencekit" or alias.name.startswith("influencekit."):
                    found.append((alias.name.removeprefix("influencekit").lstrip("."), [], node.lineno))
    return [(t, n, line) for t, n, line in found if t != module]


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    upward = []
    for module in sorted(MODULES):
        mine = _layer(module)
        for target, _, line in _imports(module):
            if target not in MODULES:
                continue
            if _layer(target) > mine:
                upward.append(
                    f"{module or 'influencekit'} (layer {LAYERS[mine][0]!r}) imports {target} "
                    f"(layer {LAYERS[_layer(target)][0]!r}) at line {line}"
                )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_there_are_no_import_circles():
    graph = {m: sorted({t for t, _, _ in _imports(m) if t in MODULES}) for m in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def _paper_imports(module: str) -> list[int]:
    """Lines where ``module`` imports the paper's package (``influencekit_paper``)."""
    lines = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if any(n == "influencekit_paper" or n.startswith("influencekit_paper.") for n in names):
            lines.append(node.lineno)
    return lines


def test_the_library_never_imports_the_papers_experiments():
    # the command line's `paper` commands run them; nothing else of the library may depend on them
    found = [f"{m or 'influencekit'}:{line}" for m in sorted(MODULES) if m != "cli" for line in _paper_imports(m)]
    assert not found, "imports of influencekit_paper outside the command line: " + ", ".join(found)
    assert _paper_imports("cli"), "the checker should see the CLI's imports of the paper's runners"


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{m or 'influencekit'} imports {n!r} from {t} (line {line})"
        for m in sorted(MODULES)
        for t, names, line in _imports(m)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not private, "\n".join(private)


# the fitted state of Influence: the modules built on the engine take a FittedEngine (influencekit.engine) instead
ENGINE_FIELDS = {
    "train_",
    "params_",
    "layout_",
    "shard_",
    "progress_",
    "provenance_",
    "chunks_",
    "gradients_",
    "training_side_",
    "grad_norm_",
    "train_loss_",
    "operator_",
    "solver_",
    "solver_loaded_",
    "_engine",
}


def influence_reads() -> list[str]:
    """Reads of Influence's fitted attributes outside scoring.py, as "module:line name" (any ``x.name`` where x is not
    ``self``: solvers' own ``self.operator_`` is theirs)."""
    found = []
    for module, path in MODULES.items():
        if module == "engine.scoring":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ENGINE_FIELDS
                and not (isinstance(node.value, ast.Name) and node.value.id == "self")
            ):
                found.append(f"{module}:{node.lineno} {node.attr}")
    return found


def test_no_module_reads_the_fitted_state_of_influence():
    reads = influence_reads()
    assert not reads, "read the FittedEngine (influence.engine) instead:\n" + "\n".join(reads)


def any_annotations() -> int:
    """Annotations (arguments, returns, annotated names) of the package that mention ``Any``."""
    count = 0
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            annotations: list[ast.expr | None] = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
                annotations = [a.annotation for a in arguments] + [node.returns]
            elif isinstance(node, ast.AnnAssign):
                annotations = [node.annotation]
            count += sum(
                1
                for a in annotations
                if a is not None and any(isinstance(n, ast.Name) and n.id == "Any" for n in ast.walk(a))
            )
    return count


def size_report(top: int = 12) -> list[str]:
    """The ``top`` largest classes and functions of the package, largest first, as "lines  kind  module.name" rows:
    a list for review, not a limit (``python tests/test_architecture.py`` prints it)."""
    sizes = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                sizes.append((node.end_lineno - node.lineno + 1, kind, f"{module or 'influencekit'}.{node.name}"))
    rows = []
    for kind in ("class", "function"):
        largest = sorted((s for s in sizes if s[1] == kind), key=lambda s: (-s[0], s[2]))[:top]
        rows += [f"{lines:5d}  {kind:8s}  {name}" for lines, kind, name in largest]
    return rows


def test_the_size_report_lists_the_largest_classes_and_functions_first():
    rows = size_report(top=5)
    classes = [int(r.split()[0]) for r in rows if r.split()[1] == "class"]
    functions = [int(r.split()[0]) for r in rows if r.split()[1] == "function"]
    assert len(classes) == len(functions) == 5
    assert classes == sorted(classes, reverse=True) and functions == sorted(functions, reverse=True)
    influence = ast.parse(MODULES["engine.scoring"].read_text())
    size = next(
        n.end_lineno - n.lineno + 1 for n in influence.body if isinstance(n, ast.ClassDef) and n.name == "Influence"
    )
    assert classes[0] >= size  # the engine's class is among what is measured


def test_the_checker_sees_a_known_import_and_refuses_an_unplaced_module():
    # the checker itself: scoring's import of the solvers must be found, and a module in no layer refused
    assert any(t == "solvers" for t, _, _ in _imports("engine.scoring"))
    assert _layer("solvers.cg") == _layer("solvers") and _layer("core.errors") < _layer("engine.scoring") < _layer(
        "cli"
    )
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("no_such_module")


if __name__ == "__main__":
    print("The largest classes and functions of src/influencekit (lines), for review:")
    print("\n".join(size_report()))
    print(f"Reads of Influence's fitted attributes outside scoring.py: {len(influence_reads())}")
    print(f"Annotations that say Any: {any_annotations()}")
