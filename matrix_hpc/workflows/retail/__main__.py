"""``python -m matrix_hpc.workflows.retail --split test --out rows.jsonl``: write task rows for a run."""

import sys

from matrix_hpc.workflows.retail.tasks import main

sys.exit(main())
