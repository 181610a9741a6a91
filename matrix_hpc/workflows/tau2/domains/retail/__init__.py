"""tau2-bench's retail domain: the DB schema, the agent's 15 tools, and its environment."""

from __future__ import annotations

from pathlib import Path

from matrix_hpc.workflows.tau2.db import DBTemplate, load_db_file
from matrix_hpc.workflows.tau2.domains.retail.models import RetailDB
from matrix_hpc.workflows.tau2.domains.retail.tools import RetailTools
from matrix_hpc.workflows.tau2.environment import Tau2Environment


def load_base(folder: Path) -> DBTemplate:
    """The domain's starting DB, validated once per process."""
    return DBTemplate(load_db_file(folder / "db.json", RetailDB))


def new_environment(base: DBTemplate) -> Tau2Environment:
    """A fresh environment at the starting DB (tau2's ``get_environment()``)."""
    return Tau2Environment("retail", RetailTools(base.fresh()), hash_db=base.hash)  # type: ignore[arg-type]
