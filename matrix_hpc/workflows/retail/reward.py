"""tau2-bench's retail reward: final DB == gold-replayed DB, times the communicate-info check.

Example::

    gold = GoldHashCache(RetailSnapshot.from_file("db.json"))
    info = compute_reward(task, final_db_hash=env.db_hash(), agent_messages=["Your total is 10."],
                          gold=gold.get(task), termination_reason="user_stop")
    info.reward, info.to_dict()
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from matrix_hpc.workflows.retail.db import RetailSnapshot
from matrix_hpc.workflows.retail.env import RetailEnv, is_write_tool
from matrix_hpc.workflows.retail.tasks import RetailTask

# tau2 scores a dialogue only when it ended normally; any other end scores 0.
OK_TERMINATIONS = frozenset({"user_stop", "agent_stop"})


@dataclass(frozen=True)
class CommunicateCheck:
    info: str  # the expected string
    met: bool  # found in some agent message


@dataclass(frozen=True)
class GoldState:
    db_hash: str  # hash of the DB after replaying the task's gold actions
    replay_errors: tuple[str, ...] = ()  # gold actions that failed ("<action_id> <tool>: <error>")
    write_failed: bool = False  # a failed gold action was a write: the gold DB is incomplete


@dataclass
class RewardInfo:
    reward: float  # db_reward * communicate_reward (0 when the dialogue ended abnormally)
    db_match: bool  # final DB hash == gold DB hash
    db_reward: float  # 1.0 on a match (or when DB is not in the reward basis)
    communicate_reward: float  # 1.0 when every communicate_info string was said
    communicate_checks: list[CommunicateCheck] = field(default_factory=list)
    final_db_hash: str = ""
    gold_db_hash: str = ""
    gold_replay_errors: list[str] = field(default_factory=list)
    termination_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _normalise_message(text: str) -> str:
    # tau2: case-insensitive substring match after dropping commas ("1,234.5" says "1234.5")
    return text.lower().replace(",", "")


def communicate_checks(communicate_info: Iterable[str], agent_messages: Iterable[str]) -> list[CommunicateCheck]:
    """Which expected strings appear in the agent's text messages (tau2's normalisation)."""
    texts = [_normalise_message(m) for m in agent_messages if m]
    return [CommunicateCheck(info, any(info.lower() in t for t in texts)) for info in communicate_info]


def replay_gold(task: RetailTask, snapshot: RetailSnapshot) -> GoldState:
    """Replay the task's gold actions on a fresh environment and hash its DB."""
    env = RetailEnv(snapshot)
    errors, write_failed = [], False
    for action in task.actions:
        outcome = env.call_detailed(action.name, action.arguments)
        if outcome.error:
            errors.append(f"{action.action_id} {action.name}: {outcome.content}")
            write_failed = write_failed or is_write_tool(action.name)
    return GoldState(env.db_hash(), tuple(errors), write_failed)


class GoldHashCache:
    """Gold states per task id: the replay is deterministic, so one per task per process."""

    def __init__(self, snapshot: RetailSnapshot) -> None:
        self.snapshot = snapshot
        self._states: dict[str, GoldState] = {}

    def get(self, task: RetailTask) -> GoldState:
        state = self._states.get(task.id)
        if state is None:
            state = replay_gold(task, self.snapshot)
            self._states[task.id] = state
        return state


def compute_reward(
    task: RetailTask,
    final_db_hash: str,
    agent_messages: Iterable[str],
    gold: GoldState,
    termination_reason: str | None = None,
) -> RewardInfo:
    """The reward and its parts.

    ``agent_messages``: the agent's text messages to the user (not tool calls).
    ``termination_reason``: how the dialogue ended; outside ``OK_TERMINATIONS``
    the reward is 0 (the parts are still reported). None means "ended normally".
    """
    notes: list[str] = []
    db_match = final_db_hash == gold.db_hash
    db_reward = 1.0 if db_match or "DB" not in task.reward_basis else 0.0
    if gold.write_failed:
        notes.append("gold replay incomplete: a gold write action failed, the DB verdict is unreliable")
    checks = communicate_checks(task.communicate_info, agent_messages)
    communicate_reward = 1.0 if all(c.met for c in checks) else 0.0
    reward = db_reward * communicate_reward
    if termination_reason is not None and termination_reason not in OK_TERMINATIONS:
        notes.append(f"dialogue ended with {termination_reason!r}: reward 0")
        reward = 0.0
    return RewardInfo(
        reward=reward, db_match=db_match, db_reward=db_reward, communicate_reward=communicate_reward,
        communicate_checks=checks, final_db_hash=final_db_hash, gold_db_hash=gold.db_hash,
        gold_replay_errors=list(gold.replay_errors), termination_reason=termination_reason, notes=notes,
    )


def evaluate_env(
    task: RetailTask,
    env: RetailEnv,
    agent_messages: Iterable[str],
    gold: GoldHashCache | None = None,
    termination_reason: str | None = None,
) -> RewardInfo:
    """Reward of an in-process environment (gold replayed on the env's own initial snapshot)."""
    gold_state = gold.get(task) if gold is not None else replay_gold(task, env.db.snapshot)
    return compute_reward(task, env.db_hash(), agent_messages, gold_state, termination_reason)
