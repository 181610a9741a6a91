"""The store sits at the bottom: it takes plain rows and imports nothing
above it (DESIGN: cli -> app -> workflows -> runtime -> store)."""

from __future__ import annotations

import ast
from pathlib import Path

import matrix_hpc.store

ABOVE = ("matrix_hpc.runtime", "matrix_hpc.app", "matrix_hpc.workflows", "matrix_hpc.cli", "matrix_hpc.services",
         "matrix_hpc.cluster")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_the_store_imports_nothing_above_it() -> None:
    store = Path(matrix_hpc.store.__file__).parent
    offending = {f"{path.name}: {name}" for path in sorted(store.glob("*.py")) for name in _imports(path)
                 if name.startswith(ABOVE)}
    assert not offending, f"matrix_hpc.store imports layers above it: {sorted(offending)}"
