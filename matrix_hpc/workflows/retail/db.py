"""The retail database: a shared read-only snapshot plus cheap copy-on-write views.

tau2-bench keeps one deep copy of the whole database per environment. At
thousands of concurrent tasks that is gigabytes (the retail DB is ~15 MB of
Python objects), so here every environment shares one immutable
:class:`RetailSnapshot` and copies a user or order record only when a tool
first writes to it (:class:`RetailDB`). Products are never written.

The DB hash follows tau2's recipe: SHA-256 of ``json.dumps(db, sort_keys=True,
default=str)`` over the normalised DB (every order carries all optional fields
of tau2's ``Order`` model, ``None`` when unset, as pydantic's ``model_dump``
would write them). Serialised records of the snapshot are cached, so hashing
a view re-serialises only the records it changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# Any: the DB is parsed JSON (nested dicts/lists of str/float/bool/None).
Record = dict[str, Any]

TABLES = ("orders", "products", "users")  # sorted: the order json.dumps(sort_keys) uses
WRITABLE_TABLES = frozenset({"orders", "users"})

# Optional fields of tau2's Order model, present as None until a tool sets them.
ORDER_OPTIONAL_FIELDS = (
    "cancel_reason",
    "exchange_items",
    "exchange_new_items",
    "exchange_payment_method_id",
    "exchange_price_difference",
    "return_items",
    "return_payment_method_id",
)

DATA_DIR_ENV = "MATRIX_HPC_TAU2_RETAIL_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[3]
_PACKAGED_DATA = Path(__file__).resolve().parent / "data" / "tau2_retail"


def default_data_dir() -> Path:
    """Where db.json / tasks.json / policy.md live.

    ``$MATRIX_HPC_TAU2_RETAIL_DIR`` wins; otherwise the shared data folder next
    to the repository (``../shared/data/tau2_retail``), then one inside it, then
    the copy shipped with the package (tau2-bench's retail domain, MIT, its
    LICENSE alongside), so a clone or an install anywhere has it.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    for candidate in (
        _REPO_ROOT.parent / "shared" / "data" / "tau2_retail",
        _REPO_ROOT / "shared" / "data" / "tau2_retail",
    ):
        if (candidate / "db.json").exists():
            return candidate
    return _PACKAGED_DATA


def normalise_db(db: Mapping[str, Any]) -> dict[str, dict[str, Record]]:
    """A deep copy of ``db`` in the normalised shape the hash is taken over."""
    missing = [t for t in TABLES if t not in db]
    if missing:
        raise ValueError(
            f"retail DB lacks table(s) {missing}; expected top-level keys {list(TABLES)} "
            "(tau2-bench's retail db.json)"
        )
    out: dict[str, dict[str, Record]] = {t: copy.deepcopy(dict(db[t])) for t in TABLES}
    for order in out["orders"].values():
        for field in ORDER_OPTIONAL_FIELDS:
            order.setdefault(field, None)
    return out


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class RetailSnapshot:
    """An immutable, normalised retail DB shared by many :class:`RetailDB` views.

    Example::

        snap = RetailSnapshot.from_file(default_data_dir() / "db.json")
        db = RetailDB(snap)        # microseconds, not a 15 MB deep copy
    """

    def __init__(self, db: Mapping[str, Any]) -> None:
        self.tables = normalise_db(db)
        self.sorted_keys = {t: sorted(self.tables[t]) for t in TABLES}
        self._json: dict[tuple[str, str], str] = {}
        self._pristine_hash: str | None = None  # hash of the unwritten DB, set by RetailDB.hash

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> RetailSnapshot:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"retail DB {path} not found; point --db / data_dir at tau2-bench's "
                f"retail db.json (or set ${DATA_DIR_ENV})"
            )
        with path.open() as f:
            return cls(json.load(f))

    def record_json(self, table: str, key: str) -> str:
        """The canonical serialisation of one snapshot record (cached)."""
        cached = self._json.get((table, key))
        if cached is None:
            cached = _dumps(self.tables[table][key])
            self._json[(table, key)] = cached
        return cached


class RetailDB:
    """One environment's private view of a snapshot (copy-on-write per record).

    Reads return the shared record: callers must treat them as read-only and
    call :meth:`for_write` before changing anything.
    """

    def __init__(self, snapshot: RetailSnapshot) -> None:
        self.snapshot = snapshot
        self._own: dict[str, dict[str, Record]] = {t: {} for t in TABLES}

    def get(self, table: str, key: str) -> Record | None:
        own = self._own[table].get(key)
        if own is not None:
            return own
        return self.snapshot.tables[table].get(key)

    def for_write(self, table: str, key: str) -> Record:
        """The record, copied into this view on first write."""
        if table not in WRITABLE_TABLES:
            raise ValueError(f"table {table!r} is read-only; writable: {sorted(WRITABLE_TABLES)}")
        own = self._own[table].get(key)
        if own is None:
            own = copy.deepcopy(self.snapshot.tables[table][key])
            self._own[table][key] = own
        return own

    def items(self, table: str) -> Iterator[tuple[str, Record]]:
        own = self._own[table]
        for key, record in self.snapshot.tables[table].items():
            yield key, own.get(key, record)

    def written_keys(self) -> dict[str, list[str]]:
        """Records this view has copied for writing (a cheap change summary)."""
        return {t: sorted(keys) for t, keys in self._own.items() if keys}

    def to_dict(self) -> dict[str, dict[str, Record]]:
        """A deep copy of the full DB as this view sees it."""
        return {t: {k: copy.deepcopy(r) for k, r in self.items(t)} for t in TABLES}

    def hash(self) -> str:
        """SHA-256 of the canonical JSON of the whole DB (tau2's DB hash recipe)."""
        if not any(self._own.values()):  # nothing written: the snapshot's own hash (computed once)
            if self.snapshot._pristine_hash is None:
                self.snapshot._pristine_hash = self._compute_hash()
            return self.snapshot._pristine_hash
        return self._compute_hash()

    def _compute_hash(self) -> str:
        h = hashlib.sha256()
        h.update(b"{")
        for i, table in enumerate(TABLES):
            h.update(f'{", " if i else ""}{json.dumps(table)}: {{'.encode())
            own = self._own[table]
            for j, key in enumerate(self.snapshot.sorted_keys[table]):
                record = own.get(key)
                body = _dumps(record) if record is not None else self.snapshot.record_json(table, key)
                h.update(f'{", " if j else ""}{json.dumps(key)}: {body}'.encode())
            h.update(b"}")
        h.update(b"}")
        return h.hexdigest()


def db_hash(db: Mapping[str, Any]) -> str:
    """Hash of a plain DB dict, equal to :meth:`RetailDB.hash` of the same content."""
    return hashlib.sha256(_dumps(normalise_db(db)).encode()).hexdigest()
