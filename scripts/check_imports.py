#!/usr/bin/env python3
"""Static checks of the package's structure: import cycles, and (optionally) over-long functions.

    python scripts/check_imports.py [SRC_DIR] [--max-function-lines N]

SRC_DIR (default: the repository's src/) holds the package(s), or is a package itself. Every module is parsed
with `ast`, nothing is imported. An edge A -> B is any import of B in A that runs: at module level, inside a
function or method, under try/if — all count; only imports under `if TYPE_CHECKING:` are left out (they never
run). `from p.x import y` is an edge to p.x.y when that is a module, else to p.x; relative imports are resolved
against the importing module; a package's __init__ is the package, so its re-exports are edges from it.
A cycle is a strongly connected component of more than one module, or a module that imports itself.

Prints every cycle (its modules, one shortest cycle through it, and each edge inside it with file:line) and
exits 1; else prints "no import cycles". With --max-function-lines N it also lists every function or method
whose `def` line to last body line spans more than N lines (decorators not counted), and exits 1 if any.
Exit 2: no package found, or a file that does not parse.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    file: str
    line: int
    where: str  # "module level" or "in f" (the innermost enclosing function)


def find_modules(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package(s) in `src` (or the package `src`)."""
    if (src / "__init__.py").exists():
        roots = [src]
    else:
        roots = sorted(p for p in src.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    mods: dict[str, Path] = {}
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root.parent).with_suffix("")
            parts = list(rel.parts)
            if any(not p.isidentifier() for p in parts):
                continue  # not importable under a dotted name
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a module of ours (`import a.b.c` runs a.b.c if it exists)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in mods:
            return cand
    return None


class _Imports(ast.NodeVisitor):
    """Collects (target module, line, enclosing function) of every import that runs, at any depth."""

    def __init__(self, module: str, is_package: bool, mods: dict[str, Path]):
        self.module, self.is_package, self.mods = module, is_package, mods
        self.found: list[tuple[str, int, str]] = []
        self.unresolved: list[tuple[str, int]] = []
        self.stack: list[str] = []
        self.ours = {m.split(".")[0] for m in mods}

    def _add(self, target: str, node: ast.AST) -> None:
        where = f"in {'.'.join(self.stack)}" if self.stack else "module level"
        self.found.append((target, node.lineno, where))

    def _scoped(self, node) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # typing-only imports never run: visit the else branch only
            for n in node.orelse:
                self.visit(n)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in self.ours:
                target = _resolve(alias.name, self.mods)
                if target is None:
                    self.unresolved.append((alias.name, node.lineno))
                else:
                    self._add(target, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: against this module's package
            pkg = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            if node.level - 1 > len(pkg) - 1:
                self.unresolved.append(("." * node.level + (node.module or ""), node.lineno))
                return
            base = pkg[: len(pkg) - (node.level - 1)]
            base_name = ".".join(base + ([node.module] if node.module else []))
        else:
            base_name = node.module or ""
            if base_name.split(".")[0] not in self.ours:
                return
        for alias in node.names:
            sub = f"{base_name}.{alias.name}"
            if alias.name != "*" and sub in self.mods:
                self._add(sub, node)
            elif base_name in self.mods:
                self._add(base_name, node)
            else:  # a module that is not there (moved, renamed): warn once, edge to what of it exists
                if (base_name, node.lineno) not in self.unresolved:
                    self.unresolved.append((base_name, node.lineno))
                target = _resolve(base_name, self.mods)
                if target is not None:
                    self._add(target, node)

    def visit_Call(self, node: ast.Call) -> None:  # importlib.import_module("mergeability.x") with a literal
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if (name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str) and node.args[0].value.split(".")[0] in self.ours):
            target = _resolve(node.args[0].value, self.mods)
            if target is not None:
                self._add(target, node)
        self.generic_visit(node)


def parse_all(mods: dict[str, Path]) -> dict[str, ast.Module]:
    trees, bad = {}, []
    for name, f in mods.items():
        try:
            trees[name] = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        except SyntaxError as e:
            bad.append(f"{f}:{e.lineno}: does not parse: {e.msg}")
    if bad:
        print("\n".join(bad), file=sys.stderr)
        sys.exit(2)
    return trees


