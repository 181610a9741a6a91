"""Shared test plumbing.

Integration tests need real components (Ray, Slurm, vLLM, bubblewrap). On a
developer machine without one, its tests skip with a message saying how to
enable them; in CI (``CI`` set) a missing component fails the test instead,
because a skipped integration test proves nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def require_component(available: bool, name: str, how_to_enable: str) -> None:
    """Skip (locally) or fail (in CI) when a real component is missing."""
    if available:
        return
    message = f"{name} is not available here; to enable these tests: {how_to_enable}"
    if os.environ.get("CI"):
        pytest.fail(f"[CI] {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
