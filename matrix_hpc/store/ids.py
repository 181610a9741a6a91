"""Sets of task ids without one Python object per id.

A resume over 100 million committed ids cannot afford a Python ``set``
(~150 bytes an id). Ids are hashed to 64 bits with a vectorised hash over the
Arrow string buffers (numpy only, no per-id Python call) and kept as a sorted
``uint64`` array: 8 bytes an id, membership by ``np.searchsorted``.

Exactness: a 64-bit hash collision between an uncommitted input id and a
committed one would skip that input id silently. :class:`IdSet` therefore
confirms every hash hit against the ids themselves: on the first hit it loads
the committed ids as one sorted fixed-width byte array (``n * longest id``
bytes, exact comparison by ``np.searchsorted``) when that fits the exact
budget (``MATRIX_HPC_RESUME_EXACT_MB``, default 512). Above the budget it
answers from the hash alone and logs, once, the bound on the chance that any
input id was mistaken for a committed one (lookups x ids / 2^64).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

_SEED = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_U64 = (1 << 64) - 1
_TAIL_MASKS = np.array([0] + [(1 << (8 * r)) - 1 for r in range(1, 8)] + [_U64], dtype=np.uint64)
EXACT_BUDGET_ENV = "MATRIX_HPC_RESUME_EXACT_MB"


def hash_ids(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of a string column, vectorised (equal to :func:`hash_id` per id).

    Nulls hash as the empty string; callers that care filter them first.
    """
    if isinstance(ids, pa.ChunkedArray):
        parts = [_hash_chunk(c) for c in ids.chunks]
        return np.concatenate(parts) if parts else np.empty(0, np.uint64)
    return _hash_chunk(ids)


def _hash_chunk(arr: pa.Array) -> np.ndarray:
    if arr.type != pa.large_string():
        arr = arr.cast(pa.large_string())  # one offsets width (int64) for every input
    n = len(arr)
    if n == 0:
        return np.empty(0, np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.empty(0, np.uint8)
    padded = np.zeros(int(offsets[-1]) + 8, np.uint8)  # 8 spare bytes: an unaligned word read never runs off
    padded[:int(offsets[-1] - offsets[0])] = data[offsets[0]:offsets[-1]]
    words = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
    start = offsets[:-1] - offsets[0]
    lengths = offsets[1:] - offsets[:-1]
    h = lengths.astype(np.uint64) * np.uint64(_SEED)
    for w in range(0, int(lengths.max()), 8):
        if int(lengths.min()) > w:  # every id has bytes at w: whole-array ops, no index
            h = _mix(h, words[start + w] & _TAIL_MASKS[np.minimum(lengths - w, 8)])
        else:  # only ids longer than w take another step (as hash_id does)
            live = np.flatnonzero(lengths > w)
            h[live] = _mix(h[live], words[start[live] + w] & _TAIL_MASKS[np.minimum(lengths[live] - w, 8)])
    return _finish(h)


def _mix(h: np.ndarray, word: np.ndarray) -> np.ndarray:
    h ^= word
    h *= np.uint64(_MUL1)
    h ^= h >> np.uint64(29)
    return h


def _finish(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(32)
    h *= np.uint64(_MUL2)
    h ^= h >> np.uint64(29)
    return h


def hash_id(task_id: str) -> int:
    """The hash of one id, in plain Python (same value as :func:`hash_ids`)."""
    b = task_id.encode()
    n = len(b)
    h = (n * _SEED) & _U64
    for w in range(0, n, 8):
        word = int.from_bytes(b[w:w + 8], "little")
        h = ((h ^ word) * _MUL1) & _U64
        h ^= h >> 29
    h ^= h >> 32
    h = (h * _MUL2) & _U64
    return h ^ (h >> 29)


class ExactIds:
    """Committed ids as one sorted fixed-width byte array: exact membership."""

    def __init__(self, ids: pa.Array) -> None:
        encoded = fixed_width_bytes(ids)
        encoded.sort()
        self._ids = encoded

    def __contains__(self, task_id: str) -> bool:
        key = np.bytes_(task_id.encode())
        i = int(np.searchsorted(self._ids, key))
        return i < len(self._ids) and self._ids[i] == key

    @staticmethod
    def fits(count: int, longest_bytes: int, budget_bytes: int) -> bool:
        return count * max(1, longest_bytes) <= budget_bytes


def fixed_width_bytes(ids: pa.Array) -> np.ndarray:
    """A string column as a numpy ``S<longest>`` array, built column by column
    from the Arrow buffers (no Python object per id)."""
    if ids.type != pa.large_string():
        ids = ids.cast(pa.large_string())
    n = len(ids)
    longest = max(1, longest_utf8_bytes(ids))
    out = np.zeros((n, longest), np.uint8)
    if n == 0:
        return out.view(f"S{longest}").reshape(0)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset:ids.offset + n + 1]
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8) if ids.buffers()[2] is not None else np.zeros(1, np.uint8)
    data = np.concatenate([data, np.zeros(1, np.uint8)])  # a safe index for positions past an id's end
    lengths = offsets[1:] - offsets[:-1]
    for k in range(longest):
        inside = lengths > k
        out[:, k] = data[np.where(inside, offsets[:-1] + k, len(data) - 1)]
    return out.view(f"S{longest}").reshape(n)


