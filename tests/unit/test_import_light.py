"""``import matrix_hpc`` (and the CLI entry point) must not pull heavy engines."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("vllm", "torch", "transformers", "ray", "datasets")


def test_importing_the_package_and_cli_loads_no_heavy_dependency() -> None:
    code = (
        "import sys, matrix_hpc, matrix_hpc.cli.main, matrix_hpc.runtime, matrix_hpc.cluster\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"heavy modules imported: {out}"
