"""Code execution as a workflow step: run a snippet and its tests in a sandbox -> pass/fail.

The shape of a code-verification data pipeline: a model writes a solution,
this step runs it against tests inside a leased sandbox, the verdict and the
output go into the task.

Example (inside a workflow role)::

    async def verify(self, task, ctx):
        result = await code_exec_step(task, ctx, code=task.data["solution"], tests=task.input["tests"])
        return None if result.passed else "coder"   # retry the coder on failure
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from matrix_hpc.services.sandbox.process import ExecResult

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)
_MODES = ("concat", "module", "pytest")


@dataclass
class CodeExecResult:
    passed: bool  # tests ran to the end with exit code 0 inside every limit
    exit_code: int  # the test process's exit code (-9: killed on a limit)
    stdout: str  # test output, capped
    stderr: str  # tracebacks, capped
    timed_out: bool  # ran past timeout_s
    output_truncated: bool  # wrote more than the output cap
    duration_s: float  # wall time of the run, upload included

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, max_chars: int = 2000) -> str:
        """One message for the task history: verdict first, then the tail of the output."""
        verdict = "PASSED" if self.passed else ("TIMED OUT" if self.timed_out else f"FAILED (exit {self.exit_code})")
        tail = (self.stdout + self.stderr)[-max_chars:]
        return f"{verdict}\n{tail}".rstrip()


def extract_code(text: str) -> str:
    """The first fenced code block of a model reply, or the reply itself when it has none."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def _files_and_argv(code: str, tests: str, mode: str, python: str) -> tuple[dict[str, str], list[str]]:
    if mode == "concat":  # HumanEval/MBPP style: one program, tests are asserts after the solution
        return {"program.py": f"{code}\n\n{tests}\n"}, [python, "-B", "program.py"]
    files = {"solution.py": code, "test_solution.py": tests}
    if mode == "module":  # tests `from solution import ...` and assert
        return files, [python, "-B", "test_solution.py"]
    return files, [python, "-B", "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_solution.py"]


async def run_code_with_tests(
    sandbox: Any,  # Any: a LeasedSandbox or a started Sandbox (same exec/put_file methods)
    code: str,
    tests: str,
    *,
    mode: str = "concat",
    timeout_s: float | None = None,
    python: str = "python3",
    stdin: str | None = None,
) -> CodeExecResult:
    """Write the code and tests into the sandbox's scratch dir and run them.

    ``mode``: ``concat`` (one program: code then tests), ``module``
    (``solution.py`` + ``test_solution.py`` run as a script) or ``pytest``
    (same files under pytest, which must be importable inside).
    """
    if mode not in _MODES:
        raise ValueError(f"code execution mode {mode!r} is unknown; choose one of {', '.join(_MODES)}")
    t0 = time.monotonic()
    files, argv = _files_and_argv(code, tests, mode, python)
    for name, content in files.items():
        await sandbox.put_file(name, content)
    r: ExecResult = await sandbox.exec(argv, stdin=stdin, timeout_s=timeout_s)
    return CodeExecResult(passed=r.ok, exit_code=r.exit_code, stdout=r.stdout, stderr=r.stderr,
                          timed_out=r.timed_out, output_truncated=r.output_truncated,
                          duration_s=time.monotonic() - t0)


async def code_exec_step(
    task: Any,  # Any: runtime TaskState (id, attempt, data, add_message)
    ctx: Any,  # Any: runtime AgentContext (ctx.sandboxes is the pool client)
    *,
    code: str,
    tests: str,
    mode: str = "concat",
    timeout_s: float | None = None,
    agent: str = "code_exec",
    result_key: str = "code_exec",
) -> CodeExecResult:
    """Lease a sandbox for ``task``, run ``code`` against ``tests``, record the verdict.

    The verdict is stored in ``task.data[result_key]`` and appended to the
    history as a ``tool`` message; the sandbox is released however this ends.
    """
    async with ctx.sandboxes.lease(task) as sandbox:
        result = await run_code_with_tests(sandbox, extract_code(code), tests, mode=mode, timeout_s=timeout_s)
    task.data[result_key] = result.to_dict()
    if hasattr(task, "add_message"):
        task.add_message(agent, result.summary(), role="tool")
    return result
