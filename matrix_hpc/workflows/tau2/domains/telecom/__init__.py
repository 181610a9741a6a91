"""tau2-bench's telecom domain: carrier DB and agent tools, the user's phone and its tools, the sync."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matrix_hpc.workflows.tau2.db import read_data_file
from matrix_hpc.workflows.tau2.domains.telecom.environment import new_environment as _build
from matrix_hpc.workflows.tau2.domains.telecom.models import TelecomDB
from matrix_hpc.workflows.tau2.domains.telecom.user_models import TelecomUserDB
from matrix_hpc.workflows.tau2.environment import Tau2Environment


@dataclass(frozen=True)
class TelecomBase:
    db: dict[str, Any]  # db.toml, parsed (validated afresh per environment: it is small)
    user_db: dict[str, Any]  # user_db.toml, parsed


def load_base(folder: Path) -> TelecomBase:
    """The domain's starting DBs, read once per process."""
    base = TelecomBase(read_data_file(folder / "db.toml"), read_data_file(folder / "user_db.toml"))
    TelecomDB.model_validate(base.db)  # fail at load time, naming the file's problem
    TelecomUserDB.model_validate(base.user_db)
    return base


def new_environment(base: TelecomBase) -> Tau2Environment:
    """A fresh environment at the starting DBs (tau2's ``get_environment()``)."""
    return _build(TelecomDB.model_validate(base.db), TelecomUserDB.model_validate(base.user_db))
