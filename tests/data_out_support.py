"""Synthetic output directories for the export and curation tests (written with the store's own functions)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa

from matrix_hpc.store.layout import REJECTED_DIR, part_file_name, shard_dir, shard_of, write_table_atomic
from matrix_hpc.store.resume import check_and_record_config
from matrix_hpc.store.rows import output_schema

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
         "phi chi psi omega river stone cloud paper engine garden silver window market forest signal").split()


def random_text(rng: random.Random, words: int = 80) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(words))


def output_row(task_id: str, text: str, status: str = "ok", tokens: int = 10) -> dict[str, Any]:
    return {"id": task_id, "status": status, "input": json.dumps({"question": f"q {task_id}"}),
            "result": json.dumps({"answer": text}), "attempts": 1, "prompt_tokens": tokens,
            "completion_tokens": 2 * tokens, "t_admitted": 1.0, "t_finished": 2.0, "duration_s": 1.0,
            "run_id": "r1", "error": "boom" if status == "failed" else None,
            "messages": [{"agent": "a", "role": "assistant", "content": text, "t_start": 1.0, "t_end": 2.0,
                          "prompt_tokens": tokens, "completion_tokens": 2 * tokens}]}


def write_output(out: Path, rows: list[dict[str, Any]], num_shards: int = 4, files_per_shard: int = 2,
                 rejected: bool = False) -> None:
    """``rows`` as committed part files (failed/filtered under _rejected/ when ``rejected``) and an identity."""
    schema = output_schema()
    check_and_record_config(out, {"workflow": {"name": "coral", "api_key": "***"}, "dataset": {"path": "in.jsonl"}},
                            {}, "workflow:\n  name: coral\n", force=False)
    groups: dict[tuple[bool, int, int], list[dict[str, Any]]] = {}
    for n, row in enumerate(rows):
        aside = rejected and row["status"] != "ok"
        groups.setdefault((aside, shard_of(row["id"], num_shards), n % files_per_shard), []).append(row)
    for (aside, shard, seq), part in sorted(groups.items()):
        base = out / REJECTED_DIR if aside else out
        path = shard_dir(base, shard) / part_file_name("r1", shard % 2, "0000abcd", seq)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table_atomic(pa.Table.from_pylist(part, schema=schema), path)
