"""What identifies a run's output, for the resume check: the workflow's
resolved config, what names the dataset (path, split, format, id column, or
the hub dataset's name, config, split and revision) and the samples drawn per
input row (which may grow: a resume with more samples adds the missing ones).

The store compares these by value; a key that a newer release added is
compatible when it holds its default, so the defaults travel alongside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from matrix_hpc.runtime.conf import RunConf
from matrix_hpc.runtime.workflow import WorkflowConf
from matrix_hpc.store.input import DatasetConf, HFDatasetConf

#: Dataset settings that decide which rows and ids an output holds. ``limit``
#: and ``required_columns`` are left out: growing a run from its first N rows
#: to all of them is a resume, not a different dataset.
DATASET_IDENTITY_KEYS = ("path", "split", "format", "id_column")
#: What names a hub dataset; ``streaming`` (how it is read) is left out.
HF_IDENTITY_KEYS = ("name", "config", "split", "revision")
#: Identity keys that a resume may raise (pass to ``check_and_record_config(growable=...)``).
GROWABLE_IDENTITY_KEYS = ("run.samples_per_input",)


def resume_identity(workflow: WorkflowConf, dataset: DatasetConf,
                    run: RunConf | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(identity, defaults)`` for :func:`matrix_hpc.store.resume.check_and_record_config`.

    >>> from matrix_hpc.workflows.overhead import OverheadConf
    >>> ident, defaults = resume_identity(OverheadConf(agree_prob=0.9), DatasetConf(path="in.jsonl"))
    >>> ident["workflow"]["agree_prob"], defaults["workflow"]["agree_prob"]
    (0.9, 0.45)
    """
    identity = {"workflow": _plain(workflow), "dataset": _dataset_identity(dataset)}
    defaults = {"workflow": _plain(type(workflow)), "dataset": _dataset_identity(DatasetConf(), absolute=False),
                "run": {"samples_per_input": RunConf().samples_per_input}}
    if run is not None:
        identity["run"] = {"samples_per_input": run.samples_per_input}
    return identity, defaults


def _plain(conf: Any) -> dict[str, Any]:
    """Resolved plain values of a Conf dataclass (an instance, or a class for its defaults)."""
    node = OmegaConf.structured(conf)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True, throw_on_missing=False)  # type: ignore[return-value]


def _dataset_identity(dataset: DatasetConf, absolute: bool = True) -> dict[str, Any]:
    values: dict[str, Any] = {key: getattr(dataset, key) for key in DATASET_IDENTITY_KEYS}
    if absolute and values["path"] not in (None, "", "???"):
        # The same file named from another working directory is the same dataset.
        values["path"] = str(Path(values["path"]).expanduser().absolute())
    hf = dataset.hf if isinstance(dataset.hf, HFDatasetConf) else HFDatasetConf()
    values["hf"] = {key: getattr(hf, key) for key in HF_IDENTITY_KEYS}
    return values
