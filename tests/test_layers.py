"""The package's import structure: one dependency direction, no cycles, no private names
shared between modules.

Every import of `rdonnx/` is parsed with `ast`: module level, inside functions and under
`TYPE_CHECKING` alike. Optional third-party imports inside functions (scipy, onnxsim,
matplotlib...) are not rdonnx imports and are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rdonnx"

# Each layer imports only from its own line and the lines above it.
LAYERS = (
    ("rdonnx.errors", "rdonnx.version", "rdonnx.signals", "rdonnx.fs", "rdonnx.outputs",
     "rdonnx.causes", "rdonnx.strictjson", "rdonnx.bounded", "rdonnx.option", "rdonnx.choices",
     "rdonnx.progress"),
    ("rdonnx.codec", "rdonnx.algo"),
    ("rdonnx.allocate",),
    ("rdonnx.graph",),
    ("rdonnx.runtime",),
    ("rdonnx.report",),
    ("rdonnx.artifact",),
    # flow, inside: the settings, then the measured state, its engines, the methods, the flow
    ("rdonnx.flow.methods.options", "rdonnx.flow.curves"),
    ("rdonnx.flow.config",),
    ("rdonnx.flow.target", "rdonnx.flow.calibration"),
    ("rdonnx.flow.hessians",),
    ("rdonnx.flow.realize", "rdonnx.flow.result"),
    ("rdonnx.flow.methods",),
    ("rdonnx.flow.pipeline", "rdonnx.flow"),
    ("rdonnx.api",),
    ("rdonnx.cli",),
    ("rdonnx",),  # the package root re-exports the API
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, name: str) -> list[tuple[str, tuple[str, ...], int]]:
    """(imported module, imported names, line) for every rdonnx import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "rdonnx" or target.startswith("rdonnx."):
                found.append((target, tuple(a.name for a in node.names), node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((a.name, (), node.lineno) for a in node.names
                         if a.name == "rdonnx" or a.name.startswith("rdonnx."))
    return found


def resolve(target: str, names: tuple[str, ...], known: dict[str, Path]) -> list[str]:
    """The modules an import statement depends on (`from pkg import mod` names the module)."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return subs if subs and len(subs) == len(names) else [target, *subs]


def layer(name: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (rank, prefix)
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target, names, _ in imports(path, name):
            edges[name].update(t for t in resolve(target, names, known) if t != name)
    return edges


def test_every_module_is_in_a_layer():
    for name in modules():
        layer(name)


def test_imports_follow_the_layers():
    known = modules()
    wrong = []
    for name, path in known.items():
        for target, names, line in imports(path, name):
            for dep in resolve(target, names, known):
                if dep != name and layer(dep) > layer(name):
                    wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} "
                                 f"(layer {layer(name)}) imports {dep} (layer {layer(dep)})")
    assert not wrong, "imports against the direction:\n" + "\n".join(wrong)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a list of modules, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lazy_and_type_checking_imports_are_seen(tmp_path):
    path = tmp_path / "model.py"
    path.write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                    "    from rdonnx.cli import main\n\n\n"
                    "def f():\n    from ..flow import pipeline\n")
    found = imports(path, "rdonnx.graph.model")
    assert [(t, n) for t, n, _ in found] == [("rdonnx.cli", ("main",)),
                                             ("rdonnx.flow", ("pipeline",))]
    assert resolve("rdonnx.flow", ("pipeline",), modules()) == ["rdonnx.flow.pipeline"]
    assert layer("rdonnx.flow.pipeline") > layer("rdonnx.graph.model")


def test_no_private_names_across_modules():
    """`from rdonnx.x import _name` and `module._name` of another rdonnx module are refused."""
    known = modules()
    wrong = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for target, names, line in imports(path, name):
            for n in names:
                if n.startswith("_") and n != "__version__" and f"{target}.{n}" not in known:
                    wrong.append(f"{name}:{line}: imports {target}.{n}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
        modules_here = {alias for alias, real in aliases.items()
                        if any(m.endswith("." + real) for m in known)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in modules_here and node.attr.startswith("_") and \
                    not node.attr.startswith("__"):
                wrong.append(f"{name}:{node.lineno}: uses {node.value.id}.{node.attr}")
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)
