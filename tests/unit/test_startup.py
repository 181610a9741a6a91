"""Start-up: the phase trace (matrix_hpc/startup.py) and what a worker process imports."""

from __future__ import annotations

import re
import subprocess
import sys

TRACE_CODE = (
    "import time\n"
    "from matrix_hpc import startup\n"
    "startup.phase('first'); time.sleep(0.2); startup.phase('second'); startup.phase('first')\n"
)
LINE = re.compile(r"^matrix-hpc startup: (\w+) \+([\d.]+) s \(\+([\d.]+) s\) at [\d.]+$")


def _stderr(code: str, **env: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PATH": "/usr/bin:/bin", **env}).stderr


def test_each_phase_prints_once_with_its_offset_since_the_process_started() -> None:
    lines = _stderr(TRACE_CODE, MATRIX_HPC_STARTUP_TRACE="1").splitlines()
    parsed = [m.groups() for line in lines if (m := LINE.match(line))]
    assert len(parsed) == len(lines), lines
    assert [name for name, _, _ in parsed] == ["first", "second"]  # a phase named again is not printed again
    first, second = (float(since_start) for _, since_start, _ in parsed)
    assert first > 0.0  # counted from the process's start (the interpreter's own start-up included)
    assert second - first >= 0.2 - 0.002  # both printed to the millisecond
    assert abs(float(parsed[1][2]) - (second - first)) < 0.002  # the time since the previous phase


def test_without_the_variable_nothing_is_printed() -> None:
    assert _stderr(TRACE_CODE) == ""


def test_a_worker_building_its_workflow_imports_no_other_workflow() -> None:
    code = (
        "import sys\n"
        "from matrix_hpc.workflows.generate import GenerateConf\n"
        "from matrix_hpc.runtime.workflow import build_workflow\n"
        "wf = build_workflow(GenerateConf())\n"
        "print(type(wf).__name__, sorted(m for m in sys.modules if m.startswith('matrix_hpc.workflows.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "Generate"
    assert not any("tau2" in m or "coral" in m or "overhead" in m for m in out[1:]), out
