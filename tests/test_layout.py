"""The package's shape, checked from its sources: no import cycle (package __init__ files
included, as Python runs them), no file past 400 lines, CuPy imported only where the device
lives, and no device test in the model or the training code."""
import ast
import os
import re

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llmpi")
MAX_LINES = 400


def sources():
    for dirpath, dirnames, filenames in os.walk(PACKAGE):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
        for name in filenames:
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def module_name(path):
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path, modules):
    """The llmpi modules `path` imports, module-level or inside functions, plus the packages
    whose __init__ each import runs first (importing a.b.c runs a and a.b)."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:  # `import a.b.X` where X is not a module
                t = t.rpartition(".")[0]
            while t.startswith("llmpi"):
                found.add(t)
                t = t.rpartition(".")[0]
    found.discard(name)
    return {m for m in found if not name.startswith(m + ".")}  # a module's own parents run before it


def graph():
    paths = {module_name(p): p for p in sources()}
    return {m: imports_of(p, paths) for m, p in paths.items()}


def find_cycle(edges):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    edges = graph()
    assert "llmpi.model.gpt" in edges["llmpi.training.run"]  # the graph sees relative imports
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_comm_never_imports_the_model():
    for module, deps in graph().items():
        if module.startswith("llmpi.comm"):
            assert not {d for d in deps if d.startswith(("llmpi.model", "llmpi.training", "llmpi.parallel"))}, module


@pytest.mark.parametrize("path", sorted(sources()), ids=lambda p: os.path.relpath(p, PACKAGE))
def test_files_stay_readable_in_one_sitting(path):
    with open(path) as f:
        assert sum(1 for _ in f) <= MAX_LINES


def test_cupy_only_under_gpu_and_backend():
    for path in sources():
        rel = os.path.relpath(path, PACKAGE)
        text = open(path).read()
        if re.search(r"^\s*(import cupy|from cupy)", text, re.M):
            assert rel.startswith("gpu" + os.sep) or rel == "backend.py", rel


DEVICE_TESTS = re.compile(r"self\.kernels|enabled_for|is cupy|is_device_array|xp is np|xp is not np")


def test_model_and_training_never_test_for_the_device():
    for path in sources():
        rel = os.path.relpath(path, PACKAGE)
        if rel.startswith(("model" + os.sep, "training" + os.sep)):
            assert not DEVICE_TESTS.search(open(path).read()), rel
