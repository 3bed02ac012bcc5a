"""The house rules of the layout, checked statically (ast: nothing under sockmap/ is imported).

- pure modules import no I/O (asyncio, socket, threads, subprocesses, netlink, ctypes, os,
  files) and no impure sockmap module, and call no ``open()``/``Path.read_*``/``write_*``;
- ``sockmap.agent`` never imports ``sockmap.daemon`` or ``sockmap.cli``, nor the reverse;
- no import cycles among sockmap modules at import time;
- no module over ``MAX_LINES``, and every module opens with a docstring whose first paragraph
  (what the module owns) is at most ``MAX_OPENING_LINES`` lines.

Which imports count: every import anywhere in a file counts for the purity and side rules
(a lazy import inside a function still runs); an import under ``if TYPE_CHECKING:`` never
runs, so it is ignored for purity and cycles but still counts for the side rule (a type from
the other side is still a dependency on it). Cycles are over module-level imports only (a
function-level import is the deliberate way to defer one; it cannot deadlock an import).
``from pkg import mod`` is an import of ``pkg.mod``; a parent package's ``__init__`` that runs
on the way is not counted (``proxy/__init__`` imports the relay; ``proxy.spec`` stays pure).
The last test runs each check on a broken copy of the tree, so none of them can pass blind.
"""

from __future__ import annotations

import ast
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import sockmap

ROOT = Path(sockmap.__file__).parent
MAX_LINES = 450
#: The opening paragraph of a module's docstring (the text before its first blank line) says
#: what the module owns in two or three lines (issue 21); the details go in later paragraphs.
MAX_OPENING_LINES = 3
#: Modules over MAX_LINES whose split is another engineer's open task (issue 21). An entry
#: that is no longer over the limit fails the test: delete it when the split lands.
OVERSIZE_ALLOWED: dict[str, str] = {
}

#: The pure core: parsing, diffing, decisions, records, codecs, rendering. Every module of
#: a package in PURE_PACKAGES is pure too (a new one is checked without being listed),
#: except the named adapters.
PURE_PACKAGES = ("sockmap.conflicts", "sockmap.protocol")
ADAPTERS = {"sockmap.conflicts.flatscan"}  # scans this namespace for `conflicts --flat`
PURE = {
    "sockmap.addrs", "sockmap.errors", "sockmap.protocol", "sockmap.conflicts",
    "sockmap.config", "sockmap.configlines", "sockmap.configrules",
    "sockmap.portwatch.records", "sockmap.portwatch.diff", "sockmap.portwatch.diag",
    "sockmap.portwatch.procnet", "sockmap.portwatch.trace", "sockmap.portwatch.hints",
    "sockmap.portwatch.rtdump", "sockmap.portwatch.sockstat", "sockmap.portwatch.errors",
    "sockmap.proxy.spec", "sockmap.proxy.stats", "sockmap.proxy.flows", "sockmap.proxy.sniff",
    "sockmap.proxy.bpfasm", "sockmap.proxy.bpfprog", "sockmap.proxy.conndiag",
    "sockmap.nat.plan", "sockmap.reports",
    "sockmap.daemon.registry", "sockmap.daemon.metrics", "sockmap.daemon.rows",
    "sockmap.cli.lsview",
}  # fmt: skip
#: Modules whose docstring calls only a part of them pure (the rest does I/O): named here so
#: that any other module whose docstring says "pure" must be in PURE and pass its rules.
PART_PURE = {
    "sockmap.control", "sockmap.conflicts.flatscan", "sockmap.nat.nft",
    "sockmap.portwatch.addrs", "sockmap.portwatch.owners", "sockmap.proxy.share",
    "sockmap.daemon.eventbus", "sockmap.daemon.kernelsync", "sockmap.daemon.lsrows",
}  # fmt: skip
#: Top-level modules a pure module may not import (any submodule of them either).
IO_MODULES = {
    "asyncio", "socket", "selectors", "select", "threading", "subprocess", "multiprocessing",
    "concurrent", "pyroute2", "ctypes", "os", "pathlib", "io", "fcntl", "mmap", "shutil",
    "tempfile", "glob", "signal", "ssl", "asyncio_dgram", "logging", "time", "random",
}  # fmt: skip
#: What a pure module may take from ``socket``: constants and address conversion, no sockets.
SOCKET_PURE = re.compile(r"(AF|IPPROTO|SOCK|SOL|SO|TCP|IPV6)_\w+|inet_(pton|ntop)|[hn]to[hn][sl]")
FILE_METHODS = {"read_text", "read_bytes", "write_text", "write_bytes", "open"}
SIDES = {"sockmap.agent": ("sockmap.daemon", "sockmap.cli"),
         "sockmap.daemon": ("sockmap.agent", "sockmap.cli")}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Imp:
    target: str  # the module imported (a sockmap submodule when ``from pkg import mod``)
    line: int
    top: bool  # at module level (runs at import time)
    typing_only: bool  # under ``if TYPE_CHECKING:``


