"""Where each domain's data lives, how its files load, and tau2's DB hash.

Data folder of a domain, first match wins:

1. ``$MATRIX_HPC_TAU2_<DOMAIN>_DIR`` (e.g. ``MATRIX_HPC_TAU2_TELECOM_DIR``);
2. ``$MATRIX_HPC_TAU2_DATA_DIR/tau2_<domain>``;
3. ``../shared/data/tau2_<domain>`` beside the repository (then ``shared/``
   inside it).

Each folder holds tau2-bench's unmodified domain files (``db.json`` or
``db.toml``, ``tasks.json``, ``split_tasks.json``, the policy files).

Example::

    db = load_db_file(data_dir("retail") / "db.json", RetailDB)
    db_hash(db)   # tau2's get_db_hash(): sha256 of the sorted JSON dump
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

DOMAINS = ("retail", "airline", "telecom")
DATA_DIR_ENV = "MATRIX_HPC_TAU2_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[3]

M = TypeVar("M", bound=BaseModel)


def domain_dir_env(domain: str) -> str:
    """The environment variable that points at one domain's data folder."""
    return f"MATRIX_HPC_TAU2_{domain.upper()}_DIR"


def data_dir(domain: str) -> Path:
    """The data folder of ``domain``; raises naming every place looked at when none exists."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown tau2 domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    candidates: list[Path] = []
    own = os.environ.get(domain_dir_env(domain))
    if own:
        candidates.append(Path(own))
    shared = os.environ.get(DATA_DIR_ENV)
    if shared:
        candidates.append(Path(shared) / f"tau2_{domain}")
    candidates += [
        _REPO_ROOT.parent / "shared" / "data" / f"tau2_{domain}",
        _REPO_ROOT / "shared" / "data" / f"tau2_{domain}",
    ]
    for candidate in candidates:
        if (candidate / "tasks.json").is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no tau2 {domain} data (tasks.json) in any of: {looked}; "
        f"set {domain_dir_env(domain)} or {DATA_DIR_ENV} to the folder with tau2-bench's domain files"
    )


def read_data_file(path: Path) -> Any:
    """A JSON or TOML data file, parsed."""
    if path.suffix == ".json":
        with path.open(encoding="utf-8") as fp:
            return json.load(fp)
    if path.suffix == ".toml":
        with path.open("rb") as fp:
            return tomllib.load(fp)
    raise ValueError(f"{path}: unsupported data file type (expected .json or .toml)")


def load_db_file(path: Path, model: type[M]) -> M:
    """A domain DB validated into its model, as tau2's ``DB.load`` does."""
    try:
        return model.model_validate(read_data_file(path))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"tau2 DB file missing: {path}") from exc


def dict_hash(data: Any) -> str:
    """tau2's hash of a plain structure: sha256 of ``json.dumps(sort_keys=True, default=str)``.

    ``default=str`` is what writes dates as ``2025-02-25`` and datetimes as
    ``2025-01-20 14:30:00`` inside the hash.
    """
    encoded = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


def db_hash(db: BaseModel) -> str:
    """tau2's ``get_db_hash()`` of a DB model (python-mode dump, then :func:`dict_hash`)."""
    return dict_hash(db.model_dump(warnings=False))


def _encode(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class CopyOnAccessDict(dict):  # type: ignore[type-arg]
    """A table of a fresh DB that shares its records with the template until one is looked up.

    Looking a record up by key (``table[key]``, ``get``, ``pop``) hands out a
    private deep copy, made once; iteration hands out whatever is stored, the
    template's own record while it was never looked up. tau2's tools reach
    every record they change by key and only read what they iterate over, so
    a task never writes into the template; a test checks it stays unchanged.
    """

    def __init__(self, shared: dict[Any, BaseModel]) -> None:
        super().__init__(shared)
        self._own: set[Any] = set()  # keys whose record is this table's own copy (or was replaced)
        self.removed = False  # whether a key was ever removed

    @property
    def untouched(self) -> bool:
        """Whether every record is still the template's and none was removed."""
        return not self._own and not self.removed

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        if key not in self._own:
            value = value.model_copy(deep=True)
            super().__setitem__(key, value)
            self._own.add(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._own.add(key)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            value = self[key]
            super().pop(key)
            self.removed = True
            return value
        return super().pop(key, *default)

    # dict's C methods bypass __getitem__/__setitem__: route them through the tracked paths
    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self.removed = True

    def popitem(self) -> tuple[Any, Any]:
        if not self:
            raise KeyError("popitem(): dictionary is empty")
        key = next(reversed(self))
        return key, self.pop(key)

    def clear(self) -> None:
        super().clear()
        self.removed = True

    def copy(self) -> dict[Any, Any]:
        return {key: self[key] for key in self}


class DBTemplate:
    """A validated DB loaded once per process, from which fresh per-task DBs are made cheaply.

    Every top-level field must be a dict of records (retail, airline). The
    hash of a fresh DB re-encodes only the records a task looked up; the
    template's records are encoded once. The result is byte-for-byte the
    string tau2 hashes, so the hash is tau2's.
    """

    def __init__(self, db: BaseModel) -> None:
        self.db = db
        self._tables = list(type(db).model_fields)
        self._encoded: dict[int, str] = {}  # id(template record) -> its JSON, filled lazily
        self._untouched_tables: dict[str, str] = {}  # table name -> its JSON while no task touched it

    def fresh(self) -> BaseModel:
        tables: dict[str, Any] = {name: CopyOnAccessDict(getattr(self.db, name)) for name in self._tables}
        return type(self.db).model_construct(None, **tables)

    def hash(self, db: BaseModel) -> str:
        """tau2's hash of ``db``, a DB made by :meth:`fresh` (or the template itself)."""
        parts = []
        for name in sorted(self._tables):
            parts.append(f"{json.dumps(name)}: {self._table_json(name, getattr(db, name))}")
        return hashlib.sha256(("{" + ", ".join(parts) + "}").encode()).hexdigest()

    def _table_json(self, name: str, table: dict[Any, BaseModel]) -> str:
        shared = getattr(self.db, name)
        untouched = isinstance(table, CopyOnAccessDict) and table.untouched
        if untouched and name in self._untouched_tables:
            return self._untouched_tables[name]
        entries = []
        for key in sorted(table):
            record: BaseModel = dict.__getitem__(table, key)
            if dict.get(shared, key) is record:
                encoded = self._encoded.get(id(record))
                if encoded is None:
                    encoded = self._encoded[id(record)] = _encode(record.model_dump(warnings=False))
            else:
                encoded = _encode(record.model_dump(warnings=False))
            entries.append(f"{json.dumps(key)}: {encoded}")
        text = "{" + ", ".join(entries) + "}"
        if untouched:
            self._untouched_tables[name] = text
        return text
