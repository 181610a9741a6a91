"""The end-of-run check: every input id is in the output on disk.

Acknowledgements say what a sink believes it committed; only the files say
what a reader will get. After the last commit the driver reads the output's
ids back and walks the input again (each row as its ``run.samples_per_input``
task ids); a task id with no row is *missing*
and is admitted again (a bounded number of rounds), and a run that still
misses ids does not call itself finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from matrix_hpc.runtime.samples import expand_samples
from matrix_hpc.store.input import DatasetConf, InputItem, iter_input
from matrix_hpc.store.resume import scan_output

MISSING_EXAMPLES = 5  # ids named in the summary


@dataclass
class MissingIds:
    items: list[InputItem] = field(default_factory=list)  # the first occurrence of each missing id

    def __len__(self) -> int:
        return len(self.items)

    def examples(self) -> list[str]:
        return [f"{item.id} ({item.where})" if item.where else item.id for item in self.items[:MISSING_EXAMPLES]]


def missing_input(out_dir: Path, dataset: DatasetConf, samples_per_input: int = 1, run_seed: int = 0) -> MissingIds:
    """Tasks (input rows, or their samples) whose id has no row in ``out_dir``
    (a repeated input id counts once). Only reads: the sinks may still be
    writing (no temp file or compaction is touched)."""
    done = scan_output(out_dir, repair=False).done
    missing = MissingIds()
    seen: set[str] = set()  # only missing ids: small unless the run lost much
    for item in expand_samples(iter_input(dataset), samples_per_input, run_seed):
        if item.id in done or item.id in seen or item.duplicate_of is not None:
            continue
        seen.add(item.id)
        missing.items.append(item)
    return missing

