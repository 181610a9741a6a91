"""Hugging Face datasets as input, through the ``datasets`` library (imported
only when a run reads one):

- by hub name (``dataset.hf.name=TIGER-Lab/MMLU-Pro dataset.hf.split=test``),
  downloaded and prepared in the Hugging Face cache like any
  ``load_dataset`` call, or streamed (``dataset.hf.streaming=true``); when the
  hub is unreachable or offline mode is on (``HF_HUB_OFFLINE=1``), ``datasets``
  reads the copy in the local cache, and :func:`check_hf_dataset` refuses a
  dataset that is not there, naming the cache;
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (``dataset.path=/data/mmlu_pro dataset.split=test``), which can also be
  exported to Parquet::

    python -m matrix_hpc.store.hf_input /data/mmlu_pro --split test --out mmlu_pro_test.parquet

Both are read in Arrow batches (:func:`iter_hf_batches`); rows become input
items in :mod:`matrix_hpc.store.input`, like rows of files.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from matrix_hpc.store.input import HFDatasetConf, InputPathError

log = logging.getLogger(__name__)

BATCH_ROWS = 1024  # rows per Arrow batch read (a streamed read holds about one batch)
HUB_PROBE_TIMEOUT_S = 5.0  # one request tells whether the hub answers at all
_hub_probed = False
_hub_unreachable = ""  # why the probe put this process offline ("" when it did not)


def _datasets(by_name: bool = False) -> Any:  # Any: the datasets module (heavy: imported only when needed)
    import datasets

    datasets.disable_progress_bars()  # the run logs its own lines; bars garble the log
    datasets.logging.set_verbosity_error()  # "using the cached version" would repeat on every read
    if by_name:
        _use_the_cache_if_the_hub_is_unreachable(datasets)
    return datasets


def _use_the_cache_if_the_hub_is_unreachable(datasets: Any) -> None:
    """Offline mode for this process when the hub does not answer. ``datasets``
    falls back to the cache by itself, but only after huggingface_hub's retries
    (measured: 70 s for a check and a read with no route to the hub), and again
    on every read of the input; one probe through huggingface_hub's own
    session (proxies honoured) decides once."""
    global _hub_probed, _hub_unreachable
    if _hub_probed or datasets.config.HF_HUB_OFFLINE:
        return
    _hub_probed = True
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)  # any HTTP answer: reachable
    except Exception as e:  # connection refused, no DNS, timeout: the library's transport errors
        _hub_unreachable = f"the hub at {constants.ENDPOINT} does not answer ({(str(e) or type(e).__name__)[:200]})"
        log.warning("%s; reading datasets from the local cache only, as with HF_HUB_OFFLINE=1", _hub_unreachable)
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True  # both libraries read these per call


# -- save_to_disk directories ---------------------------------------------------
def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def load_hf_dataset(path: Path, split: str | None = None) -> Any:  # Any: datasets.Dataset
    """One split of a saved dataset (memory-mapped, not read into memory)."""
    path = Path(path)
    if not is_hf_dataset_dir(path):
        raise ValueError(f"{path} is not a Hugging Face dataset directory (no state.json or dataset_dict.json); "
                         "it must be written by Dataset.save_to_disk or DatasetDict.save_to_disk")
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split is None:
            if len(splits) != 1:
                raise ValueError(f"{path} holds the splits {splits}; choose one with split=...")
            split = splits[0]
        if split not in splits:
            raise ValueError(f"split {split!r} not in {path} (splits: {splits})")
        path = path / split
    return _datasets().load_from_disk(str(path))


def load_hf_dataset_dir(path: Path, split: str | None = None) -> Any:  # Any: pyarrow.Table
    """The rows of a saved dataset (one split of a DatasetDict) as an Arrow table."""
    return load_hf_dataset(path, split).with_format("arrow")[:]


def iter_hf_batches(dataset: Any, rows: int = BATCH_ROWS) -> Iterator[Any]:
    """Arrow tables of ``rows`` rows from a ``Dataset`` or ``IterableDataset``."""
    yield from dataset.with_format("arrow").iter(batch_size=rows)


# -- datasets by hub name -------------------------------------------------------
def hf_source(hf: HFDatasetConf) -> str:
    """How rows of ``hf`` are named in messages: ``hf:name/config[split]@revision``."""
    config = f"/{hf.config}" if hf.config else ""
    revision = f"@{hf.revision}" if hf.revision else ""
    return f"hf:{hf.name}{config}[{hf.split}]{revision}"


def load_hf_split(hf: HFDatasetConf) -> Any:  # Any: datasets.Dataset or IterableDataset
    """The split, prepared in the cache (downloaded once) or streamed."""
    return _datasets(by_name=True).load_dataset(hf.name, hf.config, split=hf.split, revision=hf.revision,
                                                streaming=hf.streaming)


def check_hf_dataset(hf: HFDatasetConf) -> None:
    """Raise :class:`InputPathError` (one line, what to do next) when the
    dataset, its config or its split cannot be found; cheap (reads the
    dataset's metadata, not its rows), so a run calls it before Ray starts."""
    if hf.streaming and "[" in hf.split:
        raise InputPathError(f"dataset.hf.split={hf.split!r}: a streamed split cannot be sliced; take the first N "
                             "rows with dataset.limit=N, or set dataset.hf.streaming=false")
    builder = _builder(hf)
    splits = builder.info.splits
    base_split = hf.split.split("[", 1)[0]  # "test[:100]" slices the split "test"
    if splits and base_split not in splits:
        raise InputPathError(f"dataset.hf.split={hf.split!r} is not a split of {hf.name}"
                             f"{f' ({hf.config})' if hf.config else ''}; its splits: {', '.join(splits)}")
    if type(builder).__module__.startswith("datasets.packaged_modules.cache"):
        log.info("dataset %s: the hub is not reachable (or offline mode is on); reading the copy cached at %s%s",
                 hf_source(hf), builder.cache_dir,
                 f" (its revision is not checked against {hf.revision!r})" if hf.revision else "")


def count_hf_rows(hf: HFDatasetConf) -> int:
    """The split's size as the dataset's metadata records it."""
    info = _builder(hf).info.splits
    if "[" in hf.split or not info or hf.split not in info or info[hf.split].num_examples is None:
        raise ValueError(f"{hf_source(hf)}: no row count recorded for it (a sliced split, or no metadata)")
    return int(info[hf.split].num_examples)


def _builder(hf: HFDatasetConf) -> Any:  # Any: a datasets.DatasetBuilder
    datasets = _datasets(by_name=True)
    try:
        return datasets.load_dataset_builder(hf.name, hf.config, revision=hf.revision)
    except Exception as e:  # the library's many error types all end as one line for the user
        raise InputPathError(_load_error(hf, e, datasets)) from None


def _load_error(hf: HFDatasetConf, error: BaseException, datasets: Any) -> str:
    what = f"dataset.hf.name={hf.name!r}" + (f" dataset.hf.config={hf.config!r}" if hf.config else "")
    reason = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())[:500]
    if not isinstance(error, ConnectionError):
        return f"{what}: cannot be loaded ({type(error).__name__}: {reason})"
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    namespace, _, name = str(hf.name).rpartition("/")
    cached_dir = cache / "___".join([*([namespace] if namespace else []), datasets.naming.camelcase_to_snakecase(name)])
    why = _hub_unreachable or ("offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
                               if datasets.config.HF_HUB_OFFLINE else f"the hub cannot be reached ({reason})")
    load_args = ", ".join(repr(a) for a in (hf.name, hf.config) if a) + f", split={hf.split!r}"
    return (f"{what}: not in the Hugging Face datasets cache at {cache} (no {cached_dir}) and {why}. "
            f"Load it once where the hub is reachable, with the same HF_HOME: python -c \"import datasets; "
            f"datasets.load_dataset({load_args})\"; or point dataset.path at local files")


# -- export ---------------------------------------------------------------------
def export_to_parquet(src: Path, out: Path, split: str | None = None) -> int:
    """Write the dataset as one Parquet file, batch by batch; returns the row count."""
    import pyarrow.parquet as pq

    dataset = load_hf_dataset(src, split)
    rows = 0
    with pq.ParquetWriter(out, dataset.with_format("arrow")[:0].schema) as writer:
        for batch in iter_hf_batches(dataset):
            writer.write_table(batch)
            rows += batch.num_rows
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a saved Hugging Face dataset directory to Parquet")
    parser.add_argument("src", type=Path)
    parser.add_argument("--split", default=None, help="the split of a DatasetDict (e.g. test)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(f"{export_to_parquet(args.src, args.out, args.split)} rows -> {args.out}")


if __name__ == "__main__":
    main()
