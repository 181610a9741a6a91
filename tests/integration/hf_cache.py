"""A local Hugging Face cache holding datasets "downloaded" by hub name, made
with the real ``datasets`` (the hub is unreachable in tests).

How (datasets 5.2): an online ``load_dataset("org/name", "cfg")`` prepares the
dataset under ``$HF_HOME/datasets/org___name/cfg/<version>/<hash>/``
(dataset_info.json + ``name-<split>.arrow``); offline, ``load_dataset``
finds it there by name (``CachedDatasetModuleFactory``). Here ``datasets``'
own Parquet builder prepares local Parquet files under
``$HF_HOME/datasets/name/cfg/0.0.0/<hash>/`` (its layout for a dataset
without a namespace), and the directory is renamed to ``org___name``: the
same files, where the hub download would have put them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.integration.runs import REPO


def put_in_hf_cache(hf_home: Path, repo_id: str, config: str, splits: dict[str, pa.Table]) -> Path:
    """Prepare ``splits`` in ``hf_home``'s datasets cache as an online
    ``load_dataset(repo_id, config)`` would have; returns the config's directory."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, name = repo_id.split("/")
    src = hf_home.parent / f"src-{name}"
    src.mkdir(parents=True)
    files = {}
    for split, table in splits.items():
        pq.write_table(table, src / f"{split}.parquet", row_group_size=1000)
        files[split] = str(src / f"{split}.parquet")
    cache = hf_home / "datasets"
    builder = Parquet(cache_dir=str(cache), dataset_name=name, config_name=config, config_id=config,
                      data_files=files, hash="0123456789abcdef", writer_batch_size=1000)
    builder.download_and_prepare()
    (cache / name).rename(cache / f"{namespace}___{name}")
    return cache / f"{namespace}___{name}" / config


def offline_env(hf_home: Path) -> dict[str, str]:
    """The environment of a run that reads ``hf_home``'s cache with the hub off."""
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
