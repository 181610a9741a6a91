"""``matrix-hpc curate dedup``: drop exact and near duplicates, keeping one row per cluster.

Three stages (``plan``: each resumable, the output directory only read):

1. **sign** (Ray Data, per unit, on every node): per row, the chosen
   columns' text is normalised (``text.normalise``); its exact key is a
   64-bit hash of that text; its MinHash (``datasketch.MinHash``, word
   ``ngram``-shingles, ``num_perm`` permutations) is cut into the ``b``
   bands of ``r`` rows that ``datasketch.MinHashLSH`` picks for
   ``threshold``, and each band is hashed to 64 bits. The unit's file keeps
   ids, keys, band hashes and the signature.
2. **group** (the driver): rows sharing the exact key, or a band hash
   whose signatures agree on at least ``threshold`` of their values (the
   MinHash estimate of Jaccard similarity), are joined; connected components
   (scipy) are the clusters. Each cluster keeps **the row with the smallest
   id** (then the first in file order): a rule independent of scheduling, so
   reruns keep the same rows. Memory: about 8 x (b + 3) bytes a row plus the
   ids (~110 MB a million rows at the defaults) and the signatures of
   candidate rows only; past a few tens of millions of rows a distributed
   groupby over band hashes would take this stage's place.
3. **write** (Ray Data, per unit): the unit's rows less the dropped ones.

The report (``report/dropped.parquet``) lists every dropped row: its id, why
(``exact`` or ``near``), the id it duplicates (the kept row) and their
estimated similarity.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from matrix_hpc.data.plan import REPORT_DIR, Plan, Unit, open_plan, run_stage
from matrix_hpc.data.source import OutputSource, SourceError
from matrix_hpc.data.text import column_texts, hash64, ngrams, normalise, source_columns
from matrix_hpc.store.layout import read_columns, write_table_atomic, write_temp

SEED = 1  # datasketch's permutation seed: fixed, so signatures agree across workers and reruns
SIGN, WRITE = "sign", "write"
REPORT_FILE = "dropped.parquet"


@dataclass(frozen=True)
class DedupConf:
    columns: tuple[str, ...]
    threshold: float = 0.8  # estimated Jaccard similarity at or above which two rows are near duplicates
    ngram: int = 5  # words per shingle
    num_perm: int = 128  # MinHash permutations
    statuses: tuple[str, ...] | None = ("ok",)  # the rows taken (and written); None = every row

    def __post_init__(self) -> None:
        if not self.columns:
            raise SourceError("--column: name at least one column to compare")
        if not 0.0 < self.threshold <= 1.0:
            raise SourceError(f"--threshold {self.threshold}: must be in (0, 1]")
        if self.ngram < 1 or self.num_perm < 2:
            raise SourceError(f"--ngram {self.ngram} / --num-perm {self.num_perm}: must be >= 1 / >= 2")

    @functools.cached_property
    def bands(self) -> tuple[int, int]:
        """(b, r) as datasketch's MinHashLSH chooses them for this threshold and num_perm."""
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        return int(lsh.b), int(lsh.r)

    def params(self) -> dict[str, Any]:
        d = asdict(self)
        d["columns"] = list(self.columns)
        d["statuses"] = list(self.statuses) if self.statuses is not None else None
        return d


@dataclass
class DedupResult:
    dest: Path
    rows: int = 0  # rows compared
    kept: int = 0
    dropped_exact: int = 0
    dropped_near: int = 0
    no_text: int = 0  # rows without text in the chosen columns (kept, not compared)
    clusters: int = 0  # clusters of two or more rows
    bands: list[int] = field(default_factory=list)  # [b, r]
    stage_s: dict[str, float] = field(default_factory=dict)  # wall seconds of each stage this call ran
    notes: list[str] = field(default_factory=list)


