"""N samples per input row (``run.samples_per_input``): the tasks of a row.

Sample ``k`` of input row ``<id>`` is the task ``<id>#s<k>``, except sample 0,
which keeps the plain ``<id>``: with one sample per row the ids are the input
ids (outputs written before samples existed resume unchanged), and raising N
on a resumed output only adds the tasks of the new samples.

With N > 1 each sample gets a seed, distinct among the samples of a row and
the same on every rerun: ``(hash(run.seed, <id>) + k) mod 2^31`` (31 bits:
every OpenAI-compatible server takes it as a request's ``seed``). With N = 1
there is no per-task seed (None): requests are what they were before.

    >>> [t.id for t in expand_samples([InputItem("q1", {})], 3, run_seed=0)]
    ['q1', 'q1#s1', 'q1#s2']
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator

from matrix_hpc.store.input import InputItem

SAMPLE_SEP = "#s"  # between the input id and the sample number in a task id
SEED_MODULUS = 2 ** 31


def sample_task_id(input_id: str, sample: int) -> str:
    return input_id if sample == 0 else f"{input_id}{SAMPLE_SEP}{sample}"


def sample_seed(run_seed: int, input_id: str, sample: int) -> int:
    base = int.from_bytes(hashlib.blake2b(f"{run_seed}:{input_id}".encode(), digest_size=8).digest(), "big")
    return (base + sample) % SEED_MODULUS


def expand_samples(items: Iterable[InputItem], samples_per_input: int, run_seed: int) -> Iterator[InputItem]:
    """Each input item as ``samples_per_input`` task items (ids, samples, seeds);
    the items themselves when it is 1. A repeat of an input id repeats all its
    samples (``duplicate_of`` is kept), and an unreadable row fails once per sample."""
    if samples_per_input == 1:
        yield from items
        return
    for item in items:
        for k in range(samples_per_input):
            yield dataclasses.replace(item, id=sample_task_id(item.id, k), sample=k,
                                      seed=sample_seed(run_seed, item.id, k))
