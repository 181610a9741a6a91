"""Regenerate tests/data/tau2_golden/ from real tau2-bench (the reference).

This script runs OUTSIDE matrix_hpc's venv, in a venv where tau2-bench at
commit a2c02472 is installed (``pip install -e <checkout>``; its data folder
must hold the domain files from ../shared/data). It replays action lists
through tau2's own environments exactly as tau2's evaluator replays gold
actions -- a fresh environment per task, ``set_state`` with the task's
initialisation data and actions, then ``Environment.make_tool_call`` per action
with no sync in between -- and writes, per task, what the caller sees
(``to_json_str`` of the result, or ``"Error: " + message``), the ok flag and
both DB hashes. Input and output lines have the interface of
``python -m matrix_hpc.workflows.tau2 replay``.

Example (regenerates everything the tests compare)::

    /work/tau2venv/bin/python scripts/tau2_golden.py --tau2-root /work/tau2ref --all

One domain, gold actions of one split, or a custom action list::

    python scripts/tau2_golden.py --tau2-root /work/tau2ref --domain telecom --split base --output t.jsonl
    python scripts/tau2_golden.py --tau2-root /work/tau2ref --domain retail --input probes.jsonl --output p.jsonl
    python scripts/tau2_golden.py --tau2-root /work/tau2ref --domain airline --rewards --output r.jsonl.gz

With ``--rewards`` it runs tau2's evaluator instead, on scripted trajectories
(the gold actions as a dialogue, with and without the last successful write),
and records every reward component.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO_ROOT / "tests" / "data" / "tau2_golden"
DOMAINS = ("retail", "airline", "telecom")

# What --all writes: (domain, split, input file or None for gold actions, output file).
ALL_JOBS: tuple[tuple[str, str, str | None, str], ...] = (
    ("retail", "base", None, "retail.jsonl.gz"),
    ("airline", "base", None, "airline.jsonl.gz"),
    ("telecom", "base", None, "telecom.jsonl.gz"),
    ("telecom", "full", None, "telecom_full.jsonl.gz"),
    ("retail", "base", "retail_probes_input.jsonl", "retail_probes.jsonl"),
    ("airline", "base", "airline_probes_input.jsonl", "airline_probes.jsonl"),
    ("telecom", "full", "telecom_probes_input.jsonl", "telecom_probes.jsonl"),
)
# What --all also writes with --live semantics (sync after every call, as in a dialogue).
ALL_LIVE_JOBS: tuple[tuple[str, str, str | None, str], ...] = (
    ("telecom", "base", None, "telecom_live.jsonl.gz"),
    ("telecom", "full", "telecom_probes_input.jsonl", "telecom_probes_live.jsonl"),
)
# What --all also writes: tau2's evaluator on scripted trajectories (REWARDS marks the job).
REWARDS = "rewards"
ALL_REWARD_JOBS: tuple[tuple[str, str, str], ...] = (
    ("retail", "base", "retail_rewards.jsonl.gz"),
    ("airline", "base", "airline_rewards.jsonl.gz"),
    ("telecom", "base", "telecom_rewards.jsonl.gz"),
)


def _tau2_modules(domain: str) -> tuple[Any, Any]:
    """tau2's environment module for ``domain`` and its Environment class."""
    env_module = importlib.import_module(f"tau2.domains.{domain}.environment")
    from tau2.environment.environment import Environment

    return env_module, Environment


def _fresh_environment(domain: str, task: Any) -> Any:
    """A tau2 environment set up for ``task`` as tau2's evaluator sets up its gold env."""
    env_module, _ = _tau2_modules(domain)
    if domain == "telecom":
        # tau2 keeps the phone's default VPN details in one class attribute that
        # break_vpn mutates in place; a fresh object per task gives every task the
        # state a fresh process would have (each of our tasks runs in its own sandbox).
        from tau2.domains.telecom.user_data_model import PerformanceLevel, VpnDetails
        from tau2.domains.telecom.user_tools import TelecomUserTools

        TelecomUserTools.default_vpn_details = VpnDetails(
            server_address="192.168.1.1", protocol="OpenVPN", server_performance=PerformanceLevel.EXCELLENT
        )
    env = env_module.get_environment()
    state = task.initial_state
    env.set_state(
        initialization_data=state.initialization_data if state else None,
        initialization_actions=state.initialization_actions if state else None,
        message_history=(state.message_history or []) if state else [],
    )
    return env


