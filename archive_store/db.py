"""The archive file itself: opening it with errors a user can act on, its schema and migrations.

The schema lives in `schema/NNN_*.sql`; `migrate` applies the migrations a file has not seen
yet, each in its own transaction, and records each in `schema_version`.
"""

from __future__ import annotations

import hashlib
import re
import time
from importlib import resources
from pathlib import Path

import duckdb

from archive_store import summaries


class ArchiveError(Exception):
    """An archive problem a user can act on; `str()` is one line."""


def one_line(message: str) -> str:
    """Squash a DuckDB error message to one line, dropping its caret-pointer lines."""
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and set(line) != {"^"}]
    return " | ".join(kept)


def prompt_hash(text: str) -> str:
    """The id of a prompt text: the first 16 hex chars of its sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def migrations() -> list[tuple[int, str, str]]:
    """The shipped migrations as (version, file name, sql), in version order."""
    found = []
    for entry in resources.files("archive_store").joinpath("schema").iterdir():
        match = re.fullmatch(r"(\d+)_\w+\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise ArchiveError(f"archive migrations must be numbered 1..n without gaps, got {versions}")
    return found


SCHEMA_VERSION = len(migrations())


_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
)
"""


def connect(path: Path, read_only: bool, wait_s: float) -> duckdb.DuckDBPyConnection:
    """Open the DuckDB file, turning DuckDB's IO errors into messages a user can act on."""
    if read_only and not path.exists():
        raise ArchiveError(f"no archive at {path}: check the path, or run a session first")
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    # A reader of an archive without a snapshot holds the file for a moment: a writer waits.
    deadline = time.monotonic() + (0 if read_only else wait_s)
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as exc:
            message = one_line(str(exc))
            locked = "Could not set lock" in message or "Conflicting lock" in message
            if not (locked and time.monotonic() < deadline):
                break
        time.sleep(0.2)
    if "not a valid DuckDB database" in message:
        raise ArchiveError(
            f"{path} is not a coevo archive (not a DuckDB database file): {message}"
        ) from None
    if "Could not set lock" in message or "Conflicting lock" in message:
        pid = re.search(r"PID (\d+)", message)
        raise ArchiveError(
            f"archive {path} is in use by a running session "
            f"(pid {pid.group(1) if pid else '?'}): wait for it to finish or stop it, "
            f"then retry ({message})"
        ) from None
    if DAMAGED.search(message):
        raise ArchiveError(damaged(path, message)) from None
    raise ArchiveError(f"cannot open archive {path}: {message}") from None


DAMAGED = re.compile(r"Could not read enough bytes|[Cc]orrupt|checksum|Invalid block")


def damaged(path: Path, message: str) -> str:
    """What to do about a damaged or truncated archive file."""
    return (
        f"archive {path} is damaged or truncated ({message}): restore it from a backup or an "
        "export (`coevo archive import`)"
    )


def sql_path(path: Path) -> str:
    """A file path as the inside of a single-quoted SQL string."""
    return str(path).replace("'", "''")


def quote(identifier: str) -> str:
    """A SQL identifier, double-quoted."""
    return '"' + identifier.replace('"', '""') + '"'


def schema_version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The archive's applied schema version; 0 for an empty database."""
    tables = {
        row[0]
        for row in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
        ).fetchall()
    }
    if "schema_version" not in tables:
        if tables:
            raise ArchiveError(
                f"{path} is not a coevo archive (a DuckDB database without a schema_version "
                f"table): tables {sorted(tables)[:5]}; point coevo at a new file"
            )
        return 0
    value = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(value[0]) if value else 0


def migrate(con: duckdb.DuckDBPyConnection, current: int) -> None:
    """Apply the migrations above `current`, each in its own transaction."""
    con.execute(_BOOTSTRAP)
    pending = [m for m in migrations() if m[0] > current]
    for version, name, sql in pending:
        con.begin()
        try:
            con.execute(sql)
            # The last migration applied fills the summary tables (added from v3 on) from the
            # evaluations, in its own transaction: an upgrade cut short refills on the next open.
            if version == pending[-1][0] and version >= 3:
                summaries.refill(con)
            con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [version, name])
        except duckdb.Error as exc:
            con.rollback()
            raise ArchiveError(f"migration {name} failed: {one_line(str(exc))}") from None
        con.commit()
