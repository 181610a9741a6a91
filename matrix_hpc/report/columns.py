"""Read only the columns a report needs from an output's part files.

Top-level columns are projected by name; of ``messages`` only the scalar
fields named (never ``content``), found by their Parquet leaf paths
(``messages.list.element.agent``; older writers said ``item``). A column a
file lacks comes back as nulls, so files of different workflows or releases
concatenate.

    table = read_report_columns(files, ["status", "t_finished"], ["agent", "t_start", "t_end"])
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from matrix_hpc.store.rows import BASE_FIELDS, MESSAGE_TYPE

#: Top-level columns of the output schema and their types (for the nulls of a missing column).
BASE_TYPES: dict[str, pa.DataType] = dict(BASE_FIELDS)
MESSAGES = "messages"


def read_report_columns(files: list[Path], columns: list[str], message_fields: list[str]) -> pa.Table:
    """The named columns of every file, concatenated; ``messages`` holds a
    list of structs with only ``message_fields`` when those are asked for."""
    tables = [_read_file(f, columns, message_fields) for f in files]
    if not tables:
        return _empty(columns, message_fields)
    return pa.concat_tables(tables, promote_options="permissive")


def _read_file(path: Path, columns: list[str], message_fields: list[str]) -> pa.Table:
    with pq.ParquetFile(path) as f:
        arrow_names = set(f.schema_arrow.names)
        leaves = [f.schema.column(i).path for i in range(len(f.schema))]
        message_paths = [p for p in leaves if p.startswith(MESSAGES + ".") and p.rsplit(".", 1)[1] in message_fields]
        present = [c for c in columns if c in arrow_names]
        t = f.read(columns=present + message_paths)
    for c in columns:
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows, BASE_TYPES.get(c, pa.null())))
    if message_fields:
        t = _with_message_fields(t, message_fields)
    return t.select(columns + ([MESSAGES] if message_fields else []))


def _with_message_fields(t: pa.Table, fields: list[str]) -> pa.Table:
    """``messages`` as list<struct<fields...>> in the order asked, nulls for fields the file lacks."""
    wanted = pa.list_(pa.struct([MESSAGE_TYPE.field(name) for name in fields]))
    if MESSAGES not in t.column_names:
        return t.append_column(MESSAGES, pa.nulls(t.num_rows, wanted))
    column = t.column(MESSAGES).combine_chunks()
    values = column.values
    children = [values.field(name) if values.type.get_field_index(name) >= 0
                else pa.nulls(len(values), MESSAGE_TYPE.field(name).type) for name in fields]
    struct = pa.StructArray.from_arrays(children, fields=list(wanted.value_type))
    rebuilt = pa.ListArray.from_arrays(column.offsets, struct, mask=column.is_null())
    return t.set_column(t.schema.get_field_index(MESSAGES), MESSAGES, rebuilt)


def _empty(columns: list[str], message_fields: list[str]) -> pa.Table:
    arrays = {c: pa.array([], BASE_TYPES.get(c, pa.null())) for c in columns}
    if message_fields:
        arrays[MESSAGES] = pa.array([], pa.list_(pa.struct([MESSAGE_TYPE.field(n) for n in message_fields])))
    return pa.table(arrays)
