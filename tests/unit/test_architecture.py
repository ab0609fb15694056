"""The package's import graph: no import circle, no library module importing the reference
trainer, layers that import downward only, and torch.distributed used by dist/comm.py alone;
and the unit test tier: one process, no process group.

The graph is read from the source (the AST of every module, imports at module level and
inside functions alike), so nothing is imported and an import that only runs on some path
still counts.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "noether_dist"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

LAYER_OF_TOP = {"errors": "base", "logs": "base", "format": "format", "io": "io", "dist": "dist", "stage": "stage",
                "save": "api", "resume": "api", "initializers": "api", "config": "api", "state": "api", "tiers": "api",
                "tools": "tools", "trainer": "trainer", "integrations": "integrations"}
"""The layer of a module, by its first name below the package (``noether_dist.io.storage``: io)."""

FORBIDDEN = {
    "base": {"format", "io", "dist", "stage", "api", "tools", "trainer", "integrations"},
    "format": {"io", "dist", "stage", "api", "tools", "trainer", "integrations"},
    "io": {"stage", "api", "tools", "trainer", "integrations"},
    "dist": {"stage", "api", "tools", "trainer", "integrations"},
    "stage": {"api", "tools", "trainer", "integrations"},
    "api": {"tools", "trainer", "integrations"},
    "tools": {"trainer", "integrations"},
    "integrations": {"trainer"},
}
"""Layers each layer must not import: errors/logs -> format -> io, dist -> stage -> the API
layer (save, resume, initializers, config, state) -> tools, integrations, trainer."""

KNOWN_VIOLATIONS: set[tuple[str, str]] = set()
"""(importer, imported) arrows against the layers that main has today, each with the work
that removes it. An entry that no longer occurs fails the test, so the list only shrinks."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source. ``from a import b``
    counts as an import of ``a.b`` when that is a module, else of ``a``."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            # ``import noether_dist.io.storage`` names the deepest module that exists
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) for each strongly connected set of
    modules (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_a_cycle(graph, component) for component in components]


def _a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself (breadth first)."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in {component}")  # pragma: no cover - Tarjan found one


def _layer(module: str) -> str:
    parts = module.split(".")
    return "api" if len(parts) == 1 else LAYER_OF_TOP[parts[1]]


def _is_trainer(module: str) -> bool:
    return module == f"{PACKAGE}.trainer" or module.startswith(f"{PACKAGE}.trainer.")


def test_the_graph_is_read_from_every_module():
    graph = _graph()
    # a few arrows that exist, to show the reader resolves relative, from-package and
    # function-level imports
    assert "noether_dist.trainer.loop" in graph and "noether_dist.format.names" in graph
    assert "noether_dist.format.names" in graph["noether_dist.format.layout"]  # from .names import ...
    assert "noether_dist.io.s3store" in graph["noether_dist.io.storage"]  # imported inside a function
    assert "noether_dist.resume" in graph["noether_dist.trainer.loop"]  # from ..resume import resume
    unknown = {m.split(".")[1] for m in graph if m.count(".") >= 1} - set(LAYER_OF_TOP)
    assert not unknown, f"modules outside every layer: {sorted(unknown)}; add them to LAYER_OF_TOP"


def test_the_cycle_finder_finds_a_cycle_and_prints_it():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles in the package:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_library_module_imports_the_trainer():
    graph = _graph()
    bad = sorted((m, t) for m, targets in graph.items() if not _is_trainer(m) for t in targets if _is_trainer(t))
    assert not bad, "library modules import the reference trainer:\n" + "\n".join(f"{m} -> {t}" for m, t in bad)


def test_the_trainer_loop_never_imports_its_entry_point():
    graph = _graph()
    entry = {"noether_dist.trainer.run", "noether_dist.trainer.__main__"}
    for module in graph:
        if _is_trainer(module) and module not in entry:
            assert not graph[module] & entry, f"{module} imports the entry point {sorted(graph[module] & entry)}"


def test_layers_import_downward_only():
    graph = _graph()
    found = {(m, t) for m, targets in graph.items() for t in targets if _layer(t) in FORBIDDEN.get(_layer(m), ())}
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "imports against the layers:\n" + "\n".join(f"{m} ({_layer(m)}) -> {t} ({_layer(t)})"
                                                               for m, t in new)
    gone = sorted(KNOWN_VIOLATIONS - found)
    assert not gone, f"no longer violated, remove from KNOWN_VIOLATIONS: {gone}"