def dedup(out_dir: Path, dest: Path, conf: DedupConf, force: bool = False) -> DedupResult:
    """Deduplicate the selected rows of ``out_dir`` into ``dest`` (resumable: rerun the same call)."""
    src = OutputSource.open(out_dir, conf.statuses)
    check_columns(src, conf.columns)
    plan = open_plan(out_dir, dest, "dedup", conf.params(), force)
    notes = [n for n in [src.live_note()] if n]
    if (done := plan.finished()) is not None:
        return DedupResult(**{**done, "dest": Path(dest), "notes": notes + ["already complete (summary.json)"]})
    clock = [time.perf_counter()]
    run_stage([asdict(u) for u in plan.pending(SIGN)], functools.partial(sign_unit, str(plan.out_dir),
                                                                         str(plan.work), conf))
    clock.append(time.perf_counter())
    dropped = _report(plan, conf)
    drops = _drops_by_unit(dropped)
    clock.append(time.perf_counter())
    run_stage([{**asdict(u), "drop": drops.get(u.index, [])} for u in plan.units
               if not u.data_path(plan.dest).exists()],
              functools.partial(write_unit, str(plan.out_dir), str(plan.dest), conf.statuses))
    clock.append(time.perf_counter())
    result = _result(plan, conf, dropped)
    result.stage_s = {name: round(b - a, 1) for name, a, b in zip((SIGN, "group", WRITE), clock, clock[1:],
                                                                   strict=False)}
    plan.write_summary({k: v for k, v in asdict(result).items() if k not in ("dest", "notes")})
    result.notes = notes
    return result


def check_columns(src: OutputSource, specs: tuple[str, ...] | list[str]) -> None:
    names = src.schema().names
    missing = [c for c in source_columns(specs) if c not in names]
    if missing:
        raise SourceError(f"--column: {', '.join(missing)} not in {src.out_dir} (columns: {', '.join(names)})")


# -- stage 1: sign ----------------------------------------------------------------
def sign_unit(out_dir: str, work: str, conf: DedupConf, unit_row: dict[str, Any]) -> dict[str, Any]:
    unit = _unit(unit_row)
    table = read_unit(Path(out_dir), unit, ["id", *source_columns(conf.columns)], conf.statuses)
    texts = column_texts(table, conf.columns)
    b, r = conf.bands
    exact, sigs, has_text = signatures(texts, conf.ngram, conf.num_perm)
    out = pa.table({
        "pos": pa.array(np.arange(len(texts), dtype=np.int32)),
        "id": table.column("id"),
        "has_text": pa.array(has_text),
        "exact": pa.array(exact),
        "bands": _fixed_list(band_hashes(sigs, b, r)),
        "sig": _fixed_list(sigs),
    })
    write_table_atomic(out, Path(work) / SIGN / f"{unit.name}.parquet", "zstd", "sign")
    return {"unit": unit.index, "rows": len(texts)}


def _unit(row: dict[str, Any]) -> Unit:
    return Unit(int(row["index"]), str(row["file"]), int(row["row_group"]), int(row["rows"]))


def read_unit(out_dir: Path, unit: Unit, columns: list[str] | None, statuses: Any) -> pa.Table:
    """The selected rows of one unit (``pos`` in later stages counts these rows)."""
    src = OutputSource(out_dir, [], tuple(statuses) if statuses is not None else None, None)
    path = out_dir / unit.file
    batches = list(src.batches(path, columns, row_groups=[unit.row_group]))
    if batches:
        return pa.Table.from_batches(batches)
    schema = pq.read_schema(path)
    return schema.empty_table().select(columns) if columns else schema.empty_table()


