"""workflow=tau2's dialogue with scripted LLMs (a fake ``chat`` at the LLM-client boundary).

The environments are the real ones (in-process, on tau2's data); roles are
stepped the way the runtime's worker steps them. Real runtime, sandboxes and
LLMs: tests/integration/test_workflow_tau2*.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from matrix_hpc.runtime.message import FILTERED, OK, TaskState
from matrix_hpc.runtime.workflow import AgentContext, Filtered, build_workflow
from matrix_hpc.services.llm.contract import ChatResult, Choice, LLMRequestError, Usage
from matrix_hpc.workflows.tau2 import dialogue as dlg
from matrix_hpc.workflows.tau2 import prompts
from matrix_hpc.workflows.tau2.rows import task_rows, trial_seeds
from matrix_hpc.workflows.tau2.schemas import tool_schemas
from matrix_hpc.workflows.tau2.sessions import SERVICE_NAME
from matrix_hpc.workflows.tau2.tasks import load_tasks
from matrix_hpc.workflows.tau2.workflow import RESULT_COLUMNS, Tau2Conf

Answer = ChatResult | Exception | Callable[[list[dict[str, Any]], dict[str, Any]], ChatResult]


def text(content: str | None) -> ChatResult:
    return ChatResult([Choice(content)], Usage(100, 10), "fake", 0.0, 1)


def calls(*pairs: tuple[str, Any]) -> ChatResult:
    raw = [{"id": f"c{i}", "type": "function",
            "function": {"name": n, "arguments": a if isinstance(a, str) else json.dumps(a)}}
           for i, (n, a) in enumerate(pairs)]
    return ChatResult([Choice(None, tool_calls=raw)], Usage(100, 20), "fake", 0.0, 1)


class ScriptedLLM:
    """Answers each role from its script (the last answer repeats) and records the requests."""

    def __init__(self, **scripts: list[Answer]) -> None:
        self.scripts = {who: list(s) for who, s in scripts.items()}
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

    def of(self, who: str) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
        return [(m, p) for w, m, p in self.requests if w == who]


def row_of(domain: str, task_id: str) -> dict[str, Any]:
    return next(iter(task_rows(domain, None, [task_id])))


async def run_dialogue(llm: ScriptedLLM, row: dict[str, Any], **conf: Any) -> TaskState:
    """Step the roles as the worker does: step, next_role; Filtered -> filtered; the end calls on_task_end."""
    wf = build_workflow(Tau2Conf(**conf))
    ctx = AgentContext(0, {"llm": llm})
    state = TaskState(row["id"], row, wf.first_role)
    wf.validate_input(state.input)
    for _ in range(2000):
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
            assert ctx.services[SERVICE_NAME].held == {}
            return state
        state.role = nxt
    raise AssertionError("dialogue did not end")


def gold_script(task: dict[str, Any], requestor: str) -> list[Answer]:
    actions = [a for a in task["evaluation_criteria"]["actions"] if a.get("requestor", "assistant") == requestor]
    return [calls((a["name"], a["arguments"])) for a in actions]


def judge_all(met: bool) -> Answer:
    def answer(messages: list[dict[str, Any]], params: dict[str, Any]) -> ChatResult:
        n = messages[1]["content"].count("', '") + 1
        return text(json.dumps({"results": [{"expectedOutcome": "x", "reasoning": "r", "metExpectation": met}] * n}))
    return answer


def airline_task_with_writes() -> dict[str, Any]:
    for task in load_tasks("airline"):
        actions = task["evaluation_criteria"].get("actions") or []
        if actions and any(a["name"].startswith(("book", "cancel", "update")) for a in actions) \
                and not task["evaluation_criteria"].get("communicate_info"):
            return task
    raise AssertionError("no airline task with a write")


async def test_gold_agent_scores_one_and_the_row_holds_every_component() -> None:
    task = airline_task_with_writes()
    llm = ScriptedLLM(agent=[*gold_script(task, "assistant"), text("Done. Anything else?")],
                      user=[text("Hi, I need to change a reservation."), text("Thanks! ###STOP###")])
    state = await run_dialogue(llm, row_of("airline", task["id"]), domain="airline")
    r = state.result
    assert state.status == OK, state.error
    assert r["termination_reason"] == "user_stop" and r["stop_token"] == dlg.STOP
    assert r["reward"] == 1.0 and r["db_match"] is True
    assert json.loads(r["reward_breakdown"]) == {"DB": 1.0, "COMMUNICATE": 1.0}
    traj = json.loads(r["tau2_messages"])
    assert traj[0] == {"role": "assistant", "content": dlg.GREETING, "tool_calls": None}
    n_calls = len(task["evaluation_criteria"]["actions"])
    assert r["num_tool_calls"] == n_calls and sum(m["role"] == "tool" for m in traj) == n_calls
    assert set(RESULT_COLUMNS) <= set(r)
    assert sorted(llm.forgotten) == [f"{state.id}/agent", f"{state.id}/judge", f"{state.id}/user"]


async def test_an_agent_that_skips_a_write_scores_zero() -> None:
    task = airline_task_with_writes()
    script = gold_script(task, "assistant")
    writes = [i for i, a in enumerate(task["evaluation_criteria"]["actions"])
              if a["name"].startswith(("book", "cancel", "update"))]
    del script[writes[-1]]
    llm = ScriptedLLM(agent=[*script, text("Done.")], user=[text("Hi."), text("###STOP###")])
    state = await run_dialogue(llm, row_of("airline", task["id"]), domain="airline")
    assert state.result["reward"] == 0.0 and state.result["db_match"] is False


async def test_what_each_llm_sees_is_tau2s_prompt_and_tools() -> None:
    task = airline_task_with_writes()
    llm = ScriptedLLM(agent=[calls(("get_user_details", {"user_id": "nobody"})), text("Sorry.")],
                      user=[text("Hello."), text("###STOP###")])
    await run_dialogue(llm, row_of("airline", task["id"]), domain="airline")
    (agent_first, params), (agent_second, _) = llm.of("agent")
    assert agent_first[0] == {"role": "system",
                              "content": prompts.agent_system_prompt(prompts.domain_policy("airline"))}
    assert agent_first[0]["content"].startswith("<instructions>\nYou are a customer service agent")
    assert [m["role"] for m in agent_first] == ["system", "assistant", "user"]
    assert params["tools"] == tool_schemas("airline") and params["tool_choice"] == "auto"
    assert params["seed"] == trial_seeds(1)[0] and params["temperature"] == 0.0
    assert [m["role"] for m in agent_second] == ["system", "assistant", "user", "assistant", "tool"]
    assert agent_second[-1]["content"] == "Error: User nobody not found"
    user_first, user_params = llm.of("user")[0]
    assert user_first[0]["content"].startswith("# User Simulation Guidelines")
    assert "<scenario>\nInstructions:\n\tDomain: airline" in user_first[0]["content"]
    assert [m["role"] for m in user_first] == ["system", "user"]  # roles flipped: the greeting is 'user'
    assert "tools" not in user_params  # airline's user has no tools
    user_second, _ = llm.of("user")[1]
    assert [m["role"] for m in user_second] == ["system", "user", "assistant", "user"]  # no tool traffic


@pytest.mark.parametrize("token,reason", [("###STOP###", "user_stop"), ("###TRANSFER###", "user_stop"),
                                          ("###OUT-OF-SCOPE###", "user_stop")])
async def test_each_user_stop_token_ends_the_dialogue(token: str, reason: str) -> None:
    task = airline_task_with_writes()
    llm = ScriptedLLM(agent=[text("How can I help?")], user=[text(f"bye {token}")])
    state = await run_dialogue(llm, row_of("airline", task["id"]), domain="airline")
    assert state.result["termination_reason"] == reason and state.result["stop_token"] == token
    assert state.result["num_steps"] == 1


async def test_the_agent_stops_with_stop_and_a_premature_end_scores_zero() -> None:
    task = airline_task_with_writes()
    llm = ScriptedLLM(agent=[text("I am done ###STOP###")], user=[text("Hi.")])
    state = await run_dialogue(llm, row_of("airline", task["id"]), domain="airline")
    assert state.result["termination_reason"] == "agent_stop"
    llm = ScriptedLLM(agent=[text("Go on.")], user=[text("Hi.")])
    state = await run_dialogue(llm, row_of("airline", task["id"]), domain="airline", max_steps=6)
    r = state.result
    assert r["termination_reason"] == "max_steps" and r["num_steps"] == 6 and r["reward"] == 0.0
    assert "prematurely" in r["reward_note"]


async def test_one_tool_call_per_turn_unless_configured_as_tau2() -> None:
    task = airline_task_with_writes()
    two = calls(("get_user_details", {"user_id": "a"}), ("get_user_details", {"user_id": "b"}))
    llm = ScriptedLLM(agent=[two, text("ok")], user=[text("Hi."), text("###STOP###")])
    r = (await run_dialogue(llm, row_of("airline", task["id"]), domain="airline")).result
    assert r["num_tool_calls"] == 1 and r["num_dropped_tool_calls"] == 1
    llm = ScriptedLLM(agent=[two, text("ok")], user=[text("Hi."), text("###STOP###")])
    r = (await run_dialogue(llm, row_of("airline", task["id"]), domain="airline", max_tool_calls_per_turn=None)).result
    traj = json.loads(r["tau2_messages"])
    assert r["num_tool_calls"] == 2 and [m["role"] for m in traj[2:6]] == ["assistant", "tool", "tool", "assistant"]


async def test_max_errors_counts_failed_tool_calls() -> None:
    task = airline_task_with_writes()
    llm = ScriptedLLM(agent=[calls(("no_such_tool", {}))], user=[text("Hi.")])
    r = (await run_dialogue(llm, row_of("airline", task["id"]), domain="airline", max_errors=3)).result
    assert r["termination_reason"] == "too_many_errors" and r["num_errors"] == 3
    traj = json.loads(r["tau2_messages"])
    assert traj[-1]["content"] == "Error: Tool 'no_such_tool' not found." and traj[-1]["error"] is True


async def test_empty_messages_bad_arguments_and_refused_requests_end_as_errors() -> None:
    task = airline_task_with_writes()
    row = row_of("airline", task["id"])
    r = (await run_dialogue(ScriptedLLM(agent=[text("x")], user=[text("  ")]), row, domain="airline")).result
    assert r["termination_reason"] == "user_error" and r["reward"] == 0.0
    bad = calls(("get_user_details", "{not json"))
    r = (await run_dialogue(ScriptedLLM(agent=[bad], user=[text("Hi.")]), row, domain="airline")).result
    assert r["termination_reason"] == "agent_error" and "not JSON" in r["llm_error"]
    refused = LLMRequestError(400, "context too long", "fake")
    r = (await run_dialogue(ScriptedLLM(agent=[refused], user=[text("Hi.")]), row, domain="airline")).result
    assert r["termination_reason"] == "agent_error" and "context too long" in r["llm_error"]


def telecom_task_with_user_actions() -> dict[str, Any]:
    for task in load_tasks("telecom"):
        actions = task["evaluation_criteria"].get("actions") or []
        if any(a.get("requestor") == "user" for a in actions) and any(
                a.get("requestor", "assistant") == "assistant" for a in actions):
            return task
    raise AssertionError("no telecom task where both sides act")


async def test_telecom_user_calls_its_phone_tools_and_the_gold_dialogue_scores_one() -> None:
    task = telecom_task_with_user_actions()
    actions = task["evaluation_criteria"]["actions"]
    agent: list[Answer] = []
    user: list[Answer] = [text("My phone has a problem.")]
    for a in actions:  # each side performs its gold actions in order, handing over with a text message
        if a.get("requestor", "assistant") == "assistant":
            agent += [calls((a["name"], a["arguments"])), text("Please do the next step.")]
        else:
            user += [calls((a["name"], a["arguments"])), text("Done that.")]
    agent.append(text("All fixed."))
    user.append(text("Works now. ###STOP###"))
    llm = ScriptedLLM(agent=agent, user=user)
    state = await run_dialogue(llm, row_of("telecom", task["id"]), domain="telecom")
    r = state.result
    traj = json.loads(r["tau2_messages"])
    assert r["num_user_tool_calls"] == sum(a.get("requestor") == "user" for a in actions) > 0
    for call_message, answer in zip(traj, traj[1:], strict=False):
        if call_message.get("tool_calls"):  # each answer goes back to the side that called
            assert answer["role"] == "tool" and answer["requestor"] == call_message["tool_calls"][0]["requestor"]
            assert call_message["role"] == ("user" if answer["requestor"] == "user" else "assistant")
    user_view_with_tool = llm.of("user")[2][0]  # after its first tool call: the answer is in its view
    assert user_view_with_tool[-1]["role"] == "tool"
    assert llm.of("user")[0][1]["tools"] == tool_schemas("telecom", "user")
    assert llm.of("user")[0][0][0]["content"].startswith("# User Simulation Guidelines\n\nYou are playing the role")
    assert "<main_policy>" in llm.of("agent")[0][0][0]["content"]
    assert "<tech_support_policy>" in llm.of("agent")[0][0][0]["content"]
    assert r["termination_reason"] == "user_stop" and r["reward"] == 1.0, r["reward_breakdown"]


def retail_nl_task() -> dict[str, Any]:
    for task in load_tasks("retail"):
        criteria = task["evaluation_criteria"]
        if criteria.get("nl_assertions") and "NL_ASSERTION" in (criteria.get("reward_basis") or []):
            return task
    raise AssertionError("no retail task with NL assertions")


@pytest.mark.parametrize("met", [True, False])
async def test_nl_assertions_go_to_the_judge_role(met: bool) -> None:
    task = retail_nl_task()
    llm = ScriptedLLM(agent=[*gold_script(task, "assistant"), text("Done.")], user=[text("Hi."), text("###STOP###")],
                      judge=[judge_all(met)])
    r = (await run_dialogue(llm, row_of("retail", task["id"]), domain="retail")).result
    (judge_messages, judge_params), = llm.of("judge")
    assert judge_messages[0]["content"].lstrip().startswith("TASK")
    assert "expectedOutcomes:" in judge_messages[1]["content"] and judge_params["temperature"] == 0.0
    checks = json.loads(r["nl_assertions"])
    assert len(checks) == len(task["evaluation_criteria"]["nl_assertions"]) and all(c["met"] == met for c in checks)
    assert json.loads(r["reward_breakdown"])["NL_ASSERTION"] == (1.0 if met else 0.0)
    assert r["reward"] == (1.0 if met else 0.0)


async def test_an_unreadable_judge_answer_rules_unmet_and_no_judge_after_a_premature_end() -> None:
    task = retail_nl_task()
    llm = ScriptedLLM(agent=[*gold_script(task, "assistant"), text("Done.")], user=[text("Hi."), text("###STOP###")],
                      judge=[text("I think yes")])
    r = (await run_dialogue(llm, row_of("retail", task["id"]), domain="retail")).result
    assert r["reward"] == 0.0 and "not tau2's JSON" in json.loads(r["nl_assertions"])[0]["justification"]
    llm = ScriptedLLM(agent=[text("Hm.")], user=[text("Hi.")], judge=[judge_all(True)])
    r = (await run_dialogue(llm, row_of("retail", task["id"]), domain="retail", max_steps=4)).result
    assert r["termination_reason"] == "max_steps" and llm.of("judge") == []


async def test_selection_by_task_ids_and_trials_filters_rows() -> None:
    task = airline_task_with_writes()
    rows = list(task_rows("airline", None, [task["id"]], trials=3))
    assert [r["trial"] for r in rows] == [0, 1, 2] and len({r["seed"] for r in rows}) == 3
    llm = ScriptedLLM(agent=[text("x")], user=[text("###STOP###")])
    state = await run_dialogue(llm, rows[2], domain="airline", trials=2)
    assert state.status == FILTERED and "workflow.trials=2" in str(state.reason)
    state = await run_dialogue(llm, rows[0], domain="airline", task_ids=["nope"])
    assert state.status == FILTERED and "workflow.task_ids" in str(state.reason)


def test_bad_rows_and_settings_are_named() -> None:
    wf = build_workflow(Tau2Conf(domain="retail"))
    with pytest.raises(ValueError, match="lacks .*python -m matrix_hpc.workflows.tau2 tasks"):
        wf.validate_input({"id": "x", "text": "hello"})
    with pytest.raises(ValueError, match="workflow.domain='bank'"):
        Tau2Conf(domain="bank")
    with pytest.raises(ValueError, match="max_tool_calls_per_turn"):
        Tau2Conf(max_tool_calls_per_turn=0)
