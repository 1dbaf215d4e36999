"""The shape of the house: module boundaries, sizes, and a quiet `import gflow`.

These read gflow's source (every import, including those inside functions and under
TYPE_CHECKING) rather than trusting a convention.
"""

import ast
import json
import pathlib
import subprocess
import sys

GFLOW = pathlib.Path(__file__).parent.parent / "gflow"
# Modules that are data rather than code: the derivation of ROCK4's coefficients.
TABLES = {"gflow._solvers._rock4_tables"}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in GFLOW.rglob("*.py"):
        parts = list(path.relative_to(GFLOW.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = modules()


def imports(name: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in module `name`; `from .x import
    y` counts as importing `x.y` when that is a module, else `x`."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            subs = [f"{module}.{alias.name}" for alias in node.names]
            found += [(s, node.lineno) for s in subs if s in MODULES]
            if any(s not in MODULES for s in subs):
                found.append((module, node.lineno))
    return found


def test_no_import_cycles():
    graph = {
        name: {m for m, _ in imports(name) if m in MODULES and m != name}
        for name in MODULES
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(name, path):
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                cycles.append(path[path.index(other) :] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_only_compat_touches_other_packages_internals():
    private = [
        (name, module, line)
        for name in MODULES
        for module, line in imports(name)
        if not module.startswith("gflow")
        and any(part.startswith("_") for part in module.split(".")[1:])
    ]
    assert {name for name, _, _ in private} <= {"gflow._compat"}, private


def test_modules_and_functions_are_small():
    long_modules = {
        name: n
        for name, path in MODULES.items()
        if name not in TABLES and (n := len(path.read_text().splitlines())) > 600
    }
    assert long_modules == {}
    long_functions = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body
                has_doc = isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant
                )
                first = body[1] if has_doc and len(body) > 1 else body[0]
                length = node.end_lineno - first.lineno + 1
                if length > 70:
                    long_functions.append((name, node.name, length))
    assert long_functions == []


_CONFIG = """
import json, jax, jax.monitoring
from jax._src import monitoring
def listeners():
    return sum(len(v) for n, v in vars(monitoring).items()
               if n.endswith("_listeners") and isinstance(v, list))
before = ({k: repr(v) for k, v in jax.config.values.items()}, listeners())
import gflow
after = ({k: repr(v) for k, v in jax.config.values.items()}, listeners())
print(json.dumps([before, after]))
"""


def test_import_gflow_leaves_jax_as_it_found_it():
    done = subprocess.run(
        [sys.executable, "-c", _CONFIG], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    changed = {
        k: (before[0].get(k), after[0].get(k))
        for k in set(before[0]) | set(after[0])
        if before[0].get(k) != after[0].get(k)
    }
    assert changed == {}
    assert before[1] == after[1], "import gflow registered jax.monitoring listeners"