def exact_budget_bytes() -> int:
    return int(float(os.environ.get(EXACT_BUDGET_ENV, "512")) * 2**20)


class IdSet:
    """A compact, exact set of committed ids (see the module docstring).

    >>> s = IdSet.from_arrays([pa.array(["a", "b"])])
    >>> "a" in s, "c" in s, len(s)
    (True, False, 2)
    """

    def __init__(self, hashes: np.ndarray, load_ids: Callable[[], pa.Array] | None,
                 longest_bytes: int, has_nul: bool = False) -> None:
        self._hashes = hashes  # sorted, may hold equal values (two ids, one hash)
        self._load_ids = load_ids
        self._longest_bytes = longest_bytes
        self._has_nul = has_nul  # fixed-width bytes drop trailing NULs: such ids cannot be compared exactly
        self._exact: ExactIds | None = None
        self._hash_only_warned = False
        self._lookups = 0

    @classmethod
    def empty(cls) -> IdSet:
        return cls(np.empty(0, np.uint64), None, 0)

    @classmethod
    def from_arrays(cls, arrays: Sequence[pa.Array]) -> IdSet:
        """An IdSet of in-memory id arrays (tests, small sets)."""
        ids = pa.chunked_array(list(arrays), type=pa.string()).combine_chunks() if arrays else pa.array([], pa.string())
        hashes = hash_ids(ids)
        hashes.sort()
        return cls(hashes, lambda: ids, longest_utf8_bytes(ids), contains_nul(ids))

    def __len__(self) -> int:
        return int(len(self._hashes))

    def __contains__(self, task_id: object) -> bool:
        if not isinstance(task_id, str) or len(self._hashes) == 0:
            return False
        self._lookups += 1
        h = np.uint64(hash_id(task_id))
        i = int(np.searchsorted(self._hashes, h))
        if i >= len(self._hashes) or self._hashes[i] != h:
            return False
        return self._confirm(task_id)

    def _confirm(self, task_id: str) -> bool:
        if self._exact is None and self._load_ids is not None and not self._has_nul \
                and ExactIds.fits(len(self), self._longest_bytes, exact_budget_bytes()):
            self._exact = ExactIds(self._load_ids())
            self._load_ids = None
        if self._exact is not None:
            return task_id in self._exact
        self._warn_hash_only()
        return True

    def _warn_hash_only(self) -> None:
        if not self._hash_only_warned:
            self._hash_only_warned = True
            log.warning("resume: %d committed ids exceed the exact-check budget (%s=%d MB); ids are matched by "
                        "64-bit hash, so an input id is mistaken for a committed one with probability below "
                        "lookups x %d / 2^64 (about %.1e per million lookups). Raise the budget for an exact check.",
                        len(self), EXACT_BUDGET_ENV, exact_budget_bytes() // 2**20, len(self),
                        1e6 * len(self) / 2**64)


def longest_utf8_bytes(ids: pa.Array | pa.ChunkedArray) -> int:
    import pyarrow.compute as pc

    if len(ids) == 0:
        return 0
    longest = pc.max(pc.binary_length(ids)).as_py()
    return int(longest or 0)


def contains_nul(ids: pa.Array | pa.ChunkedArray) -> bool:
    import pyarrow.compute as pc

    return bool(len(ids)) and bool(pc.any(pc.match_substring(ids, "\x00")).as_py())


class GrowingHashSet:
    """Hashes of ids added over time (a sink's committed ids): a sorted base
    array plus a bounded buffer of recent hashes merged in batches.

    Answers "maybe present" by hash; callers confirm hits exactly (they are
    rare: only re-admitted tasks hit)."""

    MERGE_AT = 65_536

    def __init__(self, hashes: np.ndarray | None = None) -> None:
        self._base = np.sort(hashes) if hashes is not None else np.empty(0, np.uint64)
        self._recent: set[int] = set()

    def add_many(self, ids: Iterable[str]) -> None:
        self._recent.update(hash_id(i) for i in ids)
        if len(self._recent) >= self.MERGE_AT:
            merged = np.concatenate([self._base, np.fromiter(self._recent, np.uint64, len(self._recent))])
            merged.sort()
            self._base, self._recent = merged, set()

    def maybe_contains(self, task_id: str) -> bool:
        h = hash_id(task_id)
        if h in self._recent:
            return True
        i = int(np.searchsorted(self._base, np.uint64(h)))
        return i < len(self._base) and int(self._base[i]) == h

    def __len__(self) -> int:
        return int(len(self._base)) + len(self._recent)
