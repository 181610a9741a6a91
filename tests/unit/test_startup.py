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


def _composed(overrides: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Compose in a fresh interpreter: the workflow it resolved, then the workflow modules it imported."""
    code = (
        "import sys\n"
        "from matrix_hpc.cli.config_check import ConfigError, compose\n"
        "from matrix_hpc.cli.main import conf_dir\n"
        "try:\n"
        f"    print(compose({overrides!r}, str(conf_dir())).workflow.name)\n"
        "except ConfigError as e:\n"
        "    print('ConfigError:', str(e).replace(chr(10), ' '))\n"
        "print(*sorted(m for m in sys.modules if m.startswith('matrix_hpc.workflows.')))\n"
    )
    import os

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, **(env or {})})
    return r.stdout.splitlines()


def test_the_config_check_imports_only_the_selected_workflow() -> None:
    name, modules = _composed(["workflow=generate", "dataset.path=x.jsonl", "output.dir=out"])
    assert name == "generate"
    assert not any("tau2" in m or "coral" in m or "overhead" in m for m in modules.split()), modules
    name, modules = _composed(["dataset.path=x.jsonl", "output.dir=out"])  # the default in config.yaml
    assert name == "overhead" and "tau2" not in modules and "generate" not in modules


def test_a_config_error_is_still_explained_with_every_workflow_registered() -> None:
    first, modules = _composed(["workflow=generate", "workflow.no_such_key=1", "dataset.path=x", "output.dir=o"])
    assert first.startswith("ConfigError:") and "no_such_key" in first, first
    assert "max_tokens" in first and "agree_prob" not in first, first  # generate's keys, not the default's
    assert "matrix_hpc.workflows.tau2.workflow" in modules.split()  # the retry registered everything
    first, _ = _composed(["workflow=coarl", "dataset.path=x", "output.dir=o"])
    assert first.startswith("ConfigError:") and "coral" in first, first  # the valid choices are named


def test_each_builtin_workflow_module_registers_the_name_it_is_listed_under() -> None:
    from matrix_hpc.runtime import workflow

    for name, module in workflow.BUILTIN_WORKFLOWS.items():
        assert list(workflow.workflow_conf_classes(name)) == [name]
        assert workflow.workflow_conf_classes(name)[name].__module__ == module
