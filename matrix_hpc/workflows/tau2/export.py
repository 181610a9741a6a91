"""``matrix-hpc export tau2 OUTPUT_DIR DEST``: a workflow=tau2 output as tau2-bench's results JSON.

The file is what tau2-bench (a2c02472) writes with ``Results.save(path)``
and reads with ``Results.load(path)``: ``info`` (the run's settings),
``tasks`` (each task once, tau2's own task JSON from the rows) and
``simulations`` (one ``SimulationRun`` per ``ok`` row: the trajectory in
tau2's message format, ``reward_info`` in tau2's check models, the
termination reason, trial and seed). So tau2's viewer and its metrics
(``tau2.metrics.agent_metrics.compute_metrics``: average reward, pass^k)
read matrix_hpc output.

Rows are streamed: each simulation is written as soon as its row is read,
and only the distinct tasks are held (at most a domain's task list), so the
memory does not grow with the output. Rows that are not ``ok`` (failed or
filtered) have no trajectory tau2 could score; they are counted, not
written.

    summary = export_tau2(Path("out/telecom"), Path("telecom_results.json"), batches)
    metrics(json.loads(Path("telecom_results.json").read_text()))   # {"avg_reward": ..., "pass_hat_ks": {...}}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from matrix_hpc.workflows.tau2 import evaluator
from matrix_hpc.workflows.tau2.rows import DEFAULT_SEED

#: Columns an export reads from an output (everything else stays on disk).
COLUMNS = ["id", "status", "input", "result", "t_admitted", "t_finished"]
CONFIG_FILE = Path("_matrix") / "config.yaml"
TAU2_COMMIT = "a2c024725189473d2d7cea3a5cfdbcc67478e41f"


class ExportError(RuntimeError):
    """An output that is not a workflow=tau2 output, or a row that cannot be exported; the text says why."""


@dataclass
class ExportSummary:
    dest: Path
    simulations: int = 0
    tasks: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # status -> rows not written


def run_settings(out_dir: Path) -> dict[str, Any]:
    """The stored config's ``workflow`` and ``llm`` sections (the run's settings, secrets already redacted)."""
    import yaml

    path = Path(out_dir) / CONFIG_FILE
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ExportError(f"{out_dir} has no {CONFIG_FILE} (not a matrix-hpc output directory)") from None
    workflow = cfg.get("workflow") or {}
    if workflow.get("name") != "tau2":
        raise ExportError(f"{out_dir} was written by workflow={workflow.get('name')!r}; export tau2 reads "
                          "workflow=tau2 outputs only")
    return {"workflow": workflow, "llm": cfg.get("llm") or {}}


def _model(settings: Mapping[str, Any], role: str) -> str | None:
    """The model a role talked to: its own ``workflow.<role>_llm.model``, else the run's service's."""
    own = (settings["workflow"].get(f"{role}_llm") or {}).get("model")
    if own:
        return str(own)
    llm = settings["llm"]
    backend = llm.get("backend")
    section = llm.get(backend) if isinstance(backend, str) else None
    model = (section.get("served_model_name") or section.get("model")) if isinstance(section, Mapping) else None
    return str(model) if model else (str(backend) if backend else None)


def results_info(settings: Mapping[str, Any], policy: str) -> dict[str, Any]:
    """tau2's ``Info``: the run's limits, trials, the two LLMs and the domain's environment."""
    wf = settings["workflow"]

    def llm_args(role: str) -> dict[str, Any]:
        args = {"temperature": wf.get(f"{role}_temperature", 0.0)}
        if wf.get(f"{role}_max_tokens") is not None:
            args["max_tokens"] = wf[f"{role}_max_tokens"]
        return args

    return {
        "git_commit": f"matrix_hpc workflow=tau2 (tau2-bench {TAU2_COMMIT} semantics)",
        "num_trials": int(wf.get("trials") or 1),
        "max_steps": int(wf.get("max_steps") or 200),
        "max_errors": int(wf.get("max_errors") or 10),
        "user_info": {"implementation": "user_simulator", "llm": _model(settings, "user"),
                      "llm_args": llm_args("user")},
        "agent_info": {"implementation": "llm_agent", "llm": _model(settings, "agent"),
                       "llm_args": llm_args("agent")},
        "environment_info": {"domain_name": str(wf.get("domain")), "policy": policy, "tool_defs": None},
        "seed": DEFAULT_SEED,
    }