def replay_task(domain: str, task: Any, actions: list[dict[str, Any]], live: bool = False) -> dict[str, Any]:
    """One output line: every action through a fresh tau2 environment for ``task``.

    ``live``: as a dialogue makes each call (``get_response``: sync after every call).
    """
    _, environment_cls = _tau2_modules(domain)
    env = _fresh_environment(domain, task)
    outputs = []
    for action in actions:
        if live:
            from tau2.data_model.message import ToolCall

            call = ToolCall(
                name=action["name"], arguments=action["arguments"], requestor=action.get("requestor", "assistant")
            )
            message = env.get_response(call)
            outputs.append({"ok": not message.error, "text": message.content})
            continue
        try:
            result = env.make_tool_call(
                tool_name=action["name"], requestor=action.get("requestor", "assistant"), **action["arguments"]
            )
            outputs.append({"ok": True, "text": environment_cls.to_json_str(result)})
        except Exception as exc:  # tau2 shows every exception to the caller this way
            outputs.append({"ok": False, "text": environment_cls.to_json_str(f"Error: {exc}")})
    return {
        "task_id": task.id,
        "outputs": outputs,
        "db_hash": env.get_db_hash(),
        "user_db_hash": env.get_user_db_hash(),
    }


def _scripted_messages(domain: str, task: Any, skip: set[int]) -> list[Any]:
    """The dialogue matrix_hpc's ``scripted.gold_trajectory`` builds, made of tau2's own messages."""
    from tau2.data_model.message import AssistantMessage, ToolCall, UserMessage

    env = _fresh_environment(domain, task)
    messages: list[Any] = [UserMessage(role="user", content="Hi, I need help.")]
    criteria = task.evaluation_criteria
    for index, action in enumerate(criteria.actions or []):
        if index in skip:
            continue
        call = ToolCall(id=f"call_{index}", name=action.name, arguments=action.arguments, requestor=action.requestor)
        message_cls = UserMessage if action.requestor == "user" else AssistantMessage
        messages.append(message_cls(role=action.requestor, content=None, tool_calls=[call]))
        messages.append(env.get_response(call))
    summary = " ".join(criteria.communicate_info or []) or "Done."
    messages.append(AssistantMessage(role="assistant", content=summary))
    return messages


def _last_successful_write(domain: str, task: Any) -> int | None:
    env = _fresh_environment(domain, task)
    messages = _scripted_messages(domain, task, set())
    failed = {m.id for m in messages if getattr(m, "role", None) == "tool" and m.error}
    writes = [
        i
        for i, action in enumerate(task.evaluation_criteria.actions or [])
        if env._has_tool(action.name) and env._is_mutating_tool(action.name) and f"call_{i}" not in failed
    ]
    return writes[-1] if writes else None


def reward_row(domain: str, task: Any, variant: str, skip: set[int]) -> dict[str, Any]:
    """tau2's evaluator on one scripted trajectory: every component, and the reward where no LLM is needed."""
    from tau2.data_model.simulation import SimulationRun, TerminationReason
    from tau2.data_model.tasks import RewardType
    from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
    from tau2.evaluator.evaluator_action import ActionEvaluator
    from tau2.evaluator.evaluator_communicate import CommunicateEvaluator
    from tau2.evaluator.evaluator_env import EnvironmentEvaluator
    from tau2.registry import registry

    messages = _scripted_messages(domain, task, skip)
    env_info = EnvironmentEvaluator.calculate_reward(
        environment_constructor=registry.get_env_constructor(domain), task=task, full_trajectory=messages
    )
    action_info = ActionEvaluator.calculate_reward(task=task, full_trajectory=messages)
    communicate_info = CommunicateEvaluator.calculate_reward(task=task, full_trajectory=messages)
    reward = None
    if RewardType.NL_ASSERTION not in task.evaluation_criteria.reward_basis:  # the rest needs an LLM judge
        run = SimulationRun(
            id="scripted", task_id=task.id, start_time="", end_time="", duration=0.0,
            termination_reason=TerminationReason.AGENT_STOP, messages=messages,
        )  # fmt: skip
        reward = evaluate_simulation(run, task, EvaluationType.ALL, solo_mode=False, domain=domain).reward
    return {
        "task_id": task.id,
        "variant": variant,
        "skip": sorted(skip),
        "reward": reward,
        "env_reward": env_info.reward,
        "db_match": env_info.db_check.db_match if env_info.db_check else None,
        "env_assertions": [check.met for check in env_info.env_assertions or []],
        "action_reward": action_info.reward,
        "action_checks": [check.action_match for check in action_info.action_checks or []],
        "communicate_reward": communicate_info.reward,
        "communicate_checks": [check.met for check in communicate_info.communicate_checks or []],
    }


def run_reward_job(domain: str, split: str, output_path: Path) -> int:
    env_module, _ = _tau2_modules(domain)
    count = 0
    with _open_output(output_path) as out:
        for task in env_module.get_tasks(split):
            out.write(json.dumps(reward_row(domain, task, "gold", set())) + "\n")
            skipped = _last_successful_write(domain, task)
            if skipped is not None:
                out.write(json.dumps(reward_row(domain, task, "skip_write", {skipped})) + "\n")
            count += 1
    print(f"{domain}/{split} rewards: {count} tasks -> {output_path}", file=sys.stderr)
    return count


