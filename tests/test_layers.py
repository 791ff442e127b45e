"""The layering holds, read from the source (every import, also those inside functions):
``trainers/`` is plain PyTorch (no Ray, no MLflow, nothing of ``orchestrator``), and the modules
of ``orchestrator/`` import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names (``from orchestrator import tracking`` gives
    ``orchestrator.tracking``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_trainers_import_neither_ray_mlflow_nor_the_orchestrator():
    bad = {}
    for path in sorted((ROOT / "trainers").rglob("*.py")):
        found = sorted(m for m in imports(path) if m.split(".")[0] in ("ray", "mlflow", "orchestrator"))
        if found:
            bad[str(path.relative_to(ROOT))] = found
    assert not bad, bad


def test_the_orchestrator_modules_form_no_import_cycle():
    modules = {p.stem: p for p in (ROOT / "orchestrator").glob("*.py") if p.stem != "__init__"}
    graph = {name: sorted({m.split(".")[1] for m in imports(path)
                           if m.startswith("orchestrator.") and m.split(".")[1] in modules} - {name})
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])
