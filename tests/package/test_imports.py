"""The package's import graph: one way, no cycles, and no applications in the library.

``import t1t2_fast`` and each of its modules needs torch and numpy only: no application module
(``t1t2_fast.apps``), no framework integration (``t1t2_fast.integrations``, which imports its
framework when used), no plotting or experiment dependency. Each module is imported in a fresh
interpreter, so nothing another test imported hides a missing or unwanted import. The static
graph of the library's imports (module level and inside functions alike, so a cycle cannot hide
behind a function-local import) must have no cycle.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import t1t2_fast

PACKAGE = pathlib.Path(t1t2_fast.__file__).parent
# What the library must never load: its applications and their dependencies.
FORBIDDEN = ("t1t2_fast.apps", "t1t2_fast.integrations", "lightning", "pytorch_lightning", "transformers",
             "matplotlib", "sklearn", "tqdm", "optuna", "higher", "torchopt", "mnist1d", "pandas")
OPTIONAL = {"t1t2_fast.triton_kernels": "triton"}  # modules that need an optional dependency to import


def _modules(apps: bool) -> list[str]:
    """The package's modules: the library's, and with ``apps`` the applications' too."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        name = ".".join(parts)
        outside = name.startswith(("t1t2_fast.apps", "t1t2_fast.integrations"))  # applications, framework glue
        if name.endswith("__main__") or (outside and not apps):
            continue
        out.append(name)
    return out


LIBRARY = _modules(apps=False)
EVERYTHING = _modules(apps=True)


def test_the_library_has_modules_to_check():
    assert {"t1t2_fast", "t1t2_fast.optimizer", "t1t2_fast.functional", "t1t2_fast.noise"} <= set(LIBRARY)


@pytest.mark.parametrize("module", LIBRARY)
def test_a_library_module_imports_alone_without_applications(module):
    for prefix, dependency in OPTIONAL.items():
        if module.startswith(prefix + ".") and importlib.util.find_spec(dependency) is None:
            pytest.skip(f"{module} needs {dependency}, which is not installed")
    # torch itself may load some of them (torch.hub takes tqdm when it is installed): only what the
    # library adds to what `import torch, numpy` loaded counts
    code = (f"import importlib, json, sys, numpy, torch; before = set(sys.modules); "
            f"importlib.import_module({module!r}); print(json.dumps(sorted(set(sys.modules) - before)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    bad = [m for m in loaded if m.startswith(FORBIDDEN)]
    assert not bad, f"importing {module} loads {bad}"


def _imports(module: str) -> set[str]:
    """The library modules ``module`` imports anywhere in its source (relative and absolute)."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    is_package = path.is_dir()
    source = (path / "__init__.py") if is_package else path.with_suffix(".py")
    tree = ast.parse(source.read_text(), str(source))
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            names = [root] + [f"{root}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in EVERYTHING:  # the deepest module of ours the name reaches
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):  # a package's own parents run first anyway
                found.add(name)
    return found


def test_the_import_graph_has_no_cycle():
    """Library and applications: data flows one way."""
    graph = {m: _imports(m) for m in EVERYTHING}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in EVERYTHING:
        if m not in state:
            visit(m)


def test_the_graph_check_sees_function_local_imports(tmp_path):
    """The static check must see an import inside a function (that is where cycles used to hide)."""
    assert "t1t2_fast.triton_kernels" in _imports("t1t2_fast.backend")
