"""tau2's NL-assertion judge: the request it sends and how its answer becomes verdicts.

The prompts are tau2's (:mod:`prompts`); the answer is tau2's JSON
``{"results": [{"expectedOutcome", "reasoning", "metExpectation"}]}``.
tau2 crashes on an answer it cannot read; here such an answer rules every
assertion unmet, and says why, so a weak judge model ends rows instead of
failing them.

Example::

    messages = judge_request(trajectory, ["Agent refunds the order"])
    verdicts = parse_verdicts('{"results": [{"metExpectation": true, "reasoning": "ok"}]}', 1)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from matrix_hpc.workflows.tau2.prompts import JUDGE_SYSTEM_PROMPT, judge_user_prompt

Verdict = tuple[bool, str]


def judge_request(trajectory: Sequence[Mapping[str, Any]], assertions: Sequence[str]) -> list[dict[str, Any]]:
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
            {"role": "user", "content": judge_user_prompt(trajectory, assertions)}]


def _results(text: str) -> list[Any] | None:
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    results = data.get("results") if isinstance(data, dict) else None
    return results if isinstance(results, list) else None


def parse_verdicts(text: str | None, assertions: Sequence[str]) -> list[Verdict]:
    """One verdict per assertion, in order: by position, as tau2 reads them."""
    results = _results(text or "")
    if results is None:
        why = f"the judge's answer is not tau2's JSON results: {(text or '')[:300]!r}"
        return [(False, why) for _ in assertions]
    verdicts: list[Verdict] = []
    for index in range(len(assertions)):
        result = results[index] if index < len(results) else None
        if not isinstance(result, dict) or not isinstance(result.get("metExpectation"), bool):
            verdicts.append((False, f"the judge gave no verdict for assertion {index}"))
        else:
            verdicts.append((result["metExpectation"], str(result.get("reasoning", ""))))
    return verdicts


def fixed_judge(verdicts: Sequence[Verdict]) -> Any:  # Any: evaluator.NLJudge
    """A judge that answers verdicts already obtained (the workflow's judge role asked the LLM)."""
    def judge(_messages: Any, _assertions: Any) -> Sequence[Verdict]:
        return list(verdicts)
    return judge