def import_graph(mods: dict[str, Path], trees: dict[str, ast.Module], rel=lambda p: p) -> tuple[list[Edge], list[str]]:
    edges, warnings = [], []
    for name, tree in trees.items():
        v = _Imports(name, mods[name].name == "__init__.py", mods)
        v.visit(tree)
        edges += [Edge(name, dst, str(rel(mods[name])), line, where) for dst, line, where in v.found]
        warnings += [f"{rel(mods[name])}:{line}: imports {t!r}, which is not a module of the package"
                     for t, line in v.unresolved]
    return edges, warnings


def strongly_connected(nodes, succ: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on deep graphs)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(succ.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(succ.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def shortest_cycle(comp: list[str], succ: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (BFS inside the component)."""
    inside, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    q = deque([start])
    while q:
        v = q.popleft()
        for w in sorted(succ.get(v, ())):
            if w not in inside:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                q.append(w)
    return [start, start]


def find_cycles(edges: list[Edge], nodes) -> list[tuple[list[str], list[str], list[Edge]]]:
    """(modules, one shortest cycle, edges inside) per cycle, in a stable order."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.src, set()).add(e.dst)
    cycles = []
    for comp in strongly_connected(sorted(nodes), succ):
        if len(comp) > 1 or comp[0] in succ.get(comp[0], ()):
            inside = set(comp)
            es = sorted({e for e in edges if e.src in inside and e.dst in inside},
                        key=lambda e: (e.src, e.dst, e.file, e.line))
            cycles.append((comp, shortest_cycle(comp, succ), es))
    return sorted(cycles)


def long_functions(mods: dict[str, Path], trees: dict[str, ast.Module], limit: int, rel=lambda p: p):
    """(file, line, qualified name, lines) of every function/method longer than `limit` lines."""
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                q = f"{prefix}{child.name}"
                n = child.end_lineno - child.lineno + 1  # `def` line to the body's last line
                if n > limit:
                    out.append((str(rel(f)), child.lineno, q, n))
                walk(child, q + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    for name, tree in trees.items():
        f = mods[name]
        walk(tree, "")
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", nargs="?", type=Path, default=Path(__file__).resolve().parent.parent / "src",
                    help="the source directory holding the package(s), or a package (default: the repo's src/)")
    ap.add_argument("--max-function-lines", type=int, metavar="N",
                    help="also fail on any function or method longer than N lines")
    args = ap.parse_args(argv)
    src = args.src
    if not src.is_dir():
        print(f"{src}: not a directory", file=sys.stderr)
        return 2
    mods = find_modules(src)
    if not mods:
        print(f"{src}: no package (a directory with __init__.py) found", file=sys.stderr)
        return 2
    cwd = Path.cwd()

    def rel(p: Path) -> Path:
        try:
            return p.resolve().relative_to(cwd)
        except ValueError:
            return p

    trees = parse_all(mods)
    edges, warnings = import_graph(mods, trees, rel)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    failed = False
    cycles = find_cycles(edges, mods)
    for comp, path, es in cycles:
        kind = "self-import" if len(comp) == 1 else f"{len(comp)} modules"
        print(f"import cycle ({kind}): {' -> '.join(path)}")
        if len(comp) > 2:
            print(f"  modules: {', '.join(comp)}")
        for e in es:
            print(f"  {e.src} -> {e.dst}  ({e.file}:{e.line}, {e.where})")
    if cycles:
        print(f"{len(cycles)} import cycle{'s' if len(cycles) > 1 else ''} among {len(mods)} modules")
        failed = True
    else:
        print(f"no import cycles ({len(mods)} modules, {len(edges)} imports)")
    if args.max_function_lines is not None:
        longs = long_functions(mods, trees, args.max_function_lines, rel)
        for file, line, q, n in longs:
            print(f"{file}:{line}: {q} is {n} lines (> {args.max_function_lines})")
        if longs:
            print(f"{len(longs)} function{'s' if len(longs) > 1 else ''} longer than {args.max_function_lines} lines")
            failed = True
        else:
            print(f"no function longer than {args.max_function_lines} lines")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