def test_format_is_pure():
    """format/ holds names and paths: it imports only errors and the standard library."""
    graph = _graph()
    for name, path in _modules().items():
        if _layer(name) != "format":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops = [(a.name.split(".")[0], a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [((node.module or "").split(".")[0], node.module)]
            else:
                continue
            for top, full in tops:
                assert top == "__future__" or top in sys.stdlib_module_names, f"{name} imports {full}"
        internal = {t for t in graph[name] if _layer(t) != "format"}
        assert internal <= {"noether_dist.errors"}, f"{name} imports {sorted(internal)}"


def test_only_comm_talks_to_torch_distributed():
    """No library module but dist/comm.py imports torch.distributed itself or calls one of its
    functions (its subpackages: DCP, DTensor, FSDP, are fine)."""
    import ast
    import pathlib

    import noether_dist

    root = pathlib.Path(noether_dist.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "dist" / "comm.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import) and any(a.name == "torch.distributed" for a in node.names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} import torch.distributed")
            elif isinstance(node, ast.ImportFrom) and (
                    (node.module == "torch" and any(a.name == "distributed" for a in node.names))
                    or (node.module == "torch.distributed" and any(a.name[:1].islower() and a.name not in (
                        "checkpoint", "tensor", "fsdp", "device_mesh") for a in node.names))):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} from {node.module} import ...")
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                  and isinstance(node.value.value, ast.Name) and node.value.value.id == "torch"
                  and node.value.attr == "distributed" and not node.attr.startswith("_")
                  and node.attr not in ("checkpoint", "tensor", "fsdp", "device_mesh")):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} torch.distributed.{node.attr}")
    assert not offenders, offenders


# ------------------------------------------------------------------ the one-process test tier

UNIT_TESTS = Path(__file__).resolve().parent
TESTS = UNIT_TESTS.parent

STARTS_PROCESSES = {"subprocess", "multiprocessing", "concurrent.futures.process", "tests.support.ranks",
                    "tests.support.s3_server", "tests.support.slurm_cluster", "tests.support.netns_hosts"}
"""Modules that start processes (or are only there to): no unit test reaches one of them."""

PROCESS_CALLS = {"init_process_group", "init_distributed", "new_group", "run_ranks", "run_jobs", "fork", "forkpty",
                 "Popen", "system", "spawnv", "spawnl", "execv", "execvp", "posix_spawn"}
"""Functions that start a process or a process group, by the name they are called with."""

PROCESS_FIXTURES = {"s3_server", "s3_env", "s3_bucket", "cluster", "two_hosts"}
"""tests/conftest.py's fixtures that start a server, a cluster or network namespaces."""


def _test_imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (``from a import b``: ``a`` and ``a.b``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def _support_closure(modules: set[str]) -> set[str]:
    """``modules`` and every module the tests/support modules among them import, transitively."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = TESTS.parent / (name.replace(".", "/") + ".py")
        if name.startswith("tests.support.") and path.is_file():
            todo.extend(_test_imports(path) - seen)
    return seen


def _process_offenders(path: Path) -> list[str]:
    """What in the test file ``path`` starts a process, a process group or a server."""
    offenders = []
    for name in sorted(_support_closure(_test_imports(path))):
        if any(name == m or name.startswith(m + ".") for m in STARTS_PROCESSES):
            offenders.append(f"{path.name} reaches {name}")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in PROCESS_CALLS:
                offenders.append(f"{path.name}:{node.lineno} calls {called}")
        elif isinstance(node, ast.FunctionDef) and (node.name.startswith("test_") or any(
                "fixture" in ast.unparse(d) for d in node.decorator_list)):
            for arg in sorted({a.arg for a in node.args.args} & PROCESS_FIXTURES):
                offenders.append(f"{path.name}:{node.lineno} {node.name} takes the fixture {arg}")
    return offenders


def test_unit_tests_start_no_process_and_no_process_group():
    """tests/unit is one process: no unit test (nor a helper it imports from tests/support)
    imports a module that starts processes, calls what starts a process or a process group,
    or takes a fixture that starts a server; tests/unit/conftest.py checks at run time that
    no test leaves a process group or a child process behind."""
    files = sorted(UNIT_TESTS.glob("*.py"))
    assert len(files) > 10 and UNIT_TESTS / "test_comm.py" in files  # the walk finds the tier
    offenders = [line for path in files for line in _process_offenders(path)]
    assert not offenders, "tests/unit must stay one process (move these to tests/dist or tests/integration):\n" + \
        "\n".join(offenders)


def test_the_process_check_sees_what_it_forbids(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("from tests.support.models import build\nfrom tests.support.ranks import run_ranks\n"
                   "import subprocess\n\n\ndef test_x(tmp_path, s3_bucket):\n    run_ranks(f, 2)\n"
                   "    torch.distributed.init_process_group('gloo')\n")
    found = sorted(_process_offenders(bad))
    assert found == sorted(["test_bad.py reaches multiprocessing", "test_bad.py reaches multiprocessing.connection",
                     "test_bad.py reaches subprocess", "test_bad.py reaches tests.support.ranks",
                     "test_bad.py reaches tests.support.ranks.run_ranks", "test_bad.py:7 calls run_ranks",
                     "test_bad.py:8 calls init_process_group", "test_bad.py:6 test_x takes the fixture s3_bucket"]), found
