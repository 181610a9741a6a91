"""The import graph matches the architecture (../shared/DESIGN.md, "Layout"):

    cli -> app -> workflows -> runtime -> store

with the services (llm, sandbox) and the cluster below the app and the
workflows, and nothing of them in the runtime or the store. A package may
import any package below it, never one above. The edges are read from the
imports themselves (every ``import`` / ``from ... import`` of matrix_hpc,
at module level or inside functions).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "matrix_hpc"

#: Modules below everything, importable from every package: supervised loops
#: (background), processes, ports, exit codes (procs) and Ray metrics
#: (metrics: every layer records through it; it imports nothing of matrix_hpc)
#: and start-up phase times (startup: the cli, the app and the driver mark their phases).
BOTTOM = {"background", "procs", "metrics", "startup"}

#: package -> the packages it may import (besides BOTTOM).
ALLOWED: dict[str, set[str]] = {
    "cli": {"app", "config", "workflows", "runtime", "store", "services.llm", "services.sandbox", "cluster", "report",
            "data"},
    # export and curation read outputs through the store; only the cli calls them
    "data": {"store"},
    # the HTML report reads part files; its counts come ready-made from the cli (inspect's code)
    "report": {"store"},
    "app": {"config", "workflows", "runtime", "store", "services.llm", "services.sandbox", "cluster"},
    "config": {"workflows", "runtime", "store", "services.llm", "services.sandbox", "cluster"},
    "workflows": {"runtime", "store", "services.llm", "services.sandbox"},
    "runtime": {"store"},
    "store": set(),
    "services.llm": set(),
    "services.sandbox": set(),
    "cluster": {"services.llm"},  # cluster_monitor.py: the cluster's Prometheus scrapes deployed LLM services
}
ALLOWED = {package: allowed | BOTTOM for package, allowed in ALLOWED.items()} | {m: set() for m in BOTTOM}


def package_of(module: str) -> str:
    """``matrix_hpc.store.sink`` -> ``store``; the services count one package each."""
    parts = module.split(".")
    if len(parts) < 2:
        return "matrix_hpc"
    if parts[1] == "services" and len(parts) > 2:
        return f"services.{parts[2]}"
    return parts[1]


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(from package, to package) -> the files that make the edge."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        source = package_of(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("matrix_hpc.") and package_of(target) != source:
                    edges[(source, package_of(target))].append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return edges


def test_every_package_is_placed_in_the_layers() -> None:
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
               for p in PACKAGE.rglob("*.py")}
    packages = {package_of(m) for m in modules} - {"matrix_hpc", "services"}
    assert packages <= set(ALLOWED), f"new package(s) to place in ALLOWED: {sorted(packages - set(ALLOWED))}"


def test_imports_point_one_way() -> None:
    wrong = {edge: where for edge, where in import_edges().items() if edge[1] not in ALLOWED.get(edge[0], set())}
    assert not wrong, "imports against the layering:\n" + "\n".join(
        f"  {a} -> {b}: {', '.join(where)}" for (a, b), where in sorted(wrong.items()))
