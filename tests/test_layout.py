"""The house plan, checked on every import in the product code (module level and inside functions):

- ``flows/`` wires and may import everything;
- ``tasks/`` and ``registry/`` import ``qlora/`` (and themselves), never each other or ``flows/``;
- ``qlora/`` imports nothing of the project above it;
- ``demo/`` (the demo builder) imports ``qlora/`` only;
- no import cycle between product files. A file holds one concern, whatever its length: the cap (800 lines)
  only catches a file that has become a drawer.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("flows", "tasks", "registry", "qlora", "demo")
ALLOWED = {
    "flows": {"flows", "tasks", "registry", "qlora", "demo"},
    "tasks": {"tasks", "qlora"},
    "registry": {"registry", "qlora"},
    "qlora": {"qlora"},
    "demo": {"demo", "qlora"},
}
MAX_LINES = 800


def product_files() -> list[Path]:
    return sorted(f for pkg in PACKAGES for f in (REPO / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, anywhere in the file (lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from tasks import reporting" imports the module tasks.reporting
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PACKAGES}
    return out


def _existing_module(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_imports_only_go_down():
    wrong = []
    for f in product_files():
        top = module_name(f).split(".")[0]
        for name in sorted(project_imports(f)):
            if name.split(".")[0] not in ALLOWED[top]:
                wrong.append(f"{f.relative_to(REPO)} imports {name}")
    assert not wrong, "imports running back up the layers:\n" + "\n".join(wrong)


def test_no_import_cycles_between_files():
    files = {module_name(f): f for f in product_files()}
    graph = {m: {d for n in project_imports(f) if (d := _existing_module(n, set(files))) and d != m and
                 not m.startswith(d + ".")}  # a module's own package __init__ is not a dependency edge
             for m, f in files.items()}
    cycles = []
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [m, d]) if d in stack else f"{m} -> {d}")
            elif d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_product_files_stay_small():
    big = [f"{f.relative_to(REPO)} ({n} lines)" for f in product_files()
           if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not big, f"product files over {MAX_LINES} lines (more than one concern?): {big}"


def test_every_package_says_what_it_is():
    missing = [str(f.relative_to(REPO)) for pkg in PACKAGES for f in (REPO / pkg).rglob("__init__.py")
               if ast.get_docstring(ast.parse(f.read_text(encoding="utf-8"))) is None]
    assert not missing, f"package without a docstring: {missing}"
