"""How a batch of row dicts becomes one Arrow table and one `INSERT OR IGNORE` statement.

The writer (`archive_store.store`) registers the Arrow table under a view name and runs the
statement: 50k rows cost one statement, and a replayed batch (on resume) adds nothing.
"""

from __future__ import annotations

import json
import operator
from typing import Any

import pyarrow as pa

from archive_store.db import ArchiveError, one_line, quote
from archive_store.reader import Column

ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us"),
    "VARCHAR[]": pa.list_(pa.string()),
}


def batch_insert(
    table: str, rows: list[dict[str, Any]], columns: dict[str, Column], view: str
) -> tuple[pa.Table, str]:
    """The Arrow table of `rows` (validated against the table's `columns`) and the statement
    that inserts it once it is registered as `view`."""
    # Rows of one batch nearly always share their keys: check each distinct key set once.
    key_sets = {tuple(row) for row in rows}
    given = set().union(*key_sets)
    unknown = sorted(given - set(columns))
    if unknown:
        raise ArchiveError(f"{table}: unknown column(s) {unknown}; known: {sorted(columns)}")
    in_every_row = set(columns).intersection(*key_sets)
    present = [name for name in columns if name in given]
    arrays = {}
    for name in present:
        column = columns[name]
        if name in in_every_row:
            values = list(map(operator.itemgetter(name), rows))
        else:
            values = [row.get(name) for row in rows]
        if column.required and None in values:
            index = values.index(None)
            raise ArchiveError(f"{table} row {index}: missing {name!r}: {rows[index]!r:.200}")
        if column.data_type == "JSON":
            values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
        try:
            arrays[name] = pa.array(values, type=ARROW_TYPES.get(column.data_type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise ArchiveError(f"{table}.{name} ({column.data_type}): {one_line(str(exc))}") from None
    missing = [n for n, c in columns.items() if c.required and n not in given]
    if missing:
        raise ArchiveError(f"{table} row 0: missing {missing}: {rows[0]!r:.200}")
    # A column with a SQL default may be given for some rows only: SQL fills the others.
    select = ", ".join(
        f"coalesce({quote(name)}, {columns[name].default})"
        if columns[name].default is not None
        else quote(name)
        for name in present
    )
    statement = (
        f"INSERT OR IGNORE INTO {quote(table)} ({', '.join(map(quote, present))}) "
        f"SELECT {select} FROM {view}"
    )
    return pa.table(arrays), statement
