"""The house rules of docs/architecture.md, checked on the source: no module imports a private
name from another module, and the package's static import graph has no circle."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "streamnorm"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: pathlib.Path, mods: dict[str, pathlib.Path]):
    """(imported module, imported name or None, line) for every streamnorm import of a module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "streamnorm":
                continue
            for alias in node.names:
                yield target, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "streamnorm":
                    yield alias.name, None, node.lineno


def test_no_private_name_is_imported_from_another_module() -> None:
    mods = _modules()
    bad = [
        f"{path.relative_to(ROOT.parent)}:{line} imports {what} from {target}"
        for name, path in mods.items()
        for target, what, line in _imports(name, path, mods)
        if what is not None
        and what.startswith("_")
        and not what.startswith("__")
        and f"{target}.{what}" not in mods  # a private module is fine; its private names are not
    ]
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_circle() -> None:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, what, _ in _imports(name, path, mods):
            full = f"{target}.{what}" if what else target
            dep = full if full in mods else target
            if dep in mods and dep != name:
                graph[name].add(dep)
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)
