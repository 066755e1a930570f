"""The package's layout rules, checked on its source: no import cycles, no private names imported
across modules, and a library that imports without the CLI's click."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "decalign"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for the imports at a module's top level (not inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((base, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in top_level_imports(path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != name:
                    edges[name].add(candidate)
                    break
    return edges


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_private_names_imported_across_modules():
    offenders = [(module_name(path), target, name)
                 for path in PACKAGE.rglob("*.py") for target, names in top_level_imports(path)
                 for name in names if name.startswith("_") and name != "__version__"]
    assert not offenders, offenders


def test_the_library_imports_without_click():
    code = ("import sys, decalign, decalign.api, decalign.bench, decalign.eval_task, decalign.lora, "
            "decalign.batch_job, decalign.server, decalign.values.train; assert 'click' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
