"""Tool kits: which methods are tools, how a call is dispatched, what the caller sees.

A tool kit is a class whose tool methods carry the :func:`tool` marker; the
method name is the tool name and its parameters are the tool's parameters, as
in tau2-bench. A call never raises: it answers a :class:`ToolOutput` whose
``text`` is what tau2 shows the caller -- the result rendered by
:func:`caller_text`, or ``"Error: " + str(exception)`` when the tool raised.

Example::

    kit = RetailTools(db)
    kit.call("get_order_details", {"order_id": "#W0000000"})
    # ToolOutput(ok=False, text='Error: Order not found')
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, TypeVar

from pydantic import BaseModel

_MARK = "__tau2_tool__"
F = TypeVar("F", bound=Callable[..., Any])


def tool(*, mutates: bool) -> Callable[[F], F]:
    """Mark a tool-kit method as a tool; ``mutates`` says whether it can change the DB.

    tau2's evaluator re-runs only state-changing tools when it replays a
    trajectory (WRITE tools), so the flag is part of the contract.
    """

    def mark(func: F) -> F:
        setattr(func, _MARK, mutates)
        return func

    return mark


@dataclass(frozen=True)
class ToolOutput:
    ok: bool  # False when the tool raised (tau2's ToolMessage.error)
    text: str  # exactly what the caller sees


def _plain(value: Any) -> Any:
    """tau2's rendering of a tool result before JSON encoding.

    Models become their python-mode dump (dates inside stay objects and are
    later written with ``str``); numbers and booleans at any level outside a
    model become strings; dates outside a model become ISO strings.
    """
    if isinstance(value, BaseModel):
        return value.model_dump(warnings=False)
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise ValueError(f"Unsupported type: {type(value)}")


def caller_text(value: Any) -> str:
    """The text a caller sees for a tool's return value (strings pass unchanged)."""
    if isinstance(value, str):
        return value
    return json.dumps(_plain(value), default=str)


class ToolKit:
    """Base of every tool kit: finds the marked methods and dispatches calls to them."""

    def __init__(self, db: BaseModel) -> None:
        self.db = db

    @classmethod
    def tool_names(cls) -> list[str]:
        """Every tool of the kit, in definition order."""
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            for name, member in vars(klass).items():
                if hasattr(member, _MARK) and name not in names:
                    names.append(name)
        return names

    def has_tool(self, name: str) -> bool:
        return callable(getattr(type(self), name, None)) and hasattr(getattr(type(self), name), _MARK)

    def mutates(self, name: str) -> bool:
        """Whether the tool can change state (unknown names count as mutating, as in tau2)."""
        member = getattr(type(self), name, None)
        return bool(getattr(member, _MARK, True))

    def invoke(self, name: str, arguments: Mapping[str, Any]) -> Any:
        """Run a tool and return its raw result; raises what the tool raises."""
        if not self.has_tool(name):
            raise ValueError(f"Tool '{name}' not found.")
        return getattr(self, name)(**arguments)

    def call(self, name: str, arguments: Mapping[str, Any]) -> ToolOutput:
        """Run a tool and answer what the caller sees; never raises."""
        try:
            return ToolOutput(ok=True, text=caller_text(self.invoke(name, arguments)))
        except Exception as exc:  # every tool failure is shown to the caller, as tau2 does
            return ToolOutput(ok=False, text=error_text(exc))


def error_text(exc: BaseException) -> str:
    """tau2's convention for a failed call: ``"Error: "`` followed by the message."""
    return f"Error: {exc}"