def signatures(texts: list[str | None], ngram: int, num_perm: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per text: the exact key, the MinHash values (datasketch) and whether it has any text."""
    import xxhash
    from datasketch import MinHash

    # xxHash for the shingles (datasketch's hashfunc hook): ~10x faster than its default SHA-1, same 32 bits
    base = MinHash(num_perm=num_perm, seed=SEED, hashfunc=xxhash.xxh32_intdigest)  # copies share permutations
    exact = np.zeros(len(texts), np.uint64)
    sigs = np.zeros((len(texts), num_perm), np.uint32)
    has_text = np.zeros(len(texts), bool)
    for i, text in enumerate(texts):
        norm = normalise(text) if text else ""
        if not norm:
            continue
        tokens = norm.split()
        m = base.copy()
        m.update_batch([g.encode() for g in (ngrams(tokens, ngram) or [norm])])
        sigs[i], exact[i], has_text[i] = m.hashvalues, hash64(norm), True
    return exact, sigs, has_text


_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)


def band_hashes(sigs: np.ndarray, b: int, r: int) -> np.ndarray:
    """(rows, b) 64-bit hashes of each band's r MinHash values.

    Written here rather than taken from datasketch: its LSH index keys each
    band by its bytes in a Python dict (GBs at a million rows in one
    process); this is one vectorised pass per band row (FNV-1a over the
    32-bit values, then a 64-bit finaliser), and equal bands give equal hashes.
    """
    bands = sigs[:, :b * r].astype(np.uint64).reshape(len(sigs), b, r)
    h = np.full((len(sigs), b), _FNV_OFFSET, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(r):
            h = (h ^ bands[:, :, k]) * _FNV_PRIME
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return h


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


# -- stage 2: group ---------------------------------------------------------------
SIG_COLUMNS = ["pos", "id", "has_text", "exact", "bands"]


def _report(plan: Plan, conf: DedupConf) -> pa.Table:
    """The dropped rows (recorded once: a rerun reads the same report)."""
    path = plan.dest / REPORT_DIR / REPORT_FILE
    if path.exists():
        return read_columns(path)
    dropped = group(plan, conf)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table_atomic(dropped, path, "zstd", "report")
    return dropped


def group(plan: Plan, conf: DedupConf) -> pa.Table:
    """Cluster the signed rows; one row per dropped row (see the module docstring for the rule)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    unit_of, tables = _load_signs(plan)
    t = pa.concat_tables(tables) if tables else pa.table({c: [] for c in SIG_COLUMNS})
    n = t.num_rows
    valid = np.flatnonzero(t.column("has_text").to_numpy(zero_copy_only=False)) if n else np.array([], np.int64)
    exact = t.column("exact").to_numpy() if n else np.array([], np.uint64)
    bands = _matrix(t.column("bands"), conf.bands[0]) if n else np.zeros((0, conf.bands[0]), np.uint64)
    exact_edges = _equal_key_edges(exact, valid)
    near = np.concatenate([_equal_key_edges(bands[:, j], valid) for j in range(bands.shape[1])] or
                          [np.zeros((0, 2), np.int64)])
    sig_of = _signatures_of(plan, unit_of, t, np.unique(np.concatenate([exact_edges.ravel(), near.ravel()])))
    near = near[[_similarity(sig_of, a, b) >= conf.threshold for a, b in near]] if len(near) else near
    edges = np.concatenate([exact_edges, near])
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return _dropped_rows(t, unit_of, labels, exact, sig_of, plan)


def _load_signs(plan: Plan) -> tuple[np.ndarray, list[pa.Table]]:
    tables, units = [], []
    for u in plan.units:
        t = read_columns(plan.marker(SIGN, u), SIG_COLUMNS)
        tables.append(t)
        units.append(np.full(t.num_rows, u.index, np.int32))
    return (np.concatenate(units) if units else np.zeros(0, np.int32)), tables


def _matrix(column: pa.ChunkedArray, width: int) -> np.ndarray:
    flat: np.ndarray = pc.list_flatten(column).to_numpy()
    return flat.reshape(-1, width)


def _equal_key_edges(keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pairs (row, next row) of ``valid`` rows whose keys are equal (a chain through each group)."""
    if len(valid) < 2:
        return np.zeros((0, 2), np.int64)
    order = valid[np.argsort(keys[valid], kind="stable")]
    same = keys[order[1:]] == keys[order[:-1]]
    return np.stack([order[:-1][same], order[1:][same]], axis=1)


def _signatures_of(plan: Plan, unit_of: np.ndarray, t: pa.Table, rows: np.ndarray) -> dict[int, np.ndarray]:
    """The MinHash values of ``rows`` (global row numbers), read unit by unit from the sign files."""
    out: dict[int, np.ndarray] = {}
    pos = t.column("pos").to_numpy() if t.num_rows else np.zeros(0, np.int32)
    for unit_index in np.unique(unit_of[rows]) if len(rows) else []:
        mine = rows[unit_of[rows] == unit_index]
        sig = read_columns(plan.marker(SIGN, plan.units[int(unit_index)]), ["sig"]).column("sig")
        width = sig.type.list_size
        matrix = pc.list_flatten(sig).to_numpy().reshape(-1, width)
        for row in mine:
            out[int(row)] = matrix[pos[row]]
    return out


def _similarity(sig_of: dict[int, np.ndarray], a: int, b: int) -> float:
    return float(np.mean(sig_of[int(a)] == sig_of[int(b)]))


def _dropped_rows(t: pa.Table, unit_of: np.ndarray, labels: np.ndarray, exact: np.ndarray,
                  sig_of: dict[int, np.ndarray], plan: Plan) -> pa.Table:
    n = t.num_rows
    sizes = np.bincount(labels, minlength=1) if n else np.zeros(0, np.int64)
    in_cluster = np.flatnonzero(sizes[labels] > 1) if n else np.zeros(0, np.int64)
    rank = np.empty(n, np.int64)
    rank[pc.sort_indices(t.column("id")).to_numpy()] = np.arange(n)  # stable: ties keep file order
    members = in_cluster[np.lexsort((rank[in_cluster], labels[in_cluster]))]
    first = np.r_[True, labels[members][1:] != labels[members][:-1]] if len(members) else np.zeros(0, bool)
    keeper = members[first][np.cumsum(first) - 1]  # each member's cluster representative
    drop, kept = members[~first], keeper[~first]
    ids = t.column("id")
    pos = t.column("pos").to_numpy() if n else np.zeros(0, np.int32)
    return pa.table({
        "id": ids.take(pa.array(drop, pa.int64())),
        "reason": pa.array(np.where(exact[drop] == exact[kept], "exact", "near").astype(object), pa.string()),
        "kept_id": ids.take(pa.array(kept, pa.int64())),
        "similarity": pa.array([_similarity(sig_of, a, b) for a, b in zip(drop, kept, strict=True)], pa.float64()),
        "file": pa.array([plan.units[int(u)].file for u in unit_of[drop]], pa.string()),
        "unit": pa.array(unit_of[drop], pa.int32()),
        "pos": pa.array(pos[drop], pa.int32()),
    })


def _drops_by_unit(dropped: pa.Table) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for unit, pos in zip(dropped.column("unit").to_pylist(), dropped.column("pos").to_pylist(), strict=True):
        out.setdefault(int(unit), []).append(int(pos))
    return out


# -- stage 3: write ---------------------------------------------------------------
def write_unit(out_dir: str, dest: str, statuses: Any, unit_row: dict[str, Any]) -> dict[str, Any]:
    """The unit's selected rows less the dropped positions, published whole (replacing a killed attempt's)."""
    unit = _unit(unit_row)
    table = read_unit(Path(out_dir), unit, None, statuses)
    keep = np.ones(table.num_rows, bool)
    keep[np.asarray(unit_row.get("drop") or [], np.int64)] = False
    publish_replace(table.filter(pa.array(keep)), unit.data_path(Path(dest)))
    return {"unit": unit.index, "rows": int(keep.sum())}


def publish_replace(table: pa.Table, path: Path) -> None:
    """Write ``table`` at ``path`` whole (temp file, fsync, rename): a unit's file is its completion marker."""
    import os

    tmp = path.with_name(f".tmp-{path.name}")
    write_temp(table, tmp, "zstd")
    os.replace(tmp, path)


def _result(plan: Plan, conf: DedupConf, dropped: pa.Table) -> DedupResult:
    rows = sum(read_columns(plan.marker(SIGN, u), ["pos"]).num_rows for u in plan.units)
    no_text = sum(int(pc.sum(pc.invert(read_columns(plan.marker(SIGN, u), ["has_text"]).column(0))).as_py() or 0)
                  for u in plan.units)
    reasons = dropped.column("reason").to_pylist()
    exact, near = reasons.count("exact"), reasons.count("near")
    clusters = len(set(dropped.column("kept_id").to_pylist()))
    return DedupResult(plan.dest, rows, rows - exact - near, exact, near, no_text, clusters, list(conf.bands))
