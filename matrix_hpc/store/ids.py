"""Sets of task ids without one Python object per id.

A resume over 100 million committed ids cannot afford a Python ``set``
(~150 bytes an id). Ids are hashed to 64 bits with a vectorised hash over the
Arrow string buffers (numpy only, no per-id Python call) and kept as a sorted
``uint64`` array: 8 bytes an id, membership by ``np.searchsorted``.

Exactness: a 64-bit hash collision between an uncommitted input id and a
committed one would skip that input id silently. :class:`IdSet` therefore
confirms every hash hit against the ids themselves: on the first hit it loads
the committed ids as fixed-width byte rows ordered like the hashes (about
``n * (2 * longest id + 16)`` bytes while loading) when that fits the exact
budget (``MATRIX_HPC_RESUME_EXACT_MB``, default 512). Above the budget it
answers from the hash alone and logs, once, the bound on the chance that any
input id was mistaken for a committed one (lookups x ids / 2^64).
"""

from __future__ import annotations

import bisect
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


_BLOCK_IDS = 1 << 16  # temporaries of 512 KiB stay in cache and are reused, not page-faulted in afresh


def _hash_chunk(arr: pa.Array) -> np.ndarray:
    if arr.type not in (pa.string(), pa.large_string()):
        arr = arr.cast(pa.large_string())
    n = len(arr)
    if n <= _BLOCK_IDS:
        return _hash_block(arr)
    out = np.empty(n, np.uint64)
    for i in range(0, n, _BLOCK_IDS):
        out[i:i + _BLOCK_IDS] = _hash_block(arr.slice(i, _BLOCK_IDS))
    return out


def _hash_block(arr: pa.Array) -> np.ndarray:
    n = len(arr)
    if n == 0:
        return np.empty(0, np.uint64)
    width = np.int32 if arr.type == pa.string() else np.int64
    offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset:arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.empty(0, np.uint8)
    data = data[offsets[0]:offsets[-1]]
    start = offsets[:-1] - offsets[0]
    lengths = offsets[1:] - offsets[:-1]
    if int(lengths.min()) == int(lengths.max()) > 0:
        return _hash_one_length(data, n, int(lengths[0]))
    padded = np.zeros(len(data) + 8, np.uint8)  # 8 spare bytes: an unaligned word read never runs off
    padded[:len(data)] = data
    words = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
    h = lengths.astype(np.uint64) * np.uint64(_SEED)
    for w in range(0, int(lengths.max()), 8):
        if int(lengths.min()) > w:  # every id has bytes at w: whole-array ops, no index
            h = _mix(h, words[start + w] & _TAIL_MASKS[np.minimum(lengths - w, 8)])
        else:  # only ids longer than w take another step (as hash_id does)
            live = np.flatnonzero(lengths > w)
            h[live] = _mix(h[live], words[start[live] + w] & _TAIL_MASKS[np.minimum(lengths[live] - w, 8)])
    return _finish(h)


def _hash_one_length(data: np.ndarray, n: int, length: int) -> np.ndarray:
    """The common case (ids of one length): a zero-padded (n, 8k) block read
    as 64-bit words, no gather. Zero padding equals the tail mask."""
    block = np.zeros((n, (length + 7) // 8 * 8), np.uint8)
    block[:, :length] = data.reshape(n, length)
    words = block.view("<u8")
    h = np.full(n, (length * _SEED) & _U64, np.uint64)
    for j in range(words.shape[1]):
        h = _mix(h, words[:, j])
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
    """The committed ids as fixed-width byte rows in the order of the sorted
    hashes: a hash hit at position i is confirmed by comparing the rows of the
    run of equal hashes starting at i. (Ordering rows by hash uses one
    integer argsort; sorting the strings themselves is ~5x slower.)"""

    def __init__(self, chunks: Iterable[pa.Array], sorted_hashes: np.ndarray, longest_bytes: int) -> None:
        count, width = len(sorted_hashes), max(1, longest_bytes)
        rows = np.zeros((count, width), np.uint8)
        unsorted = np.empty(count, np.uint64)
        filled = 0
        for ids in chunks:
            n = len(ids)
            if filled + n > count or (n and longest_utf8_bytes(ids) > width):
                raise ValueError("the output changed since it was scanned (more or longer ids)")
            rows[filled:filled + n] = _fixed_width_rows(ids, width)
            unsorted[filled:filled + n] = hash_ids(ids)
            filled += n
        order = np.argsort(unsorted)
        if filled != count or not np.array_equal(unsorted[order], sorted_hashes):
            raise ValueError("the output changed since it was scanned (other ids)")
        del unsorted
        self._rows = rows[order].view(f"S{width}").reshape(count)

    def matches(self, task_id: str, first: int, hashes: memoryview, h: int) -> bool:
        key = task_id.encode()
        i = first
        while i < len(hashes) and hashes[i] == h:
            if bytes(self._rows[i]) == key:  # NUL-free ids (checked), so stripping the padding is exact
                return True
            i += 1
        return False

    @staticmethod
    def bytes_needed(count: int, longest_bytes: int) -> int:
        return count * (2 * max(1, longest_bytes) + 16)  # rows twice (reorder) + hashes + order while building


def _fixed_width_rows(ids: pa.Array, width: int) -> np.ndarray:
    """A string column as an (n, width) zero-padded byte matrix, from the Arrow
    buffers (no Python object per id)."""
    if ids.type != pa.large_string():
        ids = ids.cast(pa.large_string())
    n = len(ids)
    out = np.zeros((n, width), np.uint8)
    if n == 0:
        return out
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset:ids.offset + n + 1]
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8) if ids.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = offsets[1:] - offsets[:-1]
    length = int(lengths[0])
    if int(lengths.min()) == int(lengths.max()) and length > 0:  # the common case: ids of one length
        out[:, :length] = data[offsets[0]:offsets[-1]].reshape(n, length)
        return out
    data = np.concatenate([data, np.zeros(1, np.uint8)])  # a safe index for positions past an id's end
    for k in range(int(lengths.max())):
        out[:, k] = data[np.where(lengths > k, offsets[:-1] + k, len(data) - 1)]
    return out


