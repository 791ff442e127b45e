"""The layering holds, read from the source (every import, also those inside functions):
``trainers/`` is plain PyTorch (no Ray, no MLflow, nothing of ``orchestrator``); the sub-packages
of ``orchestrator/`` import only their own layer or layers below it (``LAYERS``, bottom first, the
order the README's Layout gives); and its modules import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bottom first; the CLI and the public API (orchestrator/cli.py, orchestrator/api.py) stand on top
LAYERS = ["core", "data", "records", "metrics", "runtime", "runs", "search"]
TOP = ["api", "cli"]


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names (``from orchestrator.records import tracking``
    gives ``orchestrator.records.tracking``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def modules() -> dict[str, Path]:
    """``layer.module`` (or ``api`` / ``cli``) → its file, for every module of ``orchestrator/``."""
    out = {}
    for p in sorted((ROOT / "orchestrator").rglob("*.py")):
        rel = p.relative_to(ROOT / "orchestrator").with_suffix("")
        if rel.name != "__init__":
            out[".".join(rel.parts)] = p
    return out


def orchestrator_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``orchestrator/`` that ``path`` imports (keys of ``known``)."""
    out = set()
    for m in imports(path):
        if m.startswith("orchestrator."):
            parts = m.split(".")[1:]
            for n in (3, 2, 1):
                if ".".join(parts[:n]) in known:
                    out.add(".".join(parts[:n]))
                    break
    return out


def test_trainers_import_neither_ray_mlflow_nor_the_orchestrator():
    bad = {}
    for path in sorted((ROOT / "trainers").rglob("*.py")):
        found = sorted(m for m in imports(path) if m.split(".")[0] in ("ray", "mlflow", "orchestrator"))
        if found:
            bad[str(path.relative_to(ROOT))] = found
    assert not bad, bad


def test_every_orchestrator_module_lives_in_a_named_layer():
    stray = [m for m in modules() if m.split(".")[0] not in LAYERS + TOP]
    assert not stray, f"put these modules in one of the layers {LAYERS} (and name it in the README's Layout): {stray}"
    assert {p.name for p in (ROOT / "orchestrator").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS)


def test_no_layer_imports_a_layer_above_it():
    known = modules()
    rank = {name: i for i, name in enumerate(LAYERS + TOP)}
    upward = {}
    for name, path in known.items():
        here = rank[name.split(".")[0]]
        above = sorted(m for m in orchestrator_imports(path, known) if rank[m.split(".")[0]] > here)
        if above:
            upward[name] = above
    assert not upward, upward


def test_the_orchestrator_modules_form_no_import_cycle():
    known = modules()
    graph = {name: sorted(orchestrator_imports(path, known) - {name}) for name, path in known.items()}
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