def _iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).isoformat() if ts is not None else ""


def _loads(value: Any, default: Any) -> Any:
    if value is None:
        return default
    return json.loads(value) if isinstance(value, str) else value


def _communicate_justification(info: str, met: bool, messages: list[dict[str, Any]]) -> str:
    """tau2's text for a communicate check (it quotes the first agent message that says it)."""
    if met:
        for m in messages:
            content = m.get("content")
            if m.get("role") == "assistant" and content and info.lower() in content.lower().replace(",", ""):
                return f"Information '{info}' communicated in the message:\n '{content}'"
    return f"Information '{info}' not communicated."


def reward_info(result: Mapping[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """A row's reward and components as tau2's ``RewardInfo`` (its check models, its notes)."""
    termination = result.get("termination_reason")
    breakdown = _loads(result.get("reward_breakdown"), {})
    if termination not in evaluator.STOP_REASONS:  # tau2 scores nothing after a premature end
        return {"reward": 0.0, "reward_basis": None, "reward_breakdown": None,
                "info": {"note": f"Simulation terminated prematurely. Termination reason: {termination}"}}
    db_match = result.get("db_match")
    envs = _loads(result.get("env_assertions"), [])
    actions = _loads(result.get("action_checks"), [])
    communicate = _loads(result.get("communicate_checks"), [])
    nl = _loads(result.get("nl_assertions"), [])
    note = result.get("reward_note")
    return {
        "reward": float(result.get("reward") or 0.0),
        "db_check": None if db_match is None else {"db_match": bool(db_match), "db_reward": 1.0 if db_match else 0.0},
        "env_assertions": [{"env_assertion": c["assertion"], "met": bool(c["met"]), "reward": 1.0 if c["met"] else 0.0}
                           for c in envs],
        "action_checks": [{"action": c["action"], "action_match": bool(c["action_match"]),
                           "action_reward": 1.0 if c["action_match"] else 0.0, "tool_type": None} for c in actions],
        "nl_assertions": nl or None,
        "communicate_checks": [{"info": c["info"], "met": bool(c["met"]),
                                "justification": _communicate_justification(c["info"], bool(c["met"]), messages)}
                               for c in communicate],
        "reward_basis": result.get("reward_basis"),
        "reward_breakdown": breakdown or None,
        "info": {"note": note} if note else None,
    }


def simulation(row: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One ``ok`` row as tau2's ``SimulationRun``; returns it and the row's task (tau2's task JSON)."""
    try:
        result = _loads(row["result"], {})
        row_input = _loads(row["input"], {})
        task = _loads(row_input["task"], {})
        messages = [{**m, "turn_idx": i} for i, m in enumerate(_loads(result["tau2_messages"], []))]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ExportError(f"row {row.get('id')!r} is not a workflow=tau2 row ({type(e).__name__}: {e})") from None
    seed = result.get("trial_seed", result.get("seed", row_input.get("seed")))
    t0, t1 = row.get("t_admitted"), row.get("t_finished")
    sim = {
        "id": str(row["id"]),
        "task_id": str(result.get("task_id", task.get("id"))),
        "timestamp": _iso(t1),
        "start_time": _iso(t0),
        "end_time": _iso(t1),
        "duration": (t1 - t0) if t0 is not None and t1 is not None else 0.0,
        "termination_reason": result.get("termination_reason"),
        "agent_cost": None,
        "user_cost": None,
        "reward_info": reward_info(result, messages),
        "messages": messages,
        "trial": result.get("trial", row_input.get("trial")),
        "seed": seed,
        "mode": "half_duplex",
        "info": {"matrix_hpc": {k: result.get(k) for k in (
            "num_steps", "num_errors", "num_tool_calls", "num_user_tool_calls", "num_dropped_tool_calls",
            "agent_prompt_tokens", "agent_completion_tokens", "user_prompt_tokens", "user_completion_tokens",
            "env_backend", "stop_token", "llm_error")}},
    }
    return sim, task


def iter_rows(batches: Iterable[Any], chunk: int = 256) -> Iterator[dict[str, Any]]:
    """Row dicts from pyarrow record batches (or dicts as they are), ``chunk`` rows made into dicts at a time
    (a row's trajectory JSON can be tens of kB: a whole batch as dicts would multiply the batch's memory)."""
    for batch in batches:
        if isinstance(batch, Mapping):
            yield dict(batch)
            continue
        for start in range(0, batch.num_rows, chunk):
            yield from batch.slice(start, chunk).to_pylist()


def export_tau2(out_dir: Path, dest: Path, batches: Iterable[Any]) -> ExportSummary:
    """Write ``dest`` (tau2's results JSON) from an output's rows (``batches``: its rows, any status).

    Written to ``dest.tmp`` and renamed at the end, so a crash never leaves
    a truncated file under the destination's name.
    """
    settings = run_settings(out_dir)
    domain = str(settings["workflow"].get("domain"))
    try:
        from matrix_hpc.workflows.tau2.prompts import domain_policy

        policy = domain_policy(domain)
    except FileNotFoundError:  # the domain's data is not on this machine: tau2 needs the text, not its content
        policy = ""
    summary = ExportSummary(Path(dest))
    tasks: dict[str, dict[str, Any]] = {}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fp:
        fp.write('{"timestamp": ' + json.dumps(datetime.now().isoformat()) + ',\n"info": '
                 + json.dumps(results_info(settings, policy)) + ',\n"simulations": [')
        for row in iter_rows(batches):
            status = row.get("status")
            if status != "ok":
                summary.skipped[str(status)] = summary.skipped.get(str(status), 0) + 1
                continue
            sim, task = simulation(row)
            fp.write((",\n" if summary.simulations else "\n") + json.dumps(sim))
            summary.simulations += 1
            tasks.setdefault(sim["task_id"], task)
        fp.write('\n],\n"tasks": [')
        fp.write(",\n".join(json.dumps(t) for t in tasks.values()))
        fp.write("]}\n")
    os.replace(tmp, dest)
    summary.tasks = len(tasks)
    return summary


def metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """tau2's headline metrics of a results JSON, computed as ``compute_metrics`` does.

    ``avg_reward`` over the simulations (infrastructure errors excluded);
    ``pass_hat_ks``: for k = 1 .. the fewest trials of any task (at most
    ``info.num_trials``), the mean over tasks of C(successes, k) / C(trials, k),
    a success being a reward within 1e-6 of 1.
    """
    sims = [s for s in results.get("simulations") or [] if s.get("termination_reason") != "infrastructure_error"]
    if not sims:
        return {"avg_reward": 0.0, "pass_hat_ks": {}, "total_simulations": 0, "total_tasks": 0}
    per_task: dict[str, list[float]] = {}
    rewards = []
    for s in sims:
        reward = float((s.get("reward_info") or {}).get("reward", 0.0))
        rewards.append(reward)
        per_task.setdefault(str(s["task_id"]), []).append(reward)
    max_k = min(int(results["info"]["num_trials"]), min(len(r) for r in per_task.values()))
    pass_hat_ks = {}
    for k in range(1, max_k + 1):
        values = [math.comb(sum(1 - 1e-6 <= r <= 1 + 1e-6 for r in rs), k) / math.comb(len(rs), k)
                  for rs in per_task.values()]
        pass_hat_ks[k] = sum(values) / len(values)
    return {"avg_reward": sum(rewards) / len(rewards), "pass_hat_ks": pass_hat_ks,
            "total_simulations": len(sims), "total_tasks": len(per_task)}
