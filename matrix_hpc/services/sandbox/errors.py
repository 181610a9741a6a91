"""The error every sandbox failure is (or derives from): a sandbox that cannot be started, used or stopped."""

from __future__ import annotations


class SandboxError(RuntimeError):
    """A sandbox could not be started, used or stopped (not a failed command)."""
