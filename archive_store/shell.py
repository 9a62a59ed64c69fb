"""`coevo sql`: run SQL against an archive and format the result for a terminal or a file,
one statement at a time (`run_sql`) or in an interactive shell (`repl`); and the sealed-off
connection behind `coevo serve`'s SQL console (`console_query`)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
import threading
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from archive_store.db import ArchiveError, one_line
from archive_store.store import Archive, snapshot_path

FORMATS = ("table", "csv", "json", "markdown", "parquet")
_CHANGES = (duckdb.StatementType.INSERT, duckdb.StatementType.UPDATE, duckdb.StatementType.DELETE)
MAX_CELL = 60


def run_sql(
    archive_path: Path,
    sql: str,
    *,
    fmt: str = "table",
    write: bool = False,
    out: Path | None = None,
) -> str:
    """Execute `sql` on the archive (read-only unless `write`) and return it formatted.

    `fmt` is one of 'table' (aligned, cells cut to 60 chars), 'csv', 'json' (a list of
    objects), 'markdown' or 'parquet' (needs `out`). With `out` the result goes to that file
    (written whole, then renamed into place) and the return value says so. Readers open the
    archive's snapshot while a session writes (see `archive_store.store`). SQL errors raise
    `ArchiveError` with DuckDB's message on one line.
    """
    if fmt not in FORMATS:
        raise ArchiveError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "parquet" and out is None:
        raise ArchiveError("--format parquet writes a file: add --out FILE.parquet")
    with Archive.open(Path(archive_path), read_only=not write) as archive:
        if fmt == "parquet":
            assert out is not None
            return _to_parquet(archive, sql, Path(out))
        try:
            columns, rows = archive.query(sql)
        except ArchiveError as exc:
            if not write and "read-only" in str(exc):
                raise ArchiveError(f"{exc}; pass --write to allow changes") from None
            raise
    if not columns:
        return "OK"
    if columns == ["Count"]:
        # DuckDB answers DDL and DML with a 'Count' column; say what happened instead.
        kind = duckdb.extract_statements(sql)[-1].type
        if kind in _CHANGES:
            changed = rows[0][0] if rows else 0
            return f"OK, {changed} row{'s' if changed != 1 else ''} changed"
        if kind != duckdb.StatementType.SELECT:
            return "OK"
    text = {"table": _table, "csv": _csv, "json": _json, "markdown": _markdown}[fmt](columns, rows)
    if out is None:
        return text
    write_atomic(Path(out), text if text.endswith("\n") else text + "\n")
    return f"wrote {len(rows)} row{'s' if len(rows) != 1 else ''} to {out}"


def _to_parquet(archive: Archive, sql: str, out: Path) -> str:
    statements = duckdb.extract_statements(sql)
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise ArchiveError("--format parquet takes exactly one SELECT statement")
    query = statements[0].query.strip().rstrip(";")
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        archive.query(f"COPY ({query}) TO '{str(tmp).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
        rows = archive.scalar(f"SELECT count(*) FROM read_parquet('{str(tmp).replace(chr(39), chr(39) * 2)}')")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return f"wrote {rows} row{'s' if rows != 1 else ''} to {out}"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole, then rename it into place; ArchiveError on one line if
    the file cannot be written."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as err:
        with contextlib.suppress(OSError):  # e.g. the parent is a file: there is no tmp to remove
            tmp.unlink(missing_ok=True)
        raise ArchiveError(f"cannot write {path}: {err}") from None


def schema_of(archive_path: Path, name: str | None = None) -> str:
    """The SQL that defines one table or view (or all of them), as stored in the archive."""
    with Archive.open(Path(archive_path), read_only=True) as archive:
        rows = archive.query(
            "SELECT name, sql FROM (SELECT table_name AS name, sql FROM duckdb_tables() "
            "WHERE database_name = current_database() UNION ALL SELECT view_name, sql "
            "FROM duckdb_views() WHERE database_name = current_database() AND NOT internal) "
            "WHERE ? IS NULL OR name = ? ORDER BY name",
            [name, name],
        )[1]
    if not rows:
        raise ArchiveError(f"no table or view named {name!r} (see .tables)")
    return "\n\n".join(sql.strip() for _, sql in rows)


def tables_and_views(archive_path: Path, kind: str | None = None) -> str:
    """A table of the archive's tables (with row counts) and/or views, with their columns."""
    with Archive.open(Path(archive_path), read_only=True) as archive:
        columns, rows = archive.query(
            """
            SELECT t.table_name AS name,
                   CASE WHEN v.view_name IS NULL THEN 'table' ELSE 'view' END AS kind,
                   t.estimated_size AS est_rows,
                   string_agg(c.column_name, ', ' ORDER BY c.column_index) AS columns
            FROM (SELECT table_name, estimated_size FROM duckdb_tables()
                  WHERE database_name = current_database()
                  UNION ALL
                  SELECT view_name, NULL FROM duckdb_views()
                  WHERE database_name = current_database() AND NOT internal) t
            LEFT JOIN duckdb_views() v
                   ON v.view_name = t.table_name AND v.database_name = current_database()
            JOIN duckdb_columns() c
                   ON c.table_name = t.table_name AND c.database_name = current_database()
            GROUP BY ALL
            HAVING ? IS NULL OR kind = ?
            ORDER BY kind, name
            """,
            [kind, kind],
        )
    return _table(columns, rows, max_cell=10_000)