@dataclass(frozen=True, slots=True, kw_only=True)
class Mod:
    name: str
    rel: str
    tree: ast.Module
    lines: int


class Tree(dict[str, Mod]):
    """Every Python module of the package by dotted name, and its C extensions' names."""

    native: frozenset[str] = frozenset()


def load(root: Path) -> Tree:
    """Every module under ``root`` (the sockmap package dir)."""
    mods = Tree()
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        text = p.read_text()
        mods[".".join(parts)] = Mod(name=".".join(parts), rel=str(p.relative_to(root.parent)),
                                    tree=ast.parse(text), lines=len(text.splitlines()))
    mods.native = frozenset(  # _tick.c -> sockmap.portwatch._tick (built or not)
        ".".join((*p.relative_to(root.parent).parts[:-1], p.name.split(".")[0]))
        for p in [*root.rglob("*.c"), *root.rglob("*.so")])
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, *, top: bool, typing_only: bool) -> Iterator[tuple[ast.AST, bool, bool]]:
    for child in ast.iter_child_nodes(node):
        yield child, top, typing_only
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for n in child.body:
                yield n, top, True
                yield from _walk(n, top=top, typing_only=True)
            for n in child.orelse:
                yield n, top, typing_only
                yield from _walk(n, top=top, typing_only=typing_only)
            continue
        # a class body runs at import time, a function body only when called
        inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _walk(child, top=inner, typing_only=typing_only)


def imports(mod: Mod, mods: Tree) -> list[Imp]:
    out: list[Imp] = []
    pkg = mod.name if mod.rel.endswith("__init__.py") else mod.name.rpartition(".")[0]
    for node, top, typing_only in _walk(mod.tree, top=True, typing_only=False):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            known = mods.keys() | mods.native
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            names = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        out += [Imp(target=n, line=node.lineno, top=top, typing_only=typing_only) for n in names]
    return out


def socket_uses(mod: Mod) -> list[tuple[int, str]]:
    """Each name a module takes from ``socket`` (``socket.X``, ``from socket import X``; a
    bare ``socket`` passed around counts as all of it)."""
    aliases = {a.asname or a.name for n in ast.walk(mod.tree) if isinstance(n, ast.Import)
               for a in n.names if a.name == "socket"}
    uses: list[tuple[int, str]] = []
    via_attr: set[int] = set()
    for n in ast.walk(mod.tree):
        if isinstance(n, ast.ImportFrom) and n.module == "socket" and not n.level:
            uses += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and (
                n.value.id in aliases):
            uses.append((n.lineno, n.attr))
            via_attr.add(id(n.value))
    uses += [(n.lineno, "<socket itself>") for n in ast.walk(mod.tree)
             if isinstance(n, ast.Name) and n.id in aliases and id(n) not in via_attr]
    return uses