def _gold_inputs(tasks: Iterable[Any]) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    for task in tasks:
        criteria = task.evaluation_criteria
        gold = criteria.actions if criteria is not None and criteria.actions else []
        yield task, [{"name": a.name, "arguments": a.arguments, "requestor": a.requestor} for a in gold]


def _file_inputs(path: Path, tasks: list[Any]) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    by_id = {task.id: task for task in tasks}
    with path.open() as fp:
        for number, line in enumerate(fp, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row["task_id"] not in by_id:
                raise SystemExit(f"{path}:{number}: unknown task_id {row['task_id']!r}")
            yield by_id[row["task_id"]], row["actions"]


def _open_output(path: Path) -> TextIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":  # mtime=0: the same content gives the same bytes
        raw = gzip.GzipFile(filename=path, mode="wb", compresslevel=9, mtime=0)
        return io.TextIOWrapper(raw, encoding="utf-8")
    return path.open("w", encoding="utf-8")


def run_job(domain: str, split: str, input_path: Path | None, output_path: Path, live: bool = False) -> int:
    env_module, _ = _tau2_modules(domain)
    tasks = env_module.get_tasks(split)
    pairs = _gold_inputs(tasks) if input_path is None else _file_inputs(input_path, tasks)
    count = 0
    with _open_output(output_path) as out:
        for task, actions in pairs:
            out.write(json.dumps(replay_task(domain, task, actions, live), ensure_ascii=False) + "\n")
            count += 1
    print(f"{domain}/{split}: {count} tasks -> {output_path}", file=sys.stderr)
    return count


def write_llm_views(output_dir: Path) -> None:
    """What tau2 shows the LLMs: every tool schema, and sha256 of its agent and user system prompts."""
    import hashlib

    from tau2.agent.llm_agent import LLMAgent
    from tau2.registry import registry
    from tau2.user.user_simulator import UserSimulator

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    schemas: dict[str, Any] = {}
    prompts: dict[str, Any] = {}
    for domain in DOMAINS:
        env = registry.get_env_constructor(domain)()
        user_tools = env.get_user_tools() if env.user_tools is not None else []
        schemas[domain] = {"assistant": [t.openai_schema for t in env.get_tools()],
                           "user": [t.openai_schema for t in user_tools]}
        agent = LLMAgent(tools=env.get_tools(), domain_policy=env.get_policy(), llm="none")
        users = {task.id: sha(UserSimulator(llm="none", instructions=str(task.user_scenario),
                                            tools=user_tools or None).system_prompt)
                 for task in registry.get_tasks_loader(domain)()[:5]}
        prompts[domain] = {"agent_system_prompt_sha256": sha(agent.system_prompt), "user_system_prompt_sha256": users}
    for name, data in (("tool_schemas.json", schemas), ("prompts.json", prompts)):
        with open(output_dir / name, "w") as out:
            json.dump(data, out, indent=1, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tau2-root", type=Path, required=True, help="tau2-bench checkout (its data/ is used)")
    parser.add_argument("--all", action="store_true", help="regenerate every file under tests/data/tau2_golden/")
    parser.add_argument("--domain", choices=DOMAINS)
    parser.add_argument("--split", default="base", help="task split for gold actions (default: base)")
    parser.add_argument("--input", type=Path, help="replay this action list instead of the gold actions")
    parser.add_argument("--output", type=Path, help="output JSONL (.gz for gzip)")
    parser.add_argument("--rewards", action="store_true", help="write tau2's rewards of scripted trajectories instead")
    parser.add_argument("--live", action="store_true", help="sync after every call, as a live dialogue does")
    parser.add_argument("--llm-views", action="store_true",
                        help="write tool_schemas.json and prompts.json (what tau2 shows the LLMs) and exit")
    args = parser.parse_args(argv)
    os.environ.setdefault("TAU2_DATA_DIR", str(args.tau2_root / "data"))
    try:
        import loguru

        loguru.logger.remove()  # tau2 logs every tool call; the output file is what matters
    except ImportError:
        pass
    if args.llm_views or args.all:
        write_llm_views(GOLDEN_DIR)
        if args.llm_views:
            return 0
    if args.all:
        for domain, split, input_name, output_name in ALL_JOBS:
            input_path = GOLDEN_DIR / input_name if input_name else None
            run_job(domain, split, input_path, GOLDEN_DIR / output_name)
        for domain, split, input_name, output_name in ALL_LIVE_JOBS:
            input_path = GOLDEN_DIR / input_name if input_name else None
            run_job(domain, split, input_path, GOLDEN_DIR / output_name, live=True)
        for domain, split, output_name in ALL_REWARD_JOBS:
            run_reward_job(domain, split, GOLDEN_DIR / output_name)
        return 0
    if args.domain is None or args.output is None:
        parser.error("give --all, or --domain and --output")
    if args.rewards:
        run_reward_job(args.domain, args.split, args.output)
        return 0
    run_job(args.domain, args.split, args.input, args.output, live=args.live)
    return 0


if __name__ == "__main__":
    sys.exit(main())
