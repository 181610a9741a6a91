"""Read a local Hugging Face dataset directory (``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``) and export it to Parquet for ``dataset.path``.

Uses ``datasets.load_from_disk`` when ``datasets`` is installed; otherwise it
reads the directory's Arrow stream files with pyarrow (the on-disk format
``save_to_disk`` writes), so no extra dependency is needed.

    python -m matrix_hpc.store.hf_input /data/mmlu_pro --split test --out mmlu_pro_test.parquet
    matrix-hpc run workflow=coral dataset.path=mmlu_pro_test.parquet dataset.id_column=question_id ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def load_hf_dataset_dir(path: Path, split: str | None = None) -> pa.Table:
    """The rows of a saved dataset (one split of a DatasetDict) as an Arrow table."""
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
    try:
        import datasets  # optional: the reference reader when present
    except ImportError:
        return _read_arrow_files(path)
    table: pa.Table = datasets.load_from_disk(str(path)).with_format("arrow")[:]
    return table


def _read_arrow_files(path: Path) -> pa.Table:
    state = json.loads((path / "state.json").read_text())
    files = [path / f["filename"] for f in state.get("_data_files", [])] or sorted(path.glob("*.arrow"))
    tables = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    if not tables:
        raise ValueError(f"{path} holds no .arrow data files")
    return pa.concat_tables(tables)


def export_to_parquet(src: Path, out: Path, split: str | None = None) -> int:
    """Write the dataset as one Parquet file; returns the row count."""
    import pyarrow.parquet as pq

    table = load_hf_dataset_dir(src, split)
    pq.write_table(table, out)
    return int(table.num_rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a saved Hugging Face dataset directory to Parquet")
    parser.add_argument("src", type=Path)
    parser.add_argument("--split", default=None, help="the split of a DatasetDict (e.g. test)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(f"{export_to_parquet(args.src, args.out, args.split)} rows -> {args.out}")


if __name__ == "__main__":
    main()
