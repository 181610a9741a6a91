"""Hydra's own record of a job (``.hydra/config.yaml``, ``hydra.yaml``,
``overrides.yaml``, a sweep's ``multirun.yaml``) with secrets as ``***``.

``conf/config.yaml`` turns Hydra's writer off (``hydra.output_subdir: null``)
and registers :class:`RedactSecrets` instead, which writes the same three
files, redacted (see ``matrix_hpc.config.secrets``), before the job runs.
Hydra's sweeper writes ``multirun.yaml`` itself: the callback creates it
first with mode 0600 (the sweeper's write keeps that mode), and redacts it
when a job starts and when the sweep ends. A new sweep dir is made 0700:
the submitit launcher pickles every job's config (secrets included) in it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from matrix_hpc.config.secrets import (
    ENV_KEYS,
    REDACTED,
    is_secret_key,
    redact,
    redact_text,
    redacted_yaml,
    secret_values,
)

#: Where the files go, under the job's output dir (Hydra's default name, which `matrix-hpc sweep` reads).
HYDRA_SUBDIR = ".hydra"


def redact_override(override: str) -> str:
    """``llm.openai.token=abc`` -> ``llm.openai.token=***``; other overrides unchanged."""
    key, sep, value = override.partition("=")
    words = key.lstrip("+~").split(".")
    if sep and value and any(is_secret_key(w) or w in ENV_KEYS for w in words):
        return f"{key}={REDACTED}"
    return override


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a 0600 temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _task_config(config: DictConfig) -> DictConfig:
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def _secrets_of(config: DictConfig) -> set[str]:
    task = OmegaConf.to_container(_task_config(config), resolve=True, enum_to_str=True)
    found = set(secret_values(task))
    for override in config.hydra.overrides.task:
        if redact_override(override) != override:
            found.add(str(override).partition("=")[2])
    return found


class RedactSecrets(Callback):
    """Hydra callback: the job's ``.hydra/`` files, written with secrets as ``***``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_file = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        # 0700 when new: the submitit launcher pickles each job's whole config under it (.submitit/).
        sweep_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(sweep_file, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._redact_sweep_file(config, _secrets_of(config))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        secrets = _secrets_of(config)
        out = Path(str(config.hydra.runtime.output_dir)) / HYDRA_SUBDIR
        _write_private(out / "config.yaml", redacted_yaml(_task_config(config)))
        hydra_only = OmegaConf.create({"hydra": OmegaConf.to_container(config.hydra, resolve=False)})
        _write_private(out / "hydra.yaml", redact_text(OmegaConf.to_yaml(hydra_only), secrets))
        overrides = [redact_override(str(o)) for o in config.hydra.overrides.task]
        _write_private(out / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
        if config.hydra.mode == RunMode.MULTIRUN:
            self._redact_sweep_file(config, secrets)

    @staticmethod
    def _redact_sweep_file(config: DictConfig, secrets: set[str]) -> None:
        sweep_file = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if not sweep_file.is_file() or sweep_file.is_symlink() or sweep_file.stat().st_size == 0:
            return
        data = OmegaConf.to_container(OmegaConf.load(sweep_file), resolve=False)
        assert isinstance(data, dict)
        hydra = data.pop("hydra", {})
        text = OmegaConf.to_yaml(OmegaConf.create({**redact(data), "hydra": hydra}))
        _write_private(sweep_file, redact_text(text, secrets))
