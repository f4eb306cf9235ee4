"""The import rules of the package, read from the code with `ast` (nothing is imported or run).

1. No import circle between sparseft's modules. An edge A -> B is any `import`/`from ... import` of
   B in A, at module level or inside a function, plus B's parent packages other than the root
   (importing `sparseft.seg.model` runs `sparseft/seg/__init__.py` first).
2. Every module belongs to one of the `LAYERS` below; an import from a lower layer to a higher one
   is allowed only if listed in `UPWARD` (at most 3, each with its reason).
3. No function-local import of a sparseft module, except those in `LAZY` (with the reason).

Run: `python -m pytest tests/test_architecture.py -q` (docs/architecture.md explains the layers).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "sparseft"

#: lowest first; a module belongs to the layer of the longest prefix that names it
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["sparseft.version", "sparseft.errors", "sparseft.fileutil", "sparseft.provision",
                    "sparseft.cliopts", "sparseft.kernels", "sparseft.distributed", "sparseft.checkpoint",
                    "sparseft.progress", "sparseft.anatomy", "sparseft.weights", "sparseft.data._random",
                    # the task-kind registry: every layer asks a model's or a data set's kind
                    "sparseft.kinds", "sparseft.kinds.base"]),
    ("data", ["sparseft.data"]),
    ("models", ["sparseft.hub", "sparseft.models", "sparseft.seg.model"]),
    ("engine", ["sparseft.sparse_layers", "sparseft.selected", "sparseft.delta", "sparseft.deltafile",
                "sparseft.selection.selection"]),
    ("selection", ["sparseft.selection", "sparseft.regrow", "sparseft.seg.selection"]),
    ("methods", ["sparseft.methods"]),
    ("tasks", ["sparseft.inference", "sparseft.seg", "sparseft.loaders", "sparseft.train", "sparseft.regularize",
               "sparseft.api",
               "sparseft.taskbank", "sparseft.mixed", "sparseft.run", "sparseft.evalreport",
               # the built-in kinds: built on data, models, selection objectives, loaders and prediction
               "sparseft.kinds.classification", "sparseft.kinds.segmentation",
               # the ecosystem's formats (peft adapters, Hub-style folders, ONNX): built on loading a task
               "sparseft.export", "sparseft.curves", "sparseft.steplog"]),
    ("front", ["sparseft", "sparseft.__main__", "sparseft.cli", "sparseft.data.cli", "sparseft.hub.cli",
               "sparseft.export.cli", "sparseft.demo", "sparseft.bench", "sparseft.methods.report", "sparseft.layers"]),
]

#: (importer, imported) pairs allowed to go from a lower layer to a higher one: at most 3
UPWARD: dict[tuple[str, str], str] = {}

#: (module, function) -> why a sparseft import is deferred there (an optional dependency, on purpose)
LAZY: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The sparseft modules an import statement names (a `from pkg import submodule` names the submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES and name.split(".")[0] == "sparseft":
            yield name


def _imports(module: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str | None]]:
    """Every import statement of `module` with the function it is in (None: module level)."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))

    def walk(node: ast.AST, function: str | None) -> Iterator[tuple[ast.Import | ast.ImportFrom, str | None]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, function
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            yield from walk(child, inner)

    yield from walk(tree, None)


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for node, _ in _imports(module):
            for target in _targets(module, node):
                parts = target.split(".")
                parents = {".".join(parts[:k]) for k in range(2, len(parts))}
                for name in {target} | parents:
                    if name != module and not module.startswith(name + "."):
                        graph[module].add(name)
    return graph


def layer_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py"
    return best[0]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in graph.items() for b in targets if layer_of(a) < layer_of(b)}


def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


def test_circle_finder_finds_one() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_upward_imports_are_listed() -> None:
    assert len(UPWARD) <= 3
    found = upward_imports(import_graph())
    named = {(a, b): f"{LAYERS[layer_of(a)][0]} -> {LAYERS[layer_of(b)][0]}" for a, b in found - set(UPWARD)}
    assert not named, f"imports from a lower layer to a higher one: {named}"


def test_no_function_local_imports_of_sparseft() -> None:
    local = sorted({(module, function) for module in MODULES for node, function in _imports(module)
                    if function is not None and any(_targets(module, node))} - set(LAZY))
    assert not local, f"function-local imports of sparseft modules (move them up, or list them in LAZY): {local}"