def exact_budget_bytes() -> int:
    return int(float(os.environ.get(EXACT_BUDGET_ENV, "512")) * 2**20)


class IdSet:
    """A compact, exact set of committed ids (see the module docstring).

    >>> s = IdSet.from_arrays([pa.array(["a", "b"])])
    >>> "a" in s, "c" in s, len(s)
    (True, False, 2)
    """

    def __init__(self, hashes: np.ndarray, load_ids: Callable[[], Iterable[pa.Array]] | None,
                 longest_bytes: int, has_nul: bool = False) -> None:
        self._hashes = np.ascontiguousarray(hashes, dtype=np.uint64)  # sorted; equal values: two ids, one hash
        self._hash_view = memoryview(self._hashes.data)  # bisect yields plain ints: ~3x faster than searchsorted
        self._load_ids = load_ids  # the id columns again, in any order, for the exact check
        self._longest_bytes = longest_bytes
        self._has_nul = has_nul  # fixed-width rows drop trailing NULs: such ids cannot be compared exactly
        self._exact: ExactIds | None = None
        self._hash_only_warned = False

    @classmethod
    def empty(cls) -> IdSet:
        return cls(np.empty(0, np.uint64), None, 0)

    @classmethod
    def from_arrays(cls, arrays: Sequence[pa.Array]) -> IdSet:
        """An IdSet of in-memory id arrays (tests, small sets)."""
        chunks = [a.cast(pa.string()) for a in arrays]
        hashes = np.concatenate([hash_ids(a) for a in chunks]) if chunks else np.empty(0, np.uint64)
        hashes.sort()
        longest = max((longest_utf8_bytes(a) for a in chunks), default=0)
        return cls(hashes, lambda: iter(chunks), longest, any(contains_nul(a) for a in chunks))

    def __len__(self) -> int:
        return int(len(self._hashes))

    def __contains__(self, task_id: object) -> bool:
        if not isinstance(task_id, str) or len(self._hashes) == 0:
            return False
        h = hash_id(task_id)
        i = bisect.bisect_left(self._hash_view, h)
        if i >= len(self._hash_view) or self._hash_view[i] != h:
            return False
        return self._confirm(task_id, i, h)

    def _confirm(self, task_id: str, i: int, h: int) -> bool:
        if self._exact is None and self._load_ids is not None and not self._has_nul \
                and ExactIds.bytes_needed(len(self), self._longest_bytes) <= exact_budget_bytes():
            load, self._load_ids = self._load_ids, None  # one try only
            try:
                self._exact = ExactIds(load(), self._hashes, self._longest_bytes)
            except (OSError, ValueError, pa.ArrowException) as e:
                log.error("resume: cannot load the committed ids for the exact check (%s); matching by hash", e)
        if self._exact is not None:
            return self._exact.matches(task_id, i, self._hash_view, h)
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
    """Whether any id holds a NUL byte (memchr over the value buffer: no
    per-id work, no temporary array)."""
    chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        if chunk.type not in (pa.string(), pa.large_string()):
            chunk = chunk.cast(pa.large_string())
        width = np.int32 if chunk.type == pa.string() else np.int64
        offsets = np.frombuffer(chunk.buffers()[1], dtype=width)
        first, last = int(offsets[chunk.offset]), int(offsets[chunk.offset + len(chunk)])
        values = chunk.buffers()[2]
        if values is not None and values.slice(first, last - first).to_pybytes().find(b"\x00") >= 0:
            return True
    return False


class GrowingHashSet:
    """Hashes of ids added over time (a sink's committed ids): a sorted base
    array plus a bounded buffer of recent hashes merged in batches.

    Answers "maybe present" by hash; callers confirm hits exactly (they are
    rare: only re-admitted tasks hit)."""

    MERGE_AT = 65_536

    def __init__(self, hashes: np.ndarray | None = None) -> None:
        self._base = np.sort(hashes) if hashes is not None else np.empty(0, np.uint64)
        self._base_view = memoryview(self._base.data)
        self._recent: set[int] = set()

    def add_many(self, ids: Iterable[str]) -> None:
        self._recent.update(hash_id(i) for i in ids)
        if len(self._recent) >= self.MERGE_AT:
            merged = np.concatenate([self._base, np.fromiter(self._recent, np.uint64, len(self._recent))])
            merged.sort()
            self._base, self._base_view, self._recent = merged, memoryview(merged.data), set()

    def maybe_contains(self, task_id: str) -> bool:
        if not self._recent and not len(self._base):
            return False
        h = hash_id(task_id)
        if h in self._recent:
            return True
        i = bisect.bisect_left(self._base_view, h)
        return i < len(self._base_view) and self._base_view[i] == h

    def __len__(self) -> int:
        return int(len(self._base)) + len(self._recent)
