"""``workflow=retail_tool_use``: tau2-bench retail customer-service dialogues with tool use.

Three roles pass each task between them:

- ``env`` opens the task's environment (a tool server in a sandbox leased
  for the task, or in-process), runs the agent's tool calls, and at the end
  scores the dialogue (final DB hash vs the gold replay, times the
  communicate-info check) and releases the environment;
- ``assistant``: the agent LLM (system prompt = the retail policy, tools = the
  environment's 16 tool schemas) either answers the user or makes one tool call;
- ``user``: the user-simulator LLM plays the task's scenario and ends with
  ``###STOP###`` (or ``###TRANSFER###`` / ``###OUT-OF-SCOPE###``).

``env`` is always routed to the same worker for a task, so the environment
stays where it was opened. Example::

    python -m matrix_hpc.workflows.retail --split test --out data/tau2_retail_test.jsonl
    matrix-hpc run workflow=retail_tool_use dataset=tau2_retail llm=sim sandbox=bwrap output.dir=out/retail
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from matrix_hpc.runtime.message import TaskState
from matrix_hpc.runtime.workflow import (
    AgentContext,
    Filtered,
    NonRetryableError,
    Workflow,
    WorkflowConf,
    register_workflow,
)
from matrix_hpc.workflows.llm_steps import RoleLLMConf, role_client, with_task_seed
from matrix_hpc.workflows.retail import dialogue as dlg
from matrix_hpc.workflows.retail.reward import compute_reward
from matrix_hpc.workflows.retail.sessions import SERVICE_NAME, EnvSessions, tool_error_is_fatal
from matrix_hpc.workflows.retail.tasks import RetailTask
from matrix_hpc.workflows.tau2 import workflow as _tau2_workflow  # noqa: F401  registers workflow=tau2 (runtime's built-in list names retail only)

log = logging.getLogger(__name__)

TOOL_CHOICES = ("auto", "required", "none")
#: Ends whose rows are ``filtered`` (the dialogue could not go on); every other end is ``ok`` with its reward.
FILTERED_TERMINATIONS = ("agent_error", "user_error")


@dataclass
class RetailToolUseConf(WorkflowConf):
    name: str = "retail_tool_use"
    # tau2 retail folder (db.json, policy.md); null: $MATRIX_HPC_TAU2_RETAIL_DIR,
    # ../shared/data/tau2_retail, else the packaged copy
    data_dir: str | None = None
    use_sandbox: bool = True  # run each task's environment in a leased sandbox when the run has sandbox=...
    require_sandbox: bool = False  # fail rows instead of falling back to an in-process environment without one
    max_steps: int = 100  # messages (agent, tool, user) before the dialogue ends as max_steps (tau2: 100)
    max_errors: int = 10  # failed or malformed tool calls and empty turns before it ends as too_many_errors
    greeting: str = dlg.GREETING  # the agent's fixed first message; '' lets the agent LLM greet
    agent_temperature: float = 0.0  # sampling temperature of the agent
    user_temperature: float = 0.0  # sampling temperature of the user simulator
    agent_max_tokens: int = 1024  # completion cap of one agent turn
    user_max_tokens: int = 512  # completion cap of one user turn
    agent_tool_choice: str = "auto"  # auto | required | none (required: every agent turn is a tool call)
    llm_timeout_s: float | None = None  # per-attempt LLM timeout; null: llm.client.timeout_s
    agent_llm: RoleLLMConf = field(default_factory=RoleLLMConf)  # the agent's model/endpoint (default: the run's llm)
    user_llm: RoleLLMConf = field(default_factory=RoleLLMConf)  # the user simulator's model/endpoint
    server_start_timeout_s: float = 60.0  # sandboxed tool server: start to first answer
    tool_timeout_s: float = 30.0  # sandboxed tool server: one request

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.max_errors < 1:
            raise ValueError("workflow.max_steps and workflow.max_errors must be >= 1")
        if self.agent_tool_choice not in TOOL_CHOICES:
            raise ValueError(
                f"workflow.agent_tool_choice={self.agent_tool_choice!r}; choose one of {list(TOOL_CHOICES)}")


@register_workflow("retail_tool_use", RetailToolUseConf)
class RetailToolUse(Workflow):
    roles = ("env", "assistant", "user")
    uses_llm = True
    uses_sandbox = True
    conf: RetailToolUseConf

    # -- env: open, run one tool call, or score and close ------------------
    async def env(self, task: TaskState, ctx: AgentContext) -> None:
        sessions = self.sessions(ctx)
        op = task.data.get("env_op", "open")
        if op == "open":
            await self._open(task, sessions)
        elif op == "call":
            await self._run_tool_call(task, sessions)
        else:
            await self._finish(task, ctx, sessions)

    async def _open(self, task: TaskState, sessions: EnvSessions) -> None:
        if sessions.sandboxes is None and self.conf.use_sandbox and self.conf.require_sandbox:
            raise NonRetryableError("workflow.require_sandbox=true but the run has no sandbox service; "
                                    "add sandbox=bwrap (or apptainer), or set workflow.require_sandbox=false")
        session = await sessions.open(task.id, task.attempt)
        messages: list[dict[str, Any]] = []
        route = "assistant"
        if self.conf.greeting:
            messages.append({"role": "assistant", "content": self.conf.greeting})
            task.add_message("assistant", self.conf.greeting)
            route = "user"
        task.data.update(messages=messages, steps=len(messages), errors=0, tool_calls=[], env_backend=session.backend,
                         env_op="call", route=route)

    async def _run_tool_call(self, task: TaskState, sessions: EnvSessions) -> None:
        call = dlg.ToolCall(**task.data["pending_call"])
        try:
            outcome = await sessions.get(task.id).client.call_detailed(call.name, call.arguments)
        except Exception as e:
            if tool_error_is_fatal(e):  # the environment is gone; a retry might repeat a write
                raise NonRetryableError(f"retail environment failed on {call.name}: {e}") from e
            raise
        content = outcome.content + task.data.pop("dropped_note", "")
        del task.data["pending_call"]
        task.data["messages"].append(dlg.tool_message(call.id, content))
        task.data["tool_calls"].append({"name": call.name, "arguments": call.arguments, "error": outcome.error})
        task.data["steps"] += 1
        task.add_message("env", content, role="tool")
        if outcome.error:
            task.data["errors"] += 1
        task.data["route"] = self._limit_route(task) or "assistant"

    async def _finish(self, task: TaskState, ctx: AgentContext, sessions: EnvSessions) -> None:
        rtask = RetailTask.from_row(task.input)
        session = sessions.get(task.id)
        try:
            final_hash = await session.client.db_hash()
            gold = await sessions.gold_state(rtask, session)
        except Exception as e:
            if tool_error_is_fatal(e):
                raise NonRetryableError(f"retail environment failed while scoring: {e}") from e
            raise
        termination = task.data["termination"]
        info = compute_reward(rtask, final_hash, dlg.agent_texts(task.data["messages"]), gold, termination)
        task.result = self._result(task, info.to_dict())
        await sessions.release(task.id)
        self._forget_sticky(task, ctx)
        task.data["route"] = None
        if termination in FILTERED_TERMINATIONS:
            raise Filtered(f"{termination}: {task.data.get('llm_error', '')}"[:2000])

    def _result(self, task: TaskState, info: dict[str, Any]) -> dict[str, Any]:
        d = task.data
        return {
            "reward": info["reward"], "db_match": info["db_match"], "db_reward": info["db_reward"],
            "communicate_reward": info["communicate_reward"], "communicate_checks": info["communicate_checks"],
            "final_db_hash": info["final_db_hash"], "gold_db_hash": info["gold_db_hash"],
            "gold_replay_errors": info["gold_replay_errors"], "reward_notes": info["notes"],
            "termination_reason": d["termination"], "user_stop_token": d.get("user_stop_token"),
            "num_steps": d["steps"], "num_errors": d["errors"], "num_tool_calls": len(d["tool_calls"]),
            "num_tool_errors": sum(1 for c in d["tool_calls"] if c["error"]),
            "num_agent_turns": d.get("agent_turns", 0), "num_user_turns": d.get("user_turns", 0),
            "tool_calls": d["tool_calls"], "env_backend": d["env_backend"],
            "trajectory": d["messages"],
        }

    # -- agent: one message or one tool call --------------------------------
    async def assistant(self, task: TaskState, ctx: AgentContext) -> None:
        sessions = self.sessions(ctx)
        d = task.data
        params: dict[str, Any] = {"temperature": self.conf.agent_temperature, "max_tokens": self.conf.agent_max_tokens}
        if self.conf.agent_tool_choice != "none":
            params.update(tools=sessions.tools, tool_choice=self.conf.agent_tool_choice)
        result = await self._chat(task, ctx, dlg.agent_view(dlg.agent_system_prompt(sessions.policy), d["messages"]),
                                  "agent", params)
        if result is None:
            return
        choice = result.choices[0] if result.choices else None
        text = (choice.content or "").strip() if choice else ""
        raw_calls = choice.tool_calls if choice else []
        usage = {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens}
        d["agent_turns"] = d.get("agent_turns", 0) + 1
        if not raw_calls and (in_text := dlg.text_tool_call(text)) is not None:
            before, raw = in_text  # a call the server left in the text is still a call (or a malformed one)
            if raw is None:  # keep the model's text: it is what was malformed
                raw = "unreadable <tool_call> text (not JSON, or cut off)"
            else:
                text = before
            raw_calls = [raw]
        if raw_calls:
            self._agent_tool_call(task, text, raw_calls, usage)
        elif text:
            d["messages"].append({"role": "assistant", "content": text})
            d["steps"] += 1
            task.add_message("assistant", text, **usage)
            d["route"] = "user"
            if dlg.STOP in text:  # tau2: the agent may end the dialogue too
                self._end(task, "agent_stop")
        else:  # nothing usable: counted, and the agent gets another turn
            d["errors"] += 1
            d["steps"] += 1
            task.add_message("assistant", "", role="error", **usage)
            d["route"] = "assistant"
        d["route"] = self._limit_route(task) or d["route"]

    def _agent_tool_call(self, task: TaskState, text: str, raw_calls: list[Any], usage: dict[str, int]) -> None:
        d = task.data
        fallback_id = f"call_{task.id}_{d['steps']}"
        extra = len(raw_calls) - 1  # one tool call per turn: the rest are refused, and counted
        try:
            call = dlg.parse_tool_call(raw_calls[0], fallback_id)
        except dlg.MalformedToolCall as e:
            call = dlg.ToolCall(fallback_id, "invalid_tool_call", "{}")
            d["messages"].append(dlg.assistant_tool_message(text, call))
            d["messages"].append(dlg.tool_message(call.id, f"Error: {e}"))
            d["errors"] += 1 + extra
            d["steps"] += 2
            task.add_message("assistant", f"malformed tool call: {e}", role="tool_call", **usage)
            d["route"] = "assistant"
            return
        d["messages"].append(dlg.assistant_tool_message(text, call))
        d["pending_call"] = {"id": call.id, "name": call.name, "arguments": call.arguments}
        if extra:
            d["errors"] += extra
            d["dropped_note"] = (f"\n(Note: {extra} further tool call(s) in the same turn were not run; "
                                 "make one tool call per turn.)")
        d["steps"] += 1
        task.add_message("assistant", f"{call.name}({call.arguments})", role="tool_call", **usage)
        d["env_op"] = "call"
        d["route"] = "env"

    # -- user: the simulator ------------------------------------------------
    async def user(self, task: TaskState, ctx: AgentContext) -> None:
        self.sessions(ctx)  # registered before any task can end in this process (see sessions())
        d = task.data
        params = {"temperature": self.conf.user_temperature, "max_tokens": self.conf.user_max_tokens}
        view = dlg.user_view(d["messages"], task.input["user_scenario"])
        result = await self._chat(task, ctx, view, "user", params)
        if result is None:
            return
        text = (result.content or "").strip()
        usage = {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens}
        d["user_turns"] = d.get("user_turns", 0) + 1
        d["steps"] += 1
        if not text:
            d["errors"] += 1
            task.add_message("user", "", role="error", **usage)
            d["route"] = self._limit_route(task) or "user"
            return
        d["messages"].append({"role": "user", "content": text})
        task.add_message("user", text, role="user", **usage)
        token = dlg.user_stop_token(text)
        if token is not None:
            d["user_stop_token"] = token
            self._end(task, "user_stop")
            return
        d["route"] = self._limit_route(task) or "assistant"

    # -- shared ---------------------------------------------------------------
    async def _chat(self, task: TaskState, ctx: AgentContext, messages: list[dict[str, Any]], who: str,
                    params: dict[str, Any]) -> Any:  # Any: ChatResult, None when the dialogue ended
        if (route := self._limit_route(task)) is not None:
            task.data["route"] = route
            return None
        from matrix_hpc.services.llm.contract import LLMRequestError

        role = self._role_llm(who)
        if role.model and not role.base_url:
            params["model"] = role.model  # another model on the run's service
        try:
            return await role_client(ctx, role).chat(messages, sticky_key=f"{task.id}/{who}",
                                                     timeout_s=self.conf.llm_timeout_s,
                                                     **with_task_seed(task, params))
        except LLMRequestError as e:  # e.g. the dialogue outgrew the context: asking again cannot help
            task.data["llm_error"] = str(e)[:1000]
            self._end(task, f"{who}_error")
            return None

    def _limit_route(self, task: TaskState) -> str | None:
        """End the dialogue when a limit is reached; returns the role to go to then."""
        d = task.data
        if d.get("termination"):
            return "env"
        if d["errors"] >= self.conf.max_errors:
            self._end(task, "too_many_errors")
        elif d["steps"] >= self.conf.max_steps:
            self._end(task, "max_steps")
        else:
            return None
        return "env"

    def _end(self, task: TaskState, termination: str) -> None:
        task.data.update(termination=termination, env_op="finish", route="env")

    def _role_llm(self, who: str) -> RoleLLMConf:
        return self.conf.agent_llm if who == "agent" else self.conf.user_llm

    def _forget_sticky(self, task: TaskState, ctx: AgentContext) -> None:
        """Drop the dialogue's replica pins (its prefix is of no more use)."""
        for who in ("agent", "user"):
            try:
                client = role_client(ctx, self._role_llm(who))
            except RuntimeError:  # no llm service (e.g. a unit test's fake)
                continue
            forget = getattr(client, "forget_sticky", None)
            if forget is not None:
                forget(f"{task.id}/{who}")

    def sessions(self, ctx: AgentContext) -> EnvSessions:
        """This process's environments; registered as a service so task ends release them.

        Every role calls this first, so the entry exists before any task can end
        in the process (the worker iterates ``ctx.services`` at each task end).
        """
        sessions: EnvSessions | None = ctx.services.get(SERVICE_NAME)
        if sessions is None:
            pool = ctx.services.get("sandbox") if self.conf.use_sandbox else None
            sessions = EnvSessions(self.conf.data_dir, pool, self.conf.server_start_timeout_s, self.conf.tool_timeout_s)
            ctx.services[SERVICE_NAME] = sessions
        return sessions

    # -- the runtime's contract ---------------------------------------------
    def next_role(self, task: TaskState, finished_role: str) -> str | None:
        route: str | None = task.data.get("route")
        return route

    def validate_input(self, row: dict[str, Any]) -> None:
        missing = [k for k in ("user_scenario", "instructions", "gold_actions") if k not in row]
        if missing:
            raise ValueError(f"retail task row lacks {missing}; write rows with "
                             "`python -m matrix_hpc.workflows.retail --split test --out rows.jsonl`")
        try:
            RetailTask.from_row(row)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"retail task row {row.get('id')!r} is malformed: {type(e).__name__}: {e}") from None

    def result_columns(self) -> dict[str, Any]:
        return RESULT_COLUMNS


RESULT_COLUMNS: dict[str, Any] = {  # Any: pyarrow types
    "reward": pa.float64(),
    "db_match": pa.bool_(),
    "db_reward": pa.float64(),
    "communicate_reward": pa.float64(),
    "termination_reason": pa.string(),
    "num_steps": pa.int32(),
    "num_errors": pa.int32(),
    "num_tool_calls": pa.int32(),
    "num_tool_errors": pa.int32(),
    "num_agent_turns": pa.int32(),
    "num_user_turns": pa.int32(),
    "user_stop_token": pa.string(),
    "env_backend": pa.string(),
    "communicate_checks": pa.list_(pa.struct([("info", pa.string()), ("met", pa.bool_())])),
    "tool_calls": pa.list_(pa.struct([("name", pa.string()), ("arguments", pa.string()), ("error", pa.bool_())])),
}