def _text(value: Any) -> str:
    """How one value reads in a terminal or markdown cell."""
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value).replace("\r\n", "⏎").replace("\n", "⏎")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(columns: list[str], rows: list[tuple], max_cell: int = MAX_CELL) -> str:
    cells = [[_cut(_text(v), max_cell) for v in row] for row in rows]
    numeric = [
        any(row[i] is not None for row in rows)
        and all(isinstance(row[i], int | float | Decimal | None) for row in rows)
        for i in range(len(columns))
    ]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        padded = [
            v.rjust(w) if numeric[i] else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return ("| " + " | ".join(padded) + " |").rstrip()

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = [line(list(columns)), rule, *(line(r) for r in cells)]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def _csv(columns: list[str], rows: list[tuple]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else _plain(v) for v in row])
    return buffer.getvalue()


def _json(columns: list[str], rows: list[tuple]) -> str:
    records = [dict(zip(columns, row, strict=True)) for row in rows]
    return json.dumps(records, indent=2, default=_plain, ensure_ascii=False)


def _markdown(columns: list[str], rows: list[tuple]) -> str:
    def cell(value: Any) -> str:
        return _text(value).replace("|", "\\|")

    out = ["| " + " | ".join(cell(c) for c in columns) + " |"]
    out.append("|" + "|".join(" --- " for _ in columns) + "|")
    out.extend("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)
    return "\n".join(out)


def _plain(value: Any) -> Any:
    """A value csv/json can hold without losing precision (floats stay full repr)."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, list | dict | tuple):
        return json.dumps(value, default=str)
    return value if isinstance(value, str | int | float | bool) else str(value)


def repl(archive_path: Path, *, fmt: str = "table", write: bool = False, out: Path | None = None) -> int:
    """The interactive `coevo sql` shell: statements end with ';' and may span lines; history
    is kept in ~/.cache/coevo/sql_history; `.tables .views .schema [NAME] .help .quit`."""
    try:
        import readline
    except ImportError:  # pragma: no cover - readline is missing on some platforms
        readline = None  # type: ignore[assignment]
    history = Path.home() / ".cache" / "coevo" / "sql_history"
    if readline is not None:
        try:
            readline.read_history_file(history)
        except OSError:
            pass
    print(f"coevo sql on {archive_path} ({'read-write' if write else 'read-only'}); statements end with ';' "
          "and may span lines; .tables .views .schema [NAME] .help .quit")
    buffer: list[str] = []
    try:
        while True:
            try:
                line = input("   ...> " if buffer else "coevo> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                buffer = []
                continue
            if not buffer and line.strip().startswith("."):
                if _dot_command(archive_path, line.strip()):
                    return 0
                continue
            buffer.append(line)
            if line.rstrip().endswith(";"):
                try:
                    print(run_sql(archive_path, "\n".join(buffer), fmt=fmt, write=write, out=out))
                except ArchiveError as err:
                    print(f"error: {err}", file=sys.stderr)
                buffer = []
    finally:
        if readline is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.set_history_length(2000)
                readline.write_history_file(history)
            except OSError:
                pass


def _dot_command(archive_path: Path, line: str) -> bool:
    """Run one shell command (`.tables` ...); True when the shell should exit."""
    command, _, name = line.partition(" ")
    try:
        if command in (".quit", ".exit"):
            return True
        if command == ".tables":
            print(tables_and_views(archive_path))
        elif command == ".views":
            print(tables_and_views(archive_path, kind="view"))
        elif command == ".schema":
            print(schema_of(archive_path, name.strip() or None))
        else:
            print(".tables     tables and views with their columns\n.views      views only\n"
                  ".schema [N] the SQL defining table or view N (all without N)\n.quit       leave")
    except ArchiveError as err:
        print(f"error: {err}", file=sys.stderr)
    return False


# ----------------------------------------------------------------------------- browser console

CONSOLE_TIMEOUT_S = 30.0


def console_query(archive_path: Path, sql: str, *, max_rows: int = 1000) -> tuple[list[str], list[tuple], bool]:
    """Run `sql` for `coevo serve`'s SQL console: (columns, up to `max_rows` rows, whether cut).

    The connection is read-only, on the published snapshot, with DuckDB's external access off
    and its configuration locked, so a query from a browser can neither change the archive nor
    read or write a host file (`read_text`, `COPY ... TO`, `ATTACH`, extensions). A query still
    running after 30 s is interrupted. Errors raise `ArchiveError` on one line.
    """
    if not sql.strip():
        raise ArchiveError("empty query")
    path = Path(archive_path)
    source = snapshot_path(path) if snapshot_path(path).is_file() else path
    if not source.is_file():
        raise ArchiveError(f"no archive at {path}")
    try:
        con = duckdb.connect(str(source), read_only=True, config={
            "enable_external_access": False, "autoinstall_known_extensions": False,
            "autoload_known_extensions": False, "lock_configuration": True,
        })
    except duckdb.Error as exc:
        raise ArchiveError(f"cannot open archive {path}: {one_line(str(exc))}") from None
    timer = threading.Timer(CONSOLE_TIMEOUT_S, con.interrupt)
    timer.start()
    try:
        result = con.execute(sql)
        if result.description is None:
            return [], [], False
        columns = [d[0] for d in result.description]
        rows = result.fetchmany(max_rows + 1)
    except duckdb.InterruptException:
        raise ArchiveError(f"query interrupted after {CONSOLE_TIMEOUT_S:.0f} s") from None
    except duckdb.Error as exc:
        raise ArchiveError(one_line(str(exc))) from None
    finally:
        timer.cancel()
        con.close()
    return columns, rows[:max_rows], len(rows) > max_rows


def csv_text(columns: list[str], rows: list[tuple]) -> str:
    """`rows` as CSV (what `coevo sql --format csv` prints)."""
    return _csv(columns, rows)
