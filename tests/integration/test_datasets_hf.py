"""Hugging Face datasets by hub name, with the hub unreachable (offline mode):
read from a local Hugging Face cache built with the real ``datasets``
(tests/integration/hf_cache.py says how), streamed with bounded memory, and
refused (one line, before Ray starts) when the dataset is not in the cache.
Resume over a streamed hub dataset (kill -9, rerun) is in test_samples.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from tests.integration.hf_cache import offline_env, put_in_hf_cache
from tests.integration.runs import log_of, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.needs("ray")]

BIG_ROWS = 20_000
TEXT_BYTES = 2048  # per row: about 40 MB of text in the big dataset


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("hf") / "home"
    small = pa.table({"qid": [f"t{i:03d}" if i != 25 else None for i in range(30)],  # row 5 of test: no id
                      "question": [f"Q{i}?" if i != 27 else None for i in range(30)]})
    put_in_hf_cache(home, "tester/tiny_questions", "main", {"train": small.slice(0, 20), "test": small.slice(20)})
    filler = "x" * (TEXT_BYTES - 16)
    big = pa.table({"id": [f"d{i:05d}" for i in range(BIG_ROWS)],
                    "question": [f"Q{i}? {filler}" for i in range(BIG_ROWS)]})
    put_in_hf_cache(home, "tester/big_questions", "default", {"train": big})
    damaged = put_in_hf_cache(home, "tester/damaged", "default", {"train": big.slice(0, 3000)})
    arrow = next(damaged.rglob("damaged-train.arrow"))  # three 1,000-row record batches: cut in the third
    os.truncate(arrow, arrow.stat().st_size * 5 // 6)
    return home


READ_OFFLINE = r"""
import json, sys
import psutil
from matrix_hpc.store.input import DatasetConf, HFDatasetConf, check_input, count_input_rows, iter_input

tiny = DatasetConf(id_column="qid", hf=HFDatasetConf(name="tester/tiny_questions", config="main", split="test"),
                   limit=9)
check_input(tiny)
small = [(i.id, i.row["question"] if i.row else i.error) for i in iter_input(tiny)]

big = DatasetConf(hf=HFDatasetConf(name="tester/big_questions", streaming=True))
check_input(big)
proc = psutil.Process()
stream = iter_input(big)
ids = [next(stream).id]  # the stream is open: the baseline holds the library and the reader
base = peak = proc.memory_info().rss
for n, item in enumerate(stream, 1):
    ids.append(item.id)
    if n % 500 == 0:
        peak = max(peak, proc.memory_info().rss)
cut = list(iter_input(DatasetConf(hf=HFDatasetConf(name="tester/damaged", streaming=True))))
print(json.dumps({"small": small, "count": count_input_rows(big), "ids": ids, "growth_mb": (peak - base) / 2**20,
                  "cut": [len(cut), cut[-1].id, cut[-1].error]}))
"""


def test_a_hub_dataset_is_read_by_name_offline_and_streamed_in_bounded_memory(hf_home: Path) -> None:
    r = subprocess.run([sys.executable, "-c", READ_OFFLINE], env=offline_env(hf_home), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got: dict[str, Any] = json.loads(r.stdout.splitlines()[-1])
    where = "hf:tester/tiny_questions/main[test]:row"  # config main, split test, the first 9 rows (limit)
    assert got["small"] == [[f"t{i:03d}", f"Q{i}?" if i != 27 else None] for i in range(20, 25)] + [
        ["tester/tiny_questions:row5", f"{where} 5: the id column 'qid' is null; give every row an id, or set "
                                       "dataset.id_column=null to use a hash of the row"],
        ["t026", "Q26?"], ["t027", None], ["t028", "Q28?"]]
    assert got["count"] == BIG_ROWS and got["ids"] == [f"d{i:05d}" for i in range(BIG_ROWS)]
    data_mb = BIG_ROWS * TEXT_BYTES / 2**20
    # Held: the seen-ids set (~100 bytes an id) and one 1024-row batch (2 MB), not the 39 MB of rows.
    assert got["growth_mb"] < data_mb / 3, got["growth_mb"]
    # A read that breaks off keeps the rows read; one failed item stands for the rest (as for a cut file).
    items, last_id, error = got["cut"]
    assert 1000 <= items - 1 < 3000 and last_id == "__input_error__:hf:tester/damaged[train]", got["cut"]
    assert error.startswith(f"hf:tester/damaged[train] after {items - 1} row(s): input file unreadable"), error


def test_a_dataset_missing_from_the_cache_is_refused_before_ray_starts(hf_home: Path, tmp_path: Path) -> None:
    r = run_cli("dataset=hf", "dataset.hf.name=tester/not_downloaded", f"output.dir={tmp_path / 'out'}",
                env=offline_env(hf_home))
    assert r.returncode == 2, log_of(r)[-3000:]
    error = [line for line in r.stderr.splitlines() if line.startswith("matrix-hpc: error:")]
    assert len(error) == 1, r.stderr[-3000:]
    assert "dataset.hf.name='tester/not_downloaded'" in error[0]
    assert f"not in the Hugging Face datasets cache at {hf_home / 'datasets'}" in error[0]
    assert "offline mode is on" in error[0] and "datasets.load_dataset('tester/not_downloaded'" in error[0]
    assert "Traceback" not in r.stderr and "Ray" not in r.stdout + r.stderr  # refused before Ray started
