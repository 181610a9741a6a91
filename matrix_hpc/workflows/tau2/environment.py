"""One task's tau2 environment: the agent's tool kit, the user's (telecom), and how calls route.

Everything crosses this boundary as plain data -- a call is (name,
arguments, requestor) and its answer a :class:`ToolOutput` (ok, text) -- so
an environment can live in another process (a sandbox) with the same API.

Two ways to call a tool, as in tau2:

- :meth:`Tau2Environment.call` routes the call and runs it, nothing else
  (tau2's ``make_tool_call``: how its evaluator replays gold actions);
- :meth:`Tau2Environment.step` also synchronises the two sides afterwards
  (tau2's ``get_response``: what a live dialogue does after every call).

Example::

    env = build_environment("retail", task)
    env.call("find_user_id_by_email", {"email": "a@b.c"})   # ToolOutput(ok=False, text='Error: User not found')
    env.db_hash()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from matrix_hpc.workflows.tau2.db import db_hash
from matrix_hpc.workflows.tau2.tools import ToolKit, ToolOutput, caller_text, error_text

REQUESTORS = ("assistant", "user")
# tau2 passes the arguments as keywords next to make_tool_call's own parameters, so an argument
# with one of these names collides with them; Python words the two cases differently.
_CALL_SITE = "tau2.environment.environment.Environment.make_tool_call() got multiple values for keyword argument"
_ROUTING_COLLISIONS = {
    "tool_name": f"{_CALL_SITE} 'tool_name'",
    "requestor": f"{_CALL_SITE} 'requestor'",
    "self": "Environment.make_tool_call() got multiple values for argument 'self'",
}


@dataclass(frozen=True)
class EnvFunctionCall:
    """A call of any tool-kit function, as a task's initialisation actions and assertions name one."""

    env_type: str  # "assistant" or "user": which side's tool kit
    func_name: str
    arguments: dict[str, Any]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnvFunctionCall:
        return cls(env_type=data["env_type"], func_name=data["func_name"], arguments=dict(data.get("arguments") or {}))


class Tau2Environment:
    def __init__(
        self,
        domain: str,
        tools: ToolKit,
        user_tools: ToolKit | None = None,
        sync: Callable[[Tau2Environment], None] | None = None,
        hash_db: Callable[[BaseModel], str] = db_hash,
    ) -> None:
        self.domain = domain
        self.tools = tools
        self.user_tools = user_tools
        self._sync = sync
        self._hash_db = hash_db  # a faster way to the same hash (DBTemplate.hash), where one exists
        self.sync()  # tau2 syncs once when an environment is built

    # --- routing

    def _kit_for(self, requestor: str) -> ToolKit:
        if requestor == "user":
            if self.user_tools is None:
                raise ValueError("User tools not available")
            return self.user_tools
        if requestor == "assistant":
            return self.tools
        raise ValueError(f"Invalid requestor: {requestor}")

    def invoke(self, name: str, arguments: Mapping[str, Any], requestor: str = "assistant") -> Any:
        """Run a tool for ``requestor`` and return its raw result; raises what the tool raises."""
        for key, message in _ROUTING_COLLISIONS.items():
            if key in arguments:
                raise TypeError(message)
        return self._kit_for(requestor).invoke(name, arguments)

    def call(self, name: str, arguments: Mapping[str, Any], requestor: str = "assistant") -> ToolOutput:
        """What the caller sees for one tool call, without synchronising afterwards."""
        try:
            return ToolOutput(ok=True, text=caller_text(self.invoke(name, arguments, requestor)))
        except Exception as exc:  # every failure is shown to the caller, as tau2 does
            return ToolOutput(ok=False, text=error_text(exc))

    def step(self, name: str, arguments: Mapping[str, Any], requestor: str = "assistant") -> ToolOutput:
        """One tool call as a live dialogue makes it: the call, then the sync (a failing sync is an error too)."""
        try:
            result = self.invoke(name, arguments, requestor)
            self.sync()
            return ToolOutput(ok=True, text=caller_text(result))
        except Exception as exc:
            return ToolOutput(ok=False, text=error_text(exc))

    def is_mutating(self, name: str) -> bool:
        """Whether a tool can change state (tau2 re-runs only these when it replays a trajectory)."""
        for kit in (self.tools, self.user_tools):
            if kit is not None and kit.has_tool(name):
                return kit.mutates(name)
        return True

    def has_tool(self, name: str) -> bool:
        return any(kit is not None and kit.has_tool(name) for kit in (self.tools, self.user_tools))

    # --- setup and assertions

    def sync(self) -> None:
        """Bring the user's side in line with the agent's DB (telecom); a no-op elsewhere."""
        if self._sync is not None:
            self._sync(self)

    def run_function(self, call: EnvFunctionCall) -> Any:
        """Run a tool or a setup/assertion function of either side, then sync (tau2's ``run_env_function_call``)."""
        kit = self._kit_for(call.env_type)
        allowed = getattr(kit, "ENV_FUNCTIONS", ())
        if not (kit.has_tool(call.func_name) or call.func_name in allowed):
            raise ValueError(f"Function {call.func_name} not found in {call.env_type} tools")
        result = getattr(kit, call.func_name)(**call.arguments)
        self.sync()
        return result

    def run_assertion(self, call: EnvFunctionCall, assert_value: bool = True) -> bool:
        """Whether an env assertion holds (its function's boolean equals ``assert_value``)."""
        result = self.run_function(call)
        if not isinstance(result, bool):
            raise ValueError(f"Function {call.func_name} returned {type(result)} instead of bool")
        return result == assert_value

    # --- state

    def db_hash(self) -> str:
        """tau2's ``get_db_hash()`` of the agent DB."""
        return self._hash_db(self.tools.db)

    def user_db_hash(self) -> str | None:
        return db_hash(self.user_tools.db) if self.user_tools is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Both DBs as JSON-able data (dates as ISO strings)."""
        state: dict[str, Any] = {"domain": self.domain, "db": self.tools.db.model_dump(mode="json", warnings=False)}
        if self.user_tools is not None:
            state["user_db"] = self.user_tools.db.model_dump(mode="json", warnings=False)
        return state
