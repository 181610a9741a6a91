"""Where a run's start-up goes: the one home of its phase times.

With ``MATRIX_HPC_STARTUP_TRACE=1`` in the environment of ``matrix-hpc run``,
each phase of the start prints one line to stderr when it ends::

    matrix-hpc startup: ray_init +2.314 s (+1.902 s) at 1796000000.123

the time since the process started (its start time from ``/proc``, so the
interpreter's own start and the imports count), since the previous phase, and
the wall clock (``benchmarks/bench_startup.py`` reads these lines). Without
the variable a phase costs one attribute check. docs/performance.md
("Start-up") lists the phases.

Lives at the package root (imports nothing of matrix_hpc) so that the cli,
the app and the driver mark their phases through it.
"""

from __future__ import annotations

import os
import sys
import time

TRACE_ENV = "MATRIX_HPC_STARTUP_TRACE"
ENABLED = os.environ.get(TRACE_ENV) == "1"
PREFIX = "matrix-hpc startup:"


def _process_start() -> float:
    """This process's start as a ``time.monotonic()`` value (Linux: /proc; elsewhere: now)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started_after_boot_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in clock ticks
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - started_after_boot_s
        return time.monotonic() - age_s
    except (OSError, IndexError, ValueError, AttributeError):
        return time.monotonic()


_t0 = _process_start() if ENABLED else 0.0
_last = _t0
_seen: set[str] = set()


def phase(name: str) -> None:
    """Mark the end of phase ``name`` (a no-op unless the trace is on; a name repeated later is ignored)."""
    global _last
    if not ENABLED or name in _seen:
        return
    _seen.add(name)
    now = time.monotonic()
    print(f"{PREFIX} {name} +{now - _t0:.3f} s (+{now - _last:.3f} s) at {time.time():.3f}", file=sys.stderr,
          flush=True)
    _last = now
