"""The package's shape, checked by reading its source with `ast` (no imports, well under a second).

Every `synth/**/*.py`:
  - has a module docstring and at most `MAX_LINES` lines;
  - imports other `synth` modules at module level only (a deferred import hides a cycle or a layering
    mistake), and nothing from `configs/` or `launch.py` (configs are data handed in, never imported);
  - never reads another module's private name (`other._name`, `from other import _name`): a name another
    module needs is public;
and the import graph of the `synth` modules has no cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "synth"
MAX_LINES = 500
FORBIDDEN_TOPS = ("configs", "launch")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


FILES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in FILES.items()}


def _resolve(module: str, level: int, importer: str) -> str:
    """The absolute module name of `from <level dots><module> import ...` inside `importer`."""
    if not level:
        return module
    package = importer.split(".")
    if not FILES[importer].name == "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str):
    """(target module, imported name or None, node, at module level) for every import in module `name`."""
    tree = TREES[name]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        at_top = id(node) in top_level
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node, at_top, alias
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node.module or "", node.level, name)
            for alias in node.names:
                yield module, alias.name, node, at_top, alias


def _edges(name: str) -> set[str]:
    """The `synth` modules that module `name` imports (a `from pkg import sub` counts as `pkg.sub`)."""
    out = set()
    for module, imported, *_ in _imports(name):
        if imported is not None and f"{module}.{imported}" in FILES:
            out.add(f"{module}.{imported}")
        elif module in FILES:
            out.add(module)
        elif module.startswith("synth."):  # `import synth.a.b`: the deepest existing module.
            parts = module.split(".")
            while parts and ".".join(parts) not in FILES:
                parts.pop()
            if parts:
                out.add(".".join(parts))
    out.discard(name)
    return out


def test_every_module_has_a_docstring_and_at_most_500_lines():
    problems = []
    for name, path in FILES.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            problems.append(f"{name}: {lines} lines (at most {MAX_LINES})")
        if ast.get_docstring(TREES[name]) is None:
            problems.append(f"{name}: no module docstring")
    assert not problems, "\n".join(problems)


def test_synth_never_imports_configs_or_the_launcher():
    problems = [
        f"{name}:{node.lineno} imports {module}"
        for name in FILES
        for module, _, node, _, _ in _imports(name)
        if module.split(".")[0] in FORBIDDEN_TOPS
    ]
    assert not problems, "\n".join(problems)


def test_synth_modules_are_imported_at_module_level_only():
    problems = [
        f"{name}:{node.lineno} imports {module} inside a function"
        for name in FILES
        for module, _, node, at_top, _ in _imports(name)
        if not at_top and module.split(".")[0] == "synth"
    ]
    assert not problems, "\n".join(problems)


def test_the_import_graph_has_no_cycle():
    graph = {name: _edges(name) for name in FILES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done.
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _module_aliases(name: str) -> dict[str, str]:
    """The local names that module `name`'s imports bind to `synth` modules, and those modules."""
    aliases = {}
    for module, imported, _, _, alias in _imports(name):
        if imported is None:
            if module in FILES and alias.asname:
                aliases[alias.asname] = module
        elif f"{module}.{imported}" in FILES:
            aliases[alias.asname or imported] = f"{module}.{imported}"
    return aliases


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def test_no_module_reads_another_modules_private_names():
    problems = []
    for name in FILES:
        aliases = _module_aliases(name)
        for module, imported, node, _, _ in _imports(name):
            if imported and _private(imported) and module.startswith("synth"):
                problems.append(f"{name}:{node.lineno} imports {module}.{imported}")
        for node in ast.walk(TREES[name]):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != name
                and _private(node.attr)
            ):
                problems.append(f"{name}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["synth.train", "synth.stages.synthesis"])
def test_the_checks_see_the_package(name):
    """A guard on the checks themselves: they read the real modules and find their imports."""
    assert name in FILES and _edges(name)
