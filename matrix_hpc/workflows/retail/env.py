"""RetailEnv: one task's retail environment (its own DB state plus the 16 tools)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from matrix_hpc.workflows.retail.db import RetailDB, RetailSnapshot
from matrix_hpc.workflows.retail.tools import TOOL_SPECS, TOOLS_BY_NAME, RetailTools, ToolError

ERROR_PREFIX = "Error: "  # tau2 shows a failed tool call to the agent as "Error: <message>"


@dataclass(frozen=True)
class ToolOutcome:
    content: str  # what the caller (agent) sees: the result, or "Error: ..."
    error: bool  # True when the call failed and changed nothing


def tool_schemas() -> list[dict[str, Any]]:
    """The 16 tools in OpenAI ``tools`` format (the same for every environment)."""
    return [spec.schema() for spec in TOOL_SPECS]


def is_write_tool(name: str) -> bool:
    spec = TOOLS_BY_NAME.get(name)
    return spec is not None and spec.writes


def _parse_arguments(arguments: Mapping[str, Any] | str | None) -> Mapping[str, Any]:
    """OpenAI tool calls carry arguments as a JSON string; accept that or a dict."""
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolError(f"Tool arguments are not valid JSON ({e.msg} at position {e.pos})") from None
        if not isinstance(parsed, dict):
            raise ToolError("Tool arguments must be a JSON object")
        return parsed
    return arguments


class RetailEnv:
    """A retail environment with a private copy of the DB.

    ``db`` may be a plain dict (deep-copied here) or a shared
    :class:`RetailSnapshot` (records are then copied on first write, so
    thousands of environments can share one 15 MB snapshot).

    Example::

        env = RetailEnv.from_file("db.json")
        env.call("find_user_id_by_name_zip", {"first_name": "Yusuf", "last_name": "Rossi", "zip": "19122"})
        # -> 'yusuf_rossi_9620'
        env.db_hash()
    """

    def __init__(self, db: Mapping[str, Any] | RetailSnapshot) -> None:
        snapshot = db if isinstance(db, RetailSnapshot) else RetailSnapshot(db)
        self.db = RetailDB(snapshot)
        self._tools = RetailTools(self.db)
        self.calls = 0  # tool calls made
        self.errors = 0  # tool calls that failed

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> RetailEnv:
        return cls(RetailSnapshot.from_file(path))

    def call_detailed(self, tool_name: str, arguments: Mapping[str, Any] | str | None) -> ToolOutcome:
        """Run a tool; never raises for a bad call, returns the error text instead."""
        self.calls += 1
        try:
            result = self._tools.invoke(tool_name, _parse_arguments(arguments))
        except ToolError as e:
            self.errors += 1
            return ToolOutcome(ERROR_PREFIX + str(e), True)
        except Exception as e:  # a bug in a tool must not kill a long-lived server
            self.errors += 1
            return ToolOutcome(f"{ERROR_PREFIX}internal error in {tool_name}: {type(e).__name__}: {e}", True)
        content = result if isinstance(result, str) else json.dumps(result)
        return ToolOutcome(content, False)

    def call(self, tool_name: str, arguments: Mapping[str, Any] | str | None) -> str:
        """Run a tool and return what the agent sees (JSON / text result, or ``Error: ...``)."""
        return self.call_detailed(tool_name, arguments).content

    def replay(self, actions: Iterable[tuple[str, Mapping[str, Any]]]) -> list[tuple[int, str, str]]:
        """Run ``(tool, arguments)`` pairs in order; returns ``(index, tool, error)`` for each failure."""
        failures = []
        for i, (name, arguments) in enumerate(actions):
            outcome = self.call_detailed(name, arguments)
            if outcome.error:
                failures.append((i, name, outcome.content))
        return failures

    def tool_schemas(self) -> list[dict[str, Any]]:
        return tool_schemas()

    def db_hash(self) -> str:
        """Hash of the normalised DB, as tau2 compares final and gold databases."""
        return self.db.hash()

    def dump_db(self) -> dict[str, Any]:
        """A deep copy of the current DB."""
        return self.db.to_dict()

    def fresh(self) -> RetailEnv:
        """A new environment on the same initial snapshot (for a gold replay)."""
        return RetailEnv(self.db.snapshot)