def pure_set(mods: Tree) -> set[str]:
    return PURE | {n for n in mods if n.startswith(tuple(p + "." for p in PURE_PACKAGES))
                   and n not in ADAPTERS}


def purity_problems(mods: Tree) -> list[str]:
    problems: list[str] = []
    pure = pure_set(mods)
    for name in sorted(pure):
        if name not in mods:
            problems.append(f"{name}: listed as pure but does not exist (update PURE)")
            continue
        mod = mods[name]
        for imp in imports(mod, mods):
            if imp.typing_only:
                continue
            if imp.target == "socket":
                continue  # judged by use below
            if imp.target.split(".")[0] in IO_MODULES:
                problems.append(f"{mod.rel}:{imp.line}: pure module imports {imp.target}")
            elif imp.target.startswith("sockmap") and imp.target not in pure | {"sockmap"}:
                problems.append(f"{mod.rel}:{imp.line}: pure module imports {imp.target}, "
                                "which is not pure")
        for line, used in socket_uses(mod):
            if not SOCKET_PURE.fullmatch(used):
                problems.append(f"{mod.rel}:{line}: pure module uses socket.{used}")
        for node in ast.walk(mod.tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if (isinstance(f, ast.Name) and f.id == "open") or (
                    isinstance(f, ast.Attribute) and f.attr in FILE_METHODS):
                problems.append(f"{mod.rel}:{node.lineno}: pure module does file I/O")
    for name, mod in mods.items():
        doc = ast.get_docstring(mod.tree) or ""
        if re.search(r"\bpure\b", doc, re.I) and name not in pure | PART_PURE:
            problems.append(f"{mod.rel}: its docstring says pure: add it to PURE (and make it "
                            "so) or, if only a part is, to PART_PURE")
    return problems


def side_problems(mods: Tree) -> list[str]:
    problems: list[str] = []
    for side, banned in SIDES.items():
        if side not in mods:
            problems.append(f"{side}: package missing (the layout of issue 21)")
        for name, mod in mods.items():
            if name != side and not name.startswith(side + "."):
                continue
            for imp in imports(mod, mods):
                hit = [b for b in banned if imp.target == b or imp.target.startswith(b + ".")]
                if hit:
                    problems.append(f"{mod.rel}:{imp.line}: {side} imports {imp.target}")
    return problems


def cycles(mods: Tree) -> list[list[str]]:
    """Strongly connected components of more than one module in the module-level import
    graph (Tarjan)."""
    graph = {n: sorted({i.target for i in imports(m, mods)
                        if i.top and not i.typing_only and i.target in mods and i.target != n}
                       ) for n, m in mods.items()}  # fmt: skip
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: list[str] = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def size_problems(mods: Tree, allowed: dict[str, str] = OVERSIZE_ALLOWED) -> list[str]:
    problems: list[str] = []
    for mod in mods.values():
        if not ast.get_docstring(mod.tree):
            problems.append(f"{mod.rel}: no opening docstring saying what the module owns")
        if mod.lines > MAX_LINES and mod.rel not in allowed:
            problems.append(f"{mod.rel}: {mod.lines} lines, over {MAX_LINES}: split it by concern")
    lines = {m.rel: m.lines for m in mods.values()}
    for rel in allowed:
        if lines.get(rel, 0) <= MAX_LINES:
            problems.append(f"{rel}: on OVERSIZE_ALLOWED but not over {MAX_LINES} lines (or "
                            "gone): delete its entry")
    return problems


def opening_problems(mods: Tree) -> list[str]:
    """Each module whose docstring's first paragraph is over ``MAX_OPENING_LINES`` lines (a
    module without a docstring is ``size_problems``'s to report)."""
    problems: list[str] = []
    for mod in mods.values():
        doc = ast.get_docstring(mod.tree, clean=True)
        if not doc:
            continue
        n = len(re.split(r"\n[ \t]*\n", doc, maxsplit=1)[0].splitlines())
        if n > MAX_OPENING_LINES:
            problems.append(f"{mod.rel}: the first paragraph of its docstring is {n} lines, over "
                            f"{MAX_OPENING_LINES}: say what the module owns in two or three "
                            "lines, the rest in the paragraphs after a blank line")
    return problems


@pytest.fixture(scope="module")
def tree() -> Tree:
    return load(ROOT)


def test_pure_modules_do_no_io(tree: Tree) -> None:
    assert purity_problems(tree) == []


def test_agent_and_daemon_never_import_each_other(tree: Tree) -> None:
    assert side_problems(tree) == []


def test_no_import_cycles(tree: Tree) -> None:
    assert cycles(tree) == []


def test_module_size_and_docstring(tree: Tree) -> None:
    assert size_problems(tree) == []


def test_docstring_opening_paragraph_is_short(tree: Tree) -> None:
    assert opening_problems(tree) == []


def test_each_check_fails_on_a_broken_copy(tmp_path: Path) -> None:
    copy = tmp_path / "sockmap"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))

    def append(rel: str, text: str) -> None:
        p = copy / rel
        p.write_text(p.read_text() + text)

    append("addrs.py", "\nimport socket\n\nAF = socket.AF_INET\nS = socket.socket\n")
    append("conflicts/report.py", "\nimport asyncio\n")
    append("errors.py", "\n\ndef leak() -> str:\n    return open('/etc/hosts').read()\n")
    append("proxy/spec.py", "\nfrom sockmap.proxy import table\n")  # pure -> impure
    append("agent/link.py", "\n\ndef f() -> None:\n    from sockmap.daemon import service\n")
    append("daemon/registry.py", "\nif TYPE_CHECKING:\n    import sockmap.agent.main\n")
    append("portwatch/records.py", "\nimport sockmap.portwatch.diff\n")  # diff imports records
    (copy / "tools.py").write_text("\n".join(["'''doc'''", *["x = 1"] * MAX_LINES]) + "\n")
    (copy / "nodoc.py").write_text("x = 1\n")
    (copy / "claims.py").write_text('"""Something, pure."""\n')
    (copy / "conflicts" / "newpart.py").write_text('"""New."""\nimport subprocess\n')
    (copy / "wordy.py").write_text('"""One.\nTwo.\nThree.\nFour.\n\nMore.\n"""\n')
    (copy / "short.py").write_text('"""One.\nTwo.\nThree.\n\nFour.\nFive.\n"""\n')
    mods = load(copy)
    pure = "\n".join(purity_problems(mods))
    assert "addrs.py:" in pure and "uses socket.socket" in pure
    assert "socket.AF_INET" not in pure  # a constant is no I/O
    assert "report.py:" in pure and "imports asyncio" in pure
    assert "errors.py:" in pure and "file I/O" in pure
    assert "spec.py:" in pure and "sockmap.proxy.table, which is not pure" in pure
    assert "claims.py: its docstring says pure" in pure
    assert "newpart.py:2: pure module imports subprocess" in pure  # unlisted, still checked
    sides = "\n".join(side_problems(mods))
    assert "agent/link.py" in sides and "sockmap.daemon" in sides
    assert "daemon/registry.py" in sides and "sockmap.agent.main" in sides
    assert ["sockmap.portwatch.diff", "sockmap.portwatch.records"] in cycles(mods)
    sizes = "\n".join(size_problems(mods, {"sockmap/nodoc.py": "split already"}))
    assert "sockmap/tools.py:" in sizes and "nodoc.py: no opening docstring" in sizes
    assert "sockmap/nodoc.py: on OVERSIZE_ALLOWED but not over" in sizes
    opening = "\n".join(opening_problems(mods))
    assert "sockmap/wordy.py: the first paragraph of its docstring is 4 lines, over 3" in opening
    assert "short.py" not in opening  # 3 lines, then a blank line: the rest does not count
