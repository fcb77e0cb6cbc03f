"""The package's layout, enforced: which modules may import which (issue #12).

    pvpy/workstation/   the developer's side: never imports pvpy.device
    pvpy/device/        the device's side: never imports pvpy.workstation
    pvpy/*.py, state/   shared leaves: import neither side
    pvpy/cli.py         the entry point: the one module that imports both (lazily)

Imports are read with ``ast``, every one of them: at module level, inside functions
and under ``if TYPE_CHECKING:`` (a lazy import still couples the two sides). Import
cycles count module-level imports only, the ones that run when a module loads. PID 1
imports only the standard library and pvpy at module level (its memory and start-up
time are measured; a third-party import there is a regression). And no module grows
past 500 lines unless its docstring says why.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pvpy"
ENTRY_POINTS = {"pvpy.cli", "pvpy.__main__"}
MAX_LINES = 500
LONG_REASON = "longer than 500 lines because"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "pvpy.device.update"
    path: Path
    line: int
    target: str  # the module imported, absolute, e.g. "pvpy.store"
    source: str  # the statement as written, for the failure message
    module_level: bool  # runs when the module loads (not in a function or TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.source}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    # `if TYPE_CHECKING:` and `if typing.TYPE_CHECKING:` (pvpy.device.bootenv defines
    # its own TYPE_CHECKING = False to spare PID 1 the typing import: same name)
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(
    body: list[ast.stmt], module_level: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under ``body``, and whether it runs at load time."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, module_level
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _walk(node.body, False)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _walk(node.body, False)
            yield from _walk(node.orelse, module_level)
        else:
            # class bodies, try/except, with, other ifs: they run at load time when
            # their enclosing block does
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    stmts = [c for c in children if isinstance(c, ast.stmt)]
                    yield from _walk(stmts, module_level)
                    for c in children:
                        if isinstance(c, ast.ExceptHandler | ast.match_case):
                            yield from _walk(c.body, module_level)


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports_of(module: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node, module_level in _walk(tree.body, True):
        source = ast.unparse(node)
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, path, node.lineno, alias.name, source, module_level)
            continue
        base = _resolve(module, path, node)
        # `from pvpy.device import board` imports the module pvpy.device.board
        subs = (f"{base}.{alias.name}" for alias in node.names)
        for target in dict.fromkeys(sub if sub in MODULES else base for sub in subs):
            yield Import(module, path, node.lineno, target, source, module_level)


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports_of(module, path)]


def _side(module: str) -> str:
    if module == "pvpy.device" or module.startswith("pvpy.device."):
        return "device"
    if module == "pvpy.workstation" or module.startswith("pvpy.workstation."):
        return "workstation"
    return "shared"


def _report(what: str, bad: list[Import]) -> str:
    return f"{what}:\n" + "\n".join(f"  {imp}" for imp in bad)


def test_the_scan_sees_the_package() -> None:
    # a broken walk would pass every rule below: make sure it finds known imports
    assert {"pvpy.cli", "pvpy.device.pid1", "pvpy.workstation.spec", "pvpy.state"} <= set(MODULES)
    assert any(i.module == "pvpy.cli" and i.target == "pvpy.errors" for i in IMPORTS)
    assert any(i.module == "pvpy.cli" and _side(i.target) == "device" for i in IMPORTS)


def test_workstation_never_imports_the_device() -> None:
    bad = [i for i in IMPORTS if _side(i.module) == "workstation" and _side(i.target) == "device"]
    assert not bad, _report("pvpy.workstation imports device code", bad)


def test_device_never_imports_the_workstation() -> None:
    bad = [i for i in IMPORTS if _side(i.module) == "device" and _side(i.target) == "workstation"]
    assert not bad, _report("pvpy.device imports workstation code", bad)


def test_shared_modules_import_neither_side() -> None:
    bad = [
        i
        for i in IMPORTS
        if _side(i.module) == "shared"
        and i.module not in ENTRY_POINTS
        and _side(i.target) != "shared"
    ]
    assert not bad, _report("a shared module imports one side (only pvpy.cli may)", bad)


def _module_level_graph() -> dict[str, list[Import]]:
    graph: dict[str, list[Import]] = {m: [] for m in MODULES}
    for imp in IMPORTS:
        if imp.module_level and imp.target in MODULES and imp.target != imp.module:
            graph[imp.module].append(imp)
    return graph


def _find_cycle(graph: dict[str, list[Import]]) -> list[Import] | None:
    """One cycle as the chain of imports that closes it, or None."""
    done: set[str] = set()
    stack: list[Import] = []
    on_stack: dict[str, int] = {}

    def visit(module: str) -> list[Import] | None:
        on_stack[module] = len(stack)
        for imp in graph[module]:
            if imp.target in on_stack:
                return [*stack[on_stack[imp.target] :], imp]
            if imp.target not in done:
                stack.append(imp)
                cycle = visit(imp.target)
                if cycle:
                    return cycle
                stack.pop()
        del on_stack[module]
        done.add(module)
        return None

    for module in graph:
        if module not in done:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_no_import_cycles_at_module_level() -> None:
    cycle = _find_cycle(_module_level_graph())
    assert cycle is None, _report("an import cycle (module-level imports)", cycle or [])


def test_pid1_imports_only_stdlib_and_pvpy() -> None:
    graph = _module_level_graph()
    todo = [m for m in MODULES if m == "pvpy.device.pid1" or m.startswith("pvpy.device.pid1.")]
    # importing pvpy.device.pid1 runs the package __init__s above it too
    todo += ["pvpy", "pvpy.device"]
    seen: set[str] = set()
    bad: list[Import] = []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [imp.target for imp in graph[module]]
        bad += [
            i
            for i in IMPORTS
            if i.module == module
            and i.module_level
            and i.target.split(".")[0] not in sys.stdlib_module_names
            and i.target.split(".")[0] != "pvpy"
        ]
    assert not bad, _report("PID 1 imports a third-party module at module level", bad)


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_no_module_over_500_lines() -> None:
    too_long = [
        f"  {p.relative_to(ROOT)}: {n} lines"
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
        and LONG_REASON not in " ".join(_docstring(p).split())
    ]
    assert not too_long, (
        f"modules over {MAX_LINES} lines; split them or say why in the docstring "
        f"({LONG_REASON!r} ...):\n" + "\n".join(too_long)
    )
