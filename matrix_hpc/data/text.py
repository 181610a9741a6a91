"""Text as curation sees it: the chosen columns of a row, normalised, as word n-grams.

Normalisation (both curations): Unicode NFKC, lower case, every character
that is neither a letter, a digit nor ``_`` becomes a space, runs of spaces
collapse. ``"Hello,  World!"`` and ``"hello world"`` are the same text.

A column is named as it is in the output (``result``, ``input``, a
workflow's own column) or, for a column holding JSON text, with a path into
it: ``result.answer``, ``input.question``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

_NOT_WORD = re.compile(r"[^\w]+")


def normalise(text: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split())


def words(text: str) -> list[str]:
    return normalise(text).split()


def ngrams(tokens: Sequence[str], n: int) -> list[str]:
    """Word n-grams; a text shorter than ``n`` words has none."""
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def hash64(text: str) -> int:
    """A stable 64-bit hash (the same in every process, unlike ``hash``): xxHash's XXH3."""
    return int(xxhash.xxh3_64_intdigest(text.encode()))


def ngram_hashes(text: str, n: int) -> tuple[np.ndarray, list[str]]:
    """The 64-bit hashes of ``text``'s word n-grams, and the n-grams."""
    grams = ngrams(words(text), n)
    return np.fromiter((hash64(g) for g in grams), np.uint64, len(grams)), grams


def source_columns(specs: Sequence[str]) -> list[str]:
    """The output columns that ``specs`` read (``result.answer`` reads ``result``)."""
    return sorted({s.split(".", 1)[0] for s in specs})


def column_texts(batch: pa.RecordBatch | pa.Table, specs: Sequence[str]) -> list[str | None]:
    """Per row, the chosen columns' text joined by newlines (None when all are null or absent)."""
    parts = [_spec_values(batch, spec) for spec in specs]
    out: list[str | None] = []
    for values in zip(*parts, strict=True) if parts else []:
        present = [v for v in values if v]
        out.append("\n".join(present) if present else None)
    return out


def _spec_values(batch: pa.RecordBatch | pa.Table, spec: str) -> list[str | None]:
    column, _, path = spec.partition(".")
    values = batch.column(column).to_pylist()
    if not path:
        return [_as_text(v) for v in values]
    return [_as_text(_lookup(v, path.split("."))) for v in values]


def _lookup(value: Any, path: list[str]) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    for key in path:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return " ".join(strings_in(value))


def strings_in(value: Any) -> Iterable[str]:
    """Every string inside a JSON-like value (dict values, list items), in order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from strings_in(v)
    elif value is not None and not isinstance(value, bool):
        yield str(value)
