"""Load an ``export tau2`` sample with tau2-bench's own ``Results`` model and score it with its metrics.

Runs in a venv with tau2-bench a2c02472 installed (not a matrix_hpc
dependency; docs/tau2.md says how). Writes
``tests/data/tau2_golden/export_check.json``: tau2's ``Results`` JSON
schema, and what ``compute_metrics`` gives on the sample, which
tests/unit/test_tau2_export.py compares matrix_hpc's export and metrics with.

    LITELLM_LOCAL_MODEL_COST_MAP=True /work/tau2venv/bin/python scripts/tau2_export_check.py \\
        tests/data/tau2_golden/export_sample.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tau2.data_model.simulation import Results  # type: ignore[import-not-found]
from tau2.metrics.agent_metrics import compute_metrics  # type: ignore[import-not-found]

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tau2_golden" / "export_check.json"


def main() -> None:
    results = Results.load(Path(sys.argv[1]))  # raises when the file is not tau2's results JSON
    m = compute_metrics(results)
    check = {
        "simulations": len(results.simulations),
        "tasks": len(results.tasks),
        "metrics": {"avg_reward": m.avg_reward, "pass_hat_ks": {str(k): v for k, v in m.pass_hat_ks.items()}},
        "rewards": [s.reward_info.reward for s in results.simulations],
        "schema": Results.model_json_schema(),
    }
    OUT.write_text(json.dumps(check, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in check.items() if k != "schema"}))


if __name__ == "__main__":
    main()
