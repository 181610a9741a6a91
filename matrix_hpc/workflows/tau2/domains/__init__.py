"""The tau2 domains, each a sibling package with ``load_base(folder)`` and ``new_environment(base)``."""

from __future__ import annotations

import importlib
from types import ModuleType

DOMAIN_NAMES = ("retail", "airline", "telecom")


def domain_module(name: str) -> ModuleType:
    """The package of domain ``name`` (imported on first use)."""
    if name not in DOMAIN_NAMES:
        raise ValueError(f"unknown tau2 domain {name!r}; choose one of {', '.join(DOMAIN_NAMES)}")
    return importlib.import_module(f"matrix_hpc.workflows.tau2.domains.{name}")
