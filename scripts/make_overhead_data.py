"""Write N MMLU-shaped input rows for the overhead workload.

    python scripts/make_overhead_data.py --rows 2000 --out data/overhead_demo.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("data/overhead_demo.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for i in range(args.rows):
            options = [f"option {rng.randrange(1000)}" for _ in range(4)]
            f.write(json.dumps({"id": f"q{i:07d}", "question": f"Question {i}?", "options": options,
                                "answer": "ABCD"[rng.randrange(4)]}) + "\n")
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
