"""``workflow=tau2 workflow.domain=retail|airline|telecom``: tau2-bench dialogues, run as tau2 runs them.

Four roles pass each task between them (no orchestrator sees the dialogue):

- ``env``: opens the task's environment (a server in a sandbox leased for
  the task, or in-process), runs the pending tool calls with a sync after
  each, and at the end scores the dialogue with tau2's evaluator and releases
  the environment;
- ``agent``: the agent LLM (tau2's system prompt and the domain's tool schemas)
  sends the user a message or makes a tool call;
- ``user``: the user-simulator LLM plays the task's scenario (calling its own
  phone tools in telecom) and ends with a stop token;
- ``judge``: the NL-assertion judge LLM, asked only when the task's reward
  basis has ``NL_ASSERTION`` and the dialogue ended by a stop.

Rows hold the reward and every component, the trajectory in tau2's message
format (``tau2_messages``, JSON) and matrix_hpc's ``messages``. Example::

    python -m matrix_hpc.workflows.tau2 tasks --domain telecom --out data/tau2_telecom.jsonl
    matrix-hpc run workflow=tau2 workflow.domain=telecom dataset.path=data/tau2_telecom.jsonl \\
        llm=sim sandbox=bwrap output.dir=out/telecom
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from matrix_hpc.runtime.message import TaskState
from matrix_hpc.runtime.workflow import (
    AgentContext,
    AgentFn,
    Filtered,
    NonRetryableError,
    Workflow,
    WorkflowConf,
    register_workflow,
)
from matrix_hpc.workflows.llm_steps import RoleLLMConf, role_client, with_task_seed
from matrix_hpc.workflows.tau2 import evaluator, prompts, rows
from matrix_hpc.workflows.tau2.dialogue import Dialogue, MalformedTurn, agent_view, message_from_llm, tool_result
from matrix_hpc.workflows.tau2.dialogue import user_view as simulator_view
from matrix_hpc.workflows.tau2.judge import fixed_judge, judge_request, parse_verdicts
from matrix_hpc.workflows.tau2.schemas import tool_schemas
from matrix_hpc.workflows.tau2.sessions import ENV_SERVERS, SERVICE_NAME, EnvSessions, transport_failed

log = logging.getLogger(__name__)

DOMAINS = ("retail", "airline", "telecom")


@dataclass
class Tau2Conf(WorkflowConf):
    name: str = "tau2"
    domain: str = "retail"  # retail | airline | telecom
    split: str | None = "base"  # rows of tasks outside this split are filtered; null: every task
    task_ids: list[str] | None = None  # only these task ids (others filtered); null: the whole split
    trials: int = 1  # trials per task; rows with trial >= trials are filtered (make rows with --trials)
    max_steps: int = 200  # tau2's default (its run config)
    max_errors: int = 10  # failed tool calls before too_many_errors (tau2's default)
    max_tool_calls_per_turn: int | None = 1  # calls kept from one message; null: all of them, as tau2 runs
    use_sandbox: bool = True  # each task's environment in a leased sandbox when the run has sandbox=...
    require_sandbox: bool = False  # fail rows instead of running the environment in-process without one
    agent_temperature: float = 0.0  # tau2's default
    user_temperature: float = 0.0  # tau2's default
    judge_temperature: float = 0.0  # tau2's default
    agent_max_tokens: int | None = None  # completion cap of one agent turn; null: the server's
    user_max_tokens: int | None = None  # completion cap of one user turn
    judge_max_tokens: int | None = None  # completion cap of the judge's answer
    llm_timeout_s: float | None = None  # per-attempt LLM timeout; null: llm.client.timeout_s
    agent_llm: RoleLLMConf = field(default_factory=RoleLLMConf)  # the agent's model/endpoint (default: the run's)
    user_llm: RoleLLMConf = field(default_factory=RoleLLMConf)  # the user simulator's
    judge_llm: RoleLLMConf = field(default_factory=RoleLLMConf)  # the NL-assertion judge's
    sandbox_data_dir: str | None = None  # the domain's data as bound inside sandboxes (sandbox.binds); null: copied
    # How a sandboxed environment starts (docs/workflows.md): fork = one warm server per worker process forks
    # a process per task; per_task = a sandbox leased per task; auto = fork unless the pool is deployed/placed
    env_server: str = "auto"
    fork_max_children: int = 4096  # fork: most task processes of one worker at once (added to the sandbox's nproc)
    fork_mem_mb: int = 16384  # fork: memory of all task processes of one worker together (its sandbox's cgroup)
    server_start_timeout_s: float = 60.0  # sandboxed environment: start to ready
    tool_timeout_s: float = 30.0  # sandboxed environment: one request

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"workflow.domain={self.domain!r}; choose one of {list(DOMAINS)}")
        if self.max_steps < 1 or self.max_errors < 1 or self.trials < 1:
            raise ValueError("workflow.max_steps, workflow.max_errors and workflow.trials must be >= 1")
        if self.env_server not in ENV_SERVERS:
            raise ValueError(f"workflow.env_server={self.env_server!r}; choose one of {', '.join(ENV_SERVERS)}")
        if self.fork_max_children < 1 or self.fork_mem_mb < 1:
            raise ValueError("workflow.fork_max_children and workflow.fork_mem_mb must be >= 1")
        if self.max_tool_calls_per_turn is not None and self.max_tool_calls_per_turn < 1:
            raise ValueError("workflow.max_tool_calls_per_turn must be >= 1, or null to run every call as tau2 does")


@register_workflow("tau2", Tau2Conf)
class Tau2Workflow(Workflow):
    roles = ("env", "agent", "user", "judge")
    uses_llm = True
    uses_sandbox = True
    conf: Tau2Conf

    def agent(self, role: str) -> AgentFn:  # the role 'agent' shadows the base's lookup by name
        steps: dict[str, AgentFn] = {"env": self.env, "agent": self.agent_turn, "user": self.user_turn,
                                     "judge": self.judge_turn}
        if role not in steps:
            raise TypeError(f"workflow tau2 has no role {role!r}; roles: {list(steps)}")
        return steps[role]

    # -- env: open, run tool calls, score ------------------------------------
    async def env(self, task: TaskState, ctx: AgentContext) -> None:
        sessions = self.sessions(ctx)
        op = task.data.get("env_op", "open")
        try:
            if op == "open":
                await self._open(task, sessions)
            elif op == "tools":
                await self._run_tools(task, sessions)
            else:
                await self._score(task, ctx, sessions)
        except Exception as e:
            if transport_failed(e):  # the environment is gone; a retry could repeat a write
                raise NonRetryableError(f"tau2 {self.conf.domain} environment failed ({op}): {e}") from e
            raise

    async def _open(self, task: TaskState, sessions: EnvSessions) -> None:
        row = rows.TaskRow.from_row(task.input)
        if (reason := rows.unselected(row, self.conf.split, self.conf.task_ids, self.conf.trials,
                                        self.conf.domain)) is not None:
            raise Filtered(reason)
        if sessions.sandboxes is None and self.conf.use_sandbox and self.conf.require_sandbox:
            raise NonRetryableError("workflow.require_sandbox=true but the run has no sandbox service; "
                                    "add sandbox=bwrap (or apptainer), or set workflow.require_sandbox=false")
        env = await sessions.open(task.id, task.attempt, row.task)
        dialogue = Dialogue.start(self.conf.max_steps, self.conf.max_errors)
        task.add_message("agent", dialogue.trajectory[0]["content"])
        task.data.update(dialogue=dialogue.to_dict(), env_backend=env.backend, env_op="tools",
                         route="user", usage={"agent": [0, 0], "user": [0, 0], "judge": [0, 0]})

    async def _run_tools(self, task: TaskState, sessions: EnvSessions) -> None:
        dialogue = Dialogue.from_dict(task.data["dialogue"])
        calls = dialogue.pending_calls
        outputs = await sessions.get(task.id).step(calls)
        results = [tool_result(c, o.ok, o.text) for c, o in zip(calls, outputs, strict=True)]
        for message in results:
            task.add_message("env", message["content"], role="tool")
        dialogue.add_tool_results(results)
        self._route(task, dialogue)

    async def _score(self, task: TaskState, ctx: AgentContext, sessions: EnvSessions) -> None:
        row = rows.TaskRow.from_row(task.input)
        dialogue = Dialogue.from_dict(task.data["dialogue"])
        verdicts = task.data.get("verdicts")
        judge = fixed_judge([tuple(v) for v in verdicts]) if verdicts is not None else None
        try:
            reward = evaluator.evaluate(self.conf.domain, row.task, dialogue.trajectory,
                                        dialogue.termination or "unexpected_error", judge=judge)
        except Exception as e:  # e.g. strict replay found a different output: tau2 would not score it
            reward = evaluator.RewardResult(reward=0.0, note=f"evaluation failed: {type(e).__name__}: {e}")
        task.result = self._result(task, row, dialogue, reward)
        await sessions.release(task.id)
        self._forget_sticky(task, ctx)
        task.data["route"] = None

    # -- agent and user: one LLM turn each -------------------------------------
    async def agent_turn(self, task: TaskState, ctx: AgentContext) -> None:
        self.sessions(ctx)
        dialogue = Dialogue.from_dict(task.data["dialogue"])
        view = agent_view(prompts.agent_system_prompt(prompts.domain_policy(self.conf.domain)), dialogue.trajectory)
        await self._llm_turn(task, ctx, dialogue, "agent", view, tool_schemas(self.conf.domain, "assistant"),
                             self.conf.agent_temperature, self.conf.agent_max_tokens)

    async def user_turn(self, task: TaskState, ctx: AgentContext) -> None:
        self.sessions(ctx)
        dialogue = Dialogue.from_dict(task.data["dialogue"])
        row = rows.TaskRow.from_row(task.input)
        tools = tool_schemas(self.conf.domain, "user")
        system = prompts.user_system_prompt(row.task["user_scenario"], with_tools=bool(tools))
        await self._llm_turn(task, ctx, dialogue, "user", simulator_view(system, dialogue.trajectory), tools,
                             self.conf.user_temperature, self.conf.user_max_tokens)

    async def _llm_turn(self, task: TaskState, ctx: AgentContext, dialogue: Dialogue, who: str,
                        view: list[dict[str, Any]], tools: list[dict[str, Any]], temperature: float,
                        max_tokens: int | None) -> None:
        params: dict[str, Any] = {"temperature": temperature, "seed": rows.TaskRow.from_row(task.input).seed}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if tools:
            params.update(tools=tools, tool_choice="auto")
        t_start = time.time()
        result = await self._chat(task, ctx, who, view, params)
        if result is None:
            dialogue.end(f"{who}_error")
            return self._route(task, dialogue)
        choice = result.choices[0] if result.choices else None
        content = choice.content if choice else None
        self._count_usage(task, who, result)
        try:
            message, dropped = message_from_llm(who, content, choice.tool_calls if choice else [],
                                                f"call_{task.id}_{dialogue.steps}", self.conf.max_tool_calls_per_turn)
        except MalformedTurn as e:
            task.data["llm_error"] = f"{who}: {e}"
            task.add_message(who, content or "", role="error", t_start=t_start)
            dialogue.end(f"{who}_error")
            return self._route(task, dialogue)
        dialogue.dropped_tool_calls += dropped
        shown = content or json.dumps([{"name": c["name"], "arguments": c["arguments"]}
                                       for c in message["tool_calls"] or []])
        task.add_message(who, shown, role="tool_call" if message["tool_calls"] else "assistant", t_start=t_start,
                         prompt_tokens=result.usage.prompt_tokens, completion_tokens=result.usage.completion_tokens)
        dialogue.add_turn(who, message)
        self._route(task, dialogue)

    async def _chat(self, task: TaskState, ctx: AgentContext, who: str, messages: list[dict[str, Any]],
                    params: dict[str, Any]) -> Any:  # Any: ChatResult; None when the server refused for good
        from matrix_hpc.services.llm.contract import LLMRequestError

        role = self._role_llm(who)
        if role.model and not role.base_url:
            params["model"] = role.model
        try:
            return await role_client(ctx, role).chat(messages, sticky_key=f"{task.id}/{who}",
                                                     timeout_s=self.conf.llm_timeout_s,
                                                     **with_task_seed(task, params))
        except LLMRequestError as e:  # e.g. the dialogue outgrew the context: asking again cannot help
            task.data["llm_error"] = f"{who}: {str(e)[:1000]}"
            return None

    # -- judge -------------------------------------------------------------------
    async def judge_turn(self, task: TaskState, ctx: AgentContext) -> None:
        self.sessions(ctx)
        row = rows.TaskRow.from_row(task.input)
        dialogue = Dialogue.from_dict(task.data["dialogue"])
        assertions = list(row.task["evaluation_criteria"]["nl_assertions"])
        params: dict[str, Any] = {"temperature": self.conf.judge_temperature}
        if self.conf.judge_max_tokens is not None:
            params["max_tokens"] = self.conf.judge_max_tokens
        t_start = time.time()
        result = await self._chat(task, ctx, "judge", judge_request(dialogue.trajectory, assertions), params)
        text = result.content if result is not None else None
        if result is not None:
            self._count_usage(task, "judge", result)
            task.add_message("judge", text or "", t_start=t_start, prompt_tokens=result.usage.prompt_tokens,
                             completion_tokens=result.usage.completion_tokens)
        task.data["verdicts"] = [list(v) for v in parse_verdicts(text, assertions)]
        task.data.update(env_op="score", route="env")

    # -- routing -------------------------------------------------------------------
    def _route(self, task: TaskState, dialogue: Dialogue) -> None:
        task.data["dialogue"] = dialogue.to_dict()
        if not dialogue.done:
            task.data["route"] = dialogue.to_role
            task.data["env_op"] = "tools"
            return
        task.data["env_op"] = "score"
        row = rows.TaskRow.from_row(task.input)
        task.data["route"] = "judge" if self._needs_judge(row.task, dialogue) else "env"

    @staticmethod
    def _needs_judge(task: dict[str, Any], dialogue: Dialogue) -> bool:
        criteria = task.get("evaluation_criteria") or {}
        basis = criteria.get("reward_basis") or evaluator.DEFAULT_REWARD_BASIS
        return ("NL_ASSERTION" in basis and bool(criteria.get("nl_assertions"))
                and dialogue.termination in evaluator.STOP_REASONS)

    def next_role(self, task: TaskState, finished_role: str) -> str | None:
        route: str | None = task.data.get("route")
        return route

    # -- rows -------------------------------------------------------------------
    def _result(self, task: TaskState, row: rows.TaskRow, dialogue: Dialogue,
                reward: evaluator.RewardResult) -> dict[str, Any]:
        traj = dialogue.trajectory
        calls = [c for m in traj if m.get("tool_calls") for c in m["tool_calls"]]
        usage = task.data["usage"]
        return {
            "domain": self.conf.domain, "task_id": row.task_id, "trial": row.trial, "trial_seed": row.seed,
            "reward": reward.reward, "reward_basis": reward.reward_basis,
            "reward_breakdown": json.dumps(reward.reward_breakdown),
            "db_match": reward.db_match, "reward_note": reward.note,
            "env_assertions": json.dumps(reward.env_assertions), "action_checks": json.dumps(reward.action_checks),
            "communicate_checks": json.dumps(reward.communicate_checks),
            "nl_assertions": json.dumps(reward.nl_assertions),
            "termination_reason": dialogue.termination, "stop_token": dialogue.stop_token,
            "num_steps": dialogue.steps, "num_errors": dialogue.errors,
            "num_tool_calls": len(calls), "num_user_tool_calls": sum(c["requestor"] == "user" for c in calls),
            "num_dropped_tool_calls": dialogue.dropped_tool_calls,
            "agent_prompt_tokens": usage["agent"][0], "agent_completion_tokens": usage["agent"][1],
            "user_prompt_tokens": usage["user"][0], "user_completion_tokens": usage["user"][1],
            "env_backend": task.data["env_backend"], "llm_error": task.data.get("llm_error"),
            "tau2_messages": json.dumps(traj),
        }

    def validate_input(self, row: dict[str, Any]) -> None:
        rows.TaskRow.from_row(row)

    def result_columns(self) -> dict[str, Any]:
        return RESULT_COLUMNS

    # -- shared -------------------------------------------------------------------
    def _count_usage(self, task: TaskState, who: str, result: Any) -> None:
        counts = task.data["usage"][who]
        counts[0] += result.usage.prompt_tokens
        counts[1] += result.usage.completion_tokens

    def _role_llm(self, who: str) -> RoleLLMConf:
        return {"agent": self.conf.agent_llm, "user": self.conf.user_llm, "judge": self.conf.judge_llm}[who]

    def _forget_sticky(self, task: TaskState, ctx: AgentContext) -> None:
        for who in ("agent", "user", "judge"):
            try:
                client = role_client(ctx, self._role_llm(who))
            except RuntimeError:  # no llm service (a unit test's fake)
                continue
            forget = getattr(client, "forget_sticky", None)
            if forget is not None:
                forget(f"{task.id}/{who}")

    def sessions(self, ctx: AgentContext) -> EnvSessions:
        """This process's environments, registered so task ends release them (every role calls this first)."""
        sessions: EnvSessions | None = ctx.services.get(SERVICE_NAME)
        if sessions is None:
            pool = ctx.services.get("sandbox") if self.conf.use_sandbox else None
            sessions = EnvSessions(self.conf.domain, pool, self.conf.server_start_timeout_s, self.conf.tool_timeout_s,
                                   self.conf.sandbox_data_dir, self.conf.env_server, self.conf.fork_max_children,
                                   self.conf.fork_mem_mb)
            ctx.services[SERVICE_NAME] = sessions
        return sessions


RESULT_COLUMNS: dict[str, Any] = {  # Any: pyarrow types
    "domain": pa.string(),
    "task_id": pa.string(),
    "trial": pa.int32(),
    "trial_seed": pa.int64(),  # tau2's seed of the trial (the row's own `seed` is the runtime's sample seed)
    "reward": pa.float64(),
    "reward_basis": pa.list_(pa.string()),
    "reward_breakdown": pa.string(),  # JSON {component: 0/1}
    "db_match": pa.bool_(),
    "termination_reason": pa.string(),
    "stop_token": pa.string(),
    "num_steps": pa.int32(),
    "num_errors": pa.int32(),
    "num_tool_calls": pa.int32(),
    "num_user_tool_calls": pa.int32(),
    "num_dropped_tool_calls": pa.int32(),
    "env_backend": pa.string(),
    "tau2_messages": pa.string(),  # JSON: the trajectory in tau2's message format
}
