"""tau2-bench's airline domain: the DB schema, the agent's 14 tools, and its environment."""

from __future__ import annotations

from pathlib import Path

from matrix_hpc.workflows.tau2.db import DBTemplate, load_db_file
from matrix_hpc.workflows.tau2.domains.airline.models import FlightDB
from matrix_hpc.workflows.tau2.domains.airline.tools import AirlineTools
from matrix_hpc.workflows.tau2.environment import Tau2Environment


def load_base(folder: Path) -> DBTemplate:
    """The domain's starting DB, validated once per process."""
    return DBTemplate(load_db_file(folder / "db.json", FlightDB))


def new_environment(base: DBTemplate) -> Tau2Environment:
    """A fresh environment at the starting DB (tau2's ``get_environment()``)."""
    return Tau2Environment("airline", AirlineTools(base.fresh()), hash_db=base.hash)  # type: ignore[arg-type]
