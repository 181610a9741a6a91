"""The OpenAI tool schemas an LLM sees, built as tau2 builds them: from each tool's signature.

tau2 turns a tool's parameters into a pydantic model named ``parameters`` and
shows its JSON schema; so do we, from the same names, types and defaults.
Descriptions come from our tools' docstrings (the first paragraph; the tool's
name when there is none), not from tau2's -- docs/tau2.md says so.

Example::

    names = [s["function"]["name"] for s in tool_schemas("retail")]
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any

from pydantic import create_model

from matrix_hpc.workflows.tau2.tasks import new_environment
from matrix_hpc.workflows.tau2.tools import ToolKit


def _description(func: Any) -> str:
    doc = inspect.getdoc(func) or ""
    first = doc.split("\n\n")[0].strip()
    return " ".join(first.split()) or func.__name__


def _declared_types() -> dict[str, dict[str, Any]]:
    """tau2's declared parameter types where our tool takes anything on purpose.

    These tools accept what tau2 accepts *at run time* (tau2 does not validate
    arguments), so their signatures are loose; the LLM still sees tau2's types.
    """
    from matrix_hpc.workflows.tau2.domains.airline import models as air
    from matrix_hpc.workflows.tau2.domains.telecom import user_models as phone

    flights, passengers = list[air.FlightInfo | dict], list[air.Passenger | dict]  # type: ignore[type-arg]
    return {
        "book_reservation": {"flight_type": air.FlightType, "cabin": air.CabinClass, "flights": flights,
                             "passengers": passengers, "payment_methods": list[air.Payment | dict],  # type: ignore[type-arg]
                             "insurance": air.Insurance},
        "update_reservation_flights": {"cabin": air.CabinClass, "flights": flights},
        "update_reservation_passengers": {"passengers": passengers},
        "set_network_mode_preference": {"mode": phone.NetworkModePreference | str},
        "set_apn_settings": {"apn_settings": phone.APNSettings | dict},
    }


def tool_schema(kit: type[ToolKit], name: str) -> dict[str, Any]:
    func = getattr(kit, name)
    hints = typing.get_type_hints(func)  # the module's annotations are strings (PEP 563)
    hints.update(_declared_types().get(name, {}))
    fields: dict[str, Any] = {}
    for param in list(inspect.signature(func).parameters.values())[1:]:  # [0] is self
        annotation = hints.get(param.name, Any)
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (annotation, default)
    parameters = create_model("parameters", **fields).model_json_schema()
    return {"type": "function", "function": {"name": name, "description": _description(func),
                                             "parameters": parameters}}


def _kits(domain: str) -> tuple[type[ToolKit], type[ToolKit] | None]:
    env = new_environment(domain)
    return type(env.tools), (type(env.user_tools) if env.user_tools is not None else None)


@functools.cache
def _schemas(domain: str, side: str) -> tuple[dict[str, Any], ...]:
    agent_kit, user_kit = _kits(domain)
    kit = agent_kit if side == "assistant" else user_kit
    if kit is None:
        return ()
    return tuple(tool_schema(kit, name) for name in kit.tool_names())


def tool_schemas(domain: str, side: str = "assistant") -> list[dict[str, Any]]:
    """The tools ``side`` ('assistant' or 'user') may call; [] for a user without tools."""
    return [dict(s) for s in _schemas(domain, side)]
