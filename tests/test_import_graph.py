"""The import graph of megatron_dapo: no cycles, and every function-level import says why it is there.

The graph is read from the source with :mod:`ast` (nothing is imported). An edge ``A -> B`` means running
module ``A`` may import module ``B`` or names ``B`` defines: module-level imports, imports inside functions and
imports under ``if TYPE_CHECKING:`` all count (a cycle through type annotations is still a cycle of the
design). ``import a.b.c`` and ``from a.b import c`` (``c`` a submodule) give an edge to ``a.b.c``;
``from a.b import name`` (``name`` not a submodule) gives one to ``a.b``.
Importing a module also runs its parent packages' ``__init__``, so an edge to ``a.b.c`` is also one to
``a.b`` and ``a`` -- except to the importer's own ancestors, which Python has started importing before the
importer runs.

A function-level import is allowed when it is optional (an extra that may be missing), heavy (its import cost
matters, e.g. for the command line), or breaks a cycle: a comment on its line, or one above it with only
imports in between, says so with one of those words.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "megatron_dapo"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
REASON = re.compile(r"#.*\b(optional|heavy|cycle)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Import:
    """One import statement: where it is, whether it runs inside a function, and the modules it names."""

    module: str
    line: int
    in_function: bool
    targets: tuple[str, ...]


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package at ``root`` (a package is its
    ``__init__``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             modules: dict[str, Path]) -> tuple[str, ...]:
    if isinstance(node, ast.Import):
        return tuple(alias.name for alias in node.names)
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    named = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
    rest = len(named) < len(node.names)
    return tuple(named + ([source] if rest else []))


def imports(modules: dict[str, Path]) -> list[Import]:
    """Every import statement of every module."""
    found = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    found.append(Import(module, child.lineno, in_function,
                                        _targets(child, module, is_package, modules)))
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, inner)

        visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it may import (parent packages included, own ancestors excluded)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports(modules):
        own = imp.module.split(".")
        ancestors = {".".join(own[:i]) for i in range(1, len(own))}
        for target in imp.targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in modules and name not in ancestors and name != imp.module:
                    graph[imp.module].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]`` when it is acyclic (iterative depth-first)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return []


def test_graph_reader_resolves_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from . import c\n")
    (pkg / "c.py").write_text("def f():\n    from .sub.b import name  # heavy\n    return name\n")
    (pkg / "d.py").write_text("import megatron_dapo.a\n")
    (pkg / "e.py").write_text("def g():\n    from . import d\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import d\n")
    (pkg / "sub" / "b.py").write_text("from megatron_dapo.sub import helper\n")
    modules = module_files(pkg)
    graph = import_graph(modules)
    fn_imports = [i for i in imports(modules) if i.in_function]
    p = PACKAGE
    assert graph[f"{p}.a"] == {f"{p}.sub", f"{p}.sub.b", f"{p}.c"}
    assert graph[f"{p}.c"] == {f"{p}.sub", f"{p}.sub.b"}
    assert graph[f"{p}.sub.b"] == set()  # its own package is an ancestor
    assert graph[f"{p}.sub"] == {f"{p}.d"}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and all(b in graph[a] for a, b in zip(cycle, cycle[1:]))
    assert {f"{p}.sub", f"{p}.d", f"{p}.a"} <= set(cycle)
    graph[f"{p}.sub"].clear()
    assert find_cycle(graph) == []
    assert graph[f"{p}.e"] == {f"{p}.d"}
    assert sorted((i.module, i.line) for i in fn_imports) == [(f"{p}.c", 2), (f"{p}.e", 2)]


def test_no_import_cycle():
    cycle = find_cycle(import_graph(module_files()))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def _explained(text: list[str], imp: Import) -> bool:
    """A reason on the import's first line, or on a comment line above it; the lines in between may only be
    imports or comments (one comment can explain a block of imports)."""
    i = imp.line - 1
    if REASON.search(text[i]):
        return True
    for line in reversed(text[:i]):
        stripped = line.strip()
        if REASON.search(line):
            return True
        if not stripped.startswith(("#", "import ", "from ")):
            return False
    return False


def test_function_level_imports_say_why():
    modules = module_files()
    lines = {m: p.read_text().splitlines() for m, p in modules.items()}
    silent = [f"{modules[i.module].relative_to(ROOT.parent)}:{i.line}: {lines[i.module][i.line - 1].strip()}"
              for i in imports(modules)
              if i.in_function and not _explained(lines[i.module], i)]
    assert not silent, "function-level imports without an '# optional' / '# heavy' / '# cycle' comment:\n" + \
        "\n".join(silent)


def test_algorithm_does_not_depend_on_the_actor():
    """The algorithm is pure torch: it reaches the actor package through no chain of imports (the batch types
    they share live in :mod:`megatron_dapo.batch`)."""
    graph = import_graph(module_files())
    seen, todo = set(), [m for m in graph if m.startswith(f"{PACKAGE}.algorithm")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    assert not sorted(m for m in seen if m.startswith(f"{PACKAGE}.actor")), "algorithm reaches the actor"
