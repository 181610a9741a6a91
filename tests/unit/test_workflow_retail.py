"""The retail dialogue's logic with scripted LLMs (a fake ``chat`` at the LLM boundary).

The environment is the real one (in-process, on tau2's real data); the
roles are stepped the way the runtime's worker steps them (next_role,
retries not needed here). The real runtime, sandboxes and LLMs are in
tests/integration/test_workflow_retail_*.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from matrix_hpc.runtime.message import FILTERED, OK, TaskState
from matrix_hpc.runtime.workflow import AgentContext, Filtered, build_workflow
from matrix_hpc.services.llm.contract import ChatResult, Choice, LLMRequestError, Usage
from matrix_hpc.workflows.retail import dialogue as dlg
from matrix_hpc.workflows.retail.db import DATA_DIR_ENV, default_data_dir
from matrix_hpc.workflows.retail.sessions import SERVICE_NAME
from matrix_hpc.workflows.retail.tasks import RetailTask, load_tasks, task_to_row
from matrix_hpc.workflows.retail.workflow import RESULT_COLUMNS, RetailToolUseConf
from tests.conftest import require_component

Reply = Callable[[list[dict[str, Any]], dict[str, Any]], ChatResult]


def text(content: str) -> ChatResult:
    return ChatResult([Choice(content)], Usage(100, 10), "fake", 0.0, 1)


def calls(*pairs: tuple[str, Any]) -> ChatResult:
    raw = [{"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a if isinstance(a, str) else json.dumps(a)}}
           for i, (n, a) in enumerate(pairs)]
    return ChatResult([Choice(None, tool_calls=raw)], Usage(100, 20), "fake", 0.0, 1)


class ScriptedLLM:
    """Answers the agent and the user from two scripts (the last answer repeats); records requests."""

    def __init__(self, agent: list[Any], user: list[Any]) -> None:
        self.scripts = {"agent": list(agent), "user": list(user)}
        self.requests: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = []
        self.forgotten: list[str] = []

    async def chat(self, messages: list[dict[str, Any]], *, sticky_key: str, **params: Any) -> ChatResult:
        who = sticky_key.rsplit("/", 1)[1]
        self.requests.append((who, messages, params))
        script = self.scripts[who]
        answer = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(answer, Exception):
            raise answer
        return answer(messages, params) if callable(answer) else answer

    def forget_sticky(self, key: str) -> None:
        self.forgotten.append(key)


@pytest.fixture(scope="module")
def tasks() -> dict[str, RetailTask]:
    require_component((default_data_dir() / "db.json").exists(), "tau2-bench retail data",
                      f"put db.json/tasks.json in ../shared/data/tau2_retail or set ${DATA_DIR_ENV}")
    return {t.id: t for t in load_tasks()}


def writing_task(tasks: dict[str, RetailTask]) -> RetailTask:
    """A task whose gold trajectory writes and has something to communicate, without failing gold calls."""
    from matrix_hpc.workflows.retail.env import is_write_tool

    for t in tasks.values():
        if t.communicate_info and sum(is_write_tool(a.name) for a in t.actions) >= 1 and len(t.actions) <= 6:
            return t
    raise AssertionError("no suitable task")


async def run_dialogue(llm: ScriptedLLM, task: RetailTask, **conf: Any) -> tuple[TaskState, AgentContext]:
    """Step the roles as the worker does: step, next_role, Filtered -> filtered; ends call on_task_end."""
    wf = build_workflow(RetailToolUseConf(**conf))
    ctx = AgentContext(0, {"llm": llm})
    state = TaskState(task.id, task_to_row(task), wf.first_role)
    wf.validate_input(state.input)
    for _ in range(1000):
        try:
            await wf.agent(state.role)(state, ctx)
            nxt = wf.next_role(state, state.role)
        except Filtered as f:
            state.finish(FILTERED, reason=f.reason)
            nxt = None
        if state.status is not None or nxt is None:
            if state.status is None:
                state.finish(OK)
            await ctx.services[SERVICE_NAME].on_task_end(state.id)
            return state, ctx
        state.role = nxt
    raise AssertionError("dialogue did not end")


def gold_agent(task: RetailTask, skip_last_write: bool = False) -> list[Any]:
    from matrix_hpc.workflows.retail.env import is_write_tool

    actions = list(task.actions)
    if skip_last_write:
        last = max(i for i, a in enumerate(actions) if is_write_tool(a.name))
        del actions[last]
    return [calls((a.name, a.arguments)) for a in actions] + [
        text("All done. " + " ".join(f"Note: {info}." for info in task.communicate_info))]


async def test_gold_agent_scores_one_and_every_call_reaches_the_env(tasks: dict[str, RetailTask]) -> None:
    task = writing_task(tasks)
    llm = ScriptedLLM(agent=gold_agent(task), user=[text("Hello, I need help with my order."), text(dlg.STOP)])
    state, ctx = await run_dialogue(llm, task)
    r = state.result
    assert state.status == OK
    assert r["termination_reason"] == "user_stop" and r["user_stop_token"] == dlg.STOP
    assert r["reward"] == 1.0 and r["db_match"] and r["communicate_reward"] == 1.0
    assert r["num_tool_calls"] == len(task.actions)
    assert [c["name"] for c in r["tool_calls"]] == [a.name for a in task.actions]
    # each tool result came back to the agent, answering its call id, before its next turn
    traj = r["trajectory"]
    tool_msgs = [m for m in traj if m["role"] == "tool"]
    assert len(tool_msgs) == len(task.actions)
    assert all(m["tool_call_id"] == "c0" for m in tool_msgs)
    agent_requests = [msgs for who, msgs, _ in llm.requests if who == "agent"]
    assert agent_requests[1][-1]["role"] == "tool"  # the 2nd agent call sees the 1st tool result
    assert agent_requests[0][0]["role"] == "system" and "<policy>" in agent_requests[0][0]["content"]
    # the user never sees tool traffic, and sees the agent as 'user'
    user_requests = [msgs for who, msgs, _ in llm.requests if who == "user"]
    assert all(m["role"] in ("system", "user", "assistant") and "tool_calls" not in m for m in user_requests[-1])
    assert user_requests[0][1] == {"role": "user", "content": dlg.GREETING}
    assert task.instructions.reason_for_call in user_requests[0][0]["content"]
    # tools offered to the agent; the environment was released at the end; pins forgotten
    assert len(llm.requests[1][2]["tools"]) == 16 and llm.requests[1][2]["tool_choice"] == "auto"
    assert ctx.services[SERVICE_NAME].sessions == {}
    assert sorted(llm.forgotten) == [f"{task.id}/agent", f"{task.id}/user"]
    assert set(RESULT_COLUMNS) <= set(r)


async def test_skipping_a_write_scores_zero(tasks: dict[str, RetailTask]) -> None:
    task = writing_task(tasks)
    llm = ScriptedLLM(agent=gold_agent(task, skip_last_write=True), user=[text("Hi."), text(dlg.STOP)])
    state, _ = await run_dialogue(llm, task)
    assert state.status == OK and state.result["termination_reason"] == "user_stop"
    assert state.result["reward"] == 0.0 and not state.result["db_match"]


async def test_unsaid_information_scores_zero(tasks: dict[str, RetailTask]) -> None:
    task = writing_task(tasks)
    agent = gold_agent(task)[:-1] + [text("All done.")]
    state, _ = await run_dialogue(ScriptedLLM(agent=agent, user=[text("Hi."), text(dlg.STOP)]), task)
    assert state.result["db_match"] and state.result["communicate_reward"] == 0.0 and state.result["reward"] == 0.0


@pytest.mark.parametrize("token", [dlg.TRANSFER, dlg.OUT_OF_SCOPE])
async def test_transfer_and_out_of_scope_end_the_dialogue(tasks: dict[str, RetailTask], token: str) -> None:
    task = tasks["0"]
    llm = ScriptedLLM(agent=[text("Let me see.")], user=[text("Hi."), text(f"ok {token}")])
    state, _ = await run_dialogue(llm, task)
    assert state.result["termination_reason"] == "user_stop" and state.result["user_stop_token"] == token
    assert state.result["num_user_turns"] == 2


async def test_max_steps_ends_a_dialogue_that_never_stops(tasks: dict[str, RetailTask]) -> None:
    llm = ScriptedLLM(agent=[text("Could you tell me more?")], user=[text("Sure, more details.")])
    state, _ = await run_dialogue(llm, tasks["0"], max_steps=9)
    r = state.result
    assert state.status == OK and r["termination_reason"] == "max_steps" and r["reward"] == 0.0
    assert r["num_steps"] == 9 and len(r["trajectory"]) == 9
    assert len(llm.requests) == 8  # the greeting is not an LLM call


async def test_malformed_tool_calls_are_errors_back_to_the_agent_until_the_limit(tasks: dict[str, RetailTask]) -> None:
    garbage = calls(("get_user_details", "{not json"))
    llm = ScriptedLLM(agent=[garbage], user=[text("Hi.")])
    state, _ = await run_dialogue(llm, tasks["0"], max_errors=3)
    r = state.result
    assert r["termination_reason"] == "too_many_errors" and r["num_errors"] == 3 and r["reward"] == 0.0
    assert r["num_tool_calls"] == 0  # nothing malformed reached the environment
    errors = [m for m in r["trajectory"] if m["role"] == "tool"]
    assert len(errors) == 3 and errors[0]["content"].startswith("Error: arguments of get_user_details are not valid JSON")


async def test_failed_tool_calls_count_as_errors(tasks: dict[str, RetailTask]) -> None:
    llm = ScriptedLLM(agent=[calls(("get_order_details", {"order_id": "#nope"})), calls(("no_such_tool", {}))],
                      user=[text("Hi.")])
    state, _ = await run_dialogue(llm, tasks["0"], max_errors=2)
    r = state.result
    assert r["termination_reason"] == "too_many_errors" and r["num_tool_errors"] == 2
    assert [c["name"] for c in r["tool_calls"]] == ["get_order_details", "no_such_tool"]
    assert "Order not found" in r["trajectory"][3]["content"]


async def test_only_one_tool_call_per_turn_runs(tasks: dict[str, RetailTask]) -> None:
    two = calls(("find_user_id_by_email", {"email": "noah.brown7922@example.com"}),
                ("list_all_product_types", {}))
    llm = ScriptedLLM(agent=[two, text("Found you.")], user=[text("Hi."), text(dlg.STOP)])
    state, _ = await run_dialogue(llm, tasks["0"])
    r = state.result
    assert r["num_tool_calls"] == 1 and r["num_errors"] == 1
    assistant = [m for m in r["trajectory"] if m.get("tool_calls")]
    assert len(assistant) == 1 and len(assistant[0]["tool_calls"]) == 1
    assert "not run" in [m for m in r["trajectory"] if m["role"] == "tool"][0]["content"]


async def test_tool_calls_left_in_the_text_are_run_or_refused(tasks: dict[str, RetailTask]) -> None:
    written = text('Let me look. <tool_call>{"name": "get_order_details", "arguments": {"order_id": "#W2378156"}}'
                   '</tool_call>')
    cut_off = text('<tool_call>{"name": "exchange_delivered_order_items", "arguments": 63')
    llm = ScriptedLLM(agent=[written, cut_off], user=[text("Hi.")])
    state, _ = await run_dialogue(llm, tasks["0"], max_errors=2)
    r = state.result
    assert [(c["name"], c["error"]) for c in r["tool_calls"]] == [("get_order_details", False)]
    call_msg = r["trajectory"][2]
    assert call_msg["content"] == "Let me look." and call_msg["tool_calls"][0]["function"]["name"] == "get_order_details"
    assert '"order_id": "#W2378156"' in r["trajectory"][3]["content"]  # the environment's answer
    refusals = [m["content"] for m in r["trajectory"][4:] if m["role"] == "tool"]
    assert refusals and refusals[0].startswith("Error: unreadable <tool_call> text")
    assert r["termination_reason"] == "too_many_errors"


async def test_empty_turns_are_counted(tasks: dict[str, RetailTask]) -> None:
    llm = ScriptedLLM(agent=[text("")], user=[text("Hi.")])
    state, _ = await run_dialogue(llm, tasks["0"], max_errors=4)
    assert state.result["termination_reason"] == "too_many_errors" and state.result["num_agent_turns"] == 4


async def test_agent_can_stop_and_a_rejected_request_filters_the_row(tasks: dict[str, RetailTask]) -> None:
    state, _ = await run_dialogue(ScriptedLLM(agent=[text(f"Bye {dlg.STOP}")], user=[text("Hi.")]), tasks["0"])
    assert state.result["termination_reason"] == "agent_stop"
    rejected = LLMRequestError(400, "maximum context length is 2048 tokens", "fake")
    state, ctx = await run_dialogue(ScriptedLLM(agent=[rejected], user=[text("Hi.")]), tasks["0"])
    assert state.status == FILTERED and state.reason.startswith("agent_error:") and "context length" in state.reason
    assert state.result["reward"] == 0.0 and ctx.services[SERVICE_NAME].sessions == {}


async def test_llm_greeting_and_required_tool_choice(tasks: dict[str, RetailTask]) -> None:
    llm = ScriptedLLM(agent=[text("Welcome!"), calls(("list_all_product_types", {})), text("ok")],
                      user=[text(dlg.STOP)])
    state, _ = await run_dialogue(llm, tasks["0"], greeting="", agent_tool_choice="required")
    assert state.result["trajectory"][0] == {"role": "assistant", "content": "Welcome!"}
    assert llm.requests[0][0] == "agent" and llm.requests[0][2]["tool_choice"] == "required"


async def test_environment_released_when_a_step_fails(tasks: dict[str, RetailTask]) -> None:
    wf = build_workflow(RetailToolUseConf())
    ctx = AgentContext(0, {"llm": ScriptedLLM(agent=[RuntimeError("replicas gone")], user=[text("Hi.")])})
    state = TaskState("0", task_to_row(tasks["0"]), "env")
    await wf.agent("env")(state, ctx)
    sessions = ctx.services[SERVICE_NAME]
    assert list(sessions.sessions) == ["0"] and state.data["env_backend"] == "local"
    await wf.agent("user")(state, ctx)
    with pytest.raises(RuntimeError, match="replicas gone"):
        await wf.agent("assistant")(state, ctx)
    await sessions.on_task_end("0")  # what the worker does when the row fails
    assert sessions.sessions == {}


def test_conf_and_input_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="agent_tool_choice"):
        RetailToolUseConf(agent_tool_choice="sometimes")
    with pytest.raises(ValueError, match="max_steps"):
        RetailToolUseConf(max_steps=0)
    wf = build_workflow(RetailToolUseConf())
    with pytest.raises(ValueError, match="python -m matrix_hpc.workflows.retail"):
        wf.validate_input({"id": "x", "text": "hello"})


def test_parse_tool_call_accepts_what_weak_models_send() -> None:
    assert dlg.parse_tool_call({"function": {"name": "calculate", "arguments": {"expression": "1+1"}}}, "f").id == "f"
    assert dlg.parse_tool_call({"name": "calculate", "arguments": ""}, "f").arguments == "{}"
    for bad in ("x", {"function": {"arguments": "{}"}}, {"function": {"name": "a", "arguments": "[1]"}}):
        with pytest.raises(dlg.MalformedToolCall):
            dlg.parse_tool_call(bad, "f")


async def test_task_end_releases_the_lease_once_and_asks_the_pool_only_for_foreign_tasks() -> None:
    from matrix_hpc.workflows.retail.client import LocalToolClient
    from matrix_hpc.workflows.retail.sessions import EnvSession, EnvSessions

    class Pool:
        def __init__(self) -> None:
            self.released: list[str] = []
            self.released_tasks: list[str] = []

        async def release(self, lease: Any) -> None:
            self.released.append(lease.id)

        async def release_task(self, task_id: str) -> int:
            self.released_tasks.append(task_id)
            return 1

    class Lease:
        id = "sb-1"

    pool = Pool()
    sessions = EnvSessions(None, pool, server_timeout_s=1, request_timeout_s=1)
    sessions.sessions["a"] = EnvSession(LocalToolClient(None), Lease(), "sandbox")  # type: ignore[arg-type]
    await sessions.release("a")  # scored: released at once
    await sessions.on_task_end("a")  # the worker's hook afterwards: nothing more to do
    sessions.sessions["b"] = EnvSession(LocalToolClient(None), Lease(), "sandbox")  # type: ignore[arg-type]
    await sessions.on_task_end("b")  # failed mid-dialogue: the hook releases it
    await sessions.on_task_end("c")  # ended in another process: the pool releases by task id
    assert pool.released == ["sb-1", "sb-1"] and pool.released_tasks == ["c"]


def test_trial_rows_keep_the_tau2_task_id(tasks: dict[str, RetailTask], tmp_path: Any) -> None:
    from matrix_hpc.workflows.retail.tasks import write_rows_jsonl

    n = write_rows_jsonl(tmp_path / "rows.jsonl", split="test", trials=3)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert n == len(rows) == 40 * 3
    assert [r["id"] for r in rows[:3]] == [f"{rows[0]['task_id']}/{k}" for k in range(3)]
    assert RetailTask.from_row(rows[1]) == tasks[rows[1]["task_id"]]  # the reward replays the right gold actions
