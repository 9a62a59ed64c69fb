"""The coevo archive: one DuckDB file, one writer process, written in batches.

The schema lives in `schema/NNN_*.sql`; `Archive.open` applies the migrations the file has
not seen yet and records each in `schema_version`. Writers hand over `list[dict]` rows; each
batch becomes one pyarrow table and one `INSERT OR IGNORE … SELECT`, so replaying a batch on
resume is harmless and 50k evaluation rows cost one statement, not 50k.

DuckDB allows one process to hold a file writable, and no other process may open it while it
does (not even read-only). The session therefore keeps its `Archive` open for its whole
life; readers that find it locked get an `ArchiveError` naming the writer's pid.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import duckdb
import pyarrow as pa

_ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us"),
    "VARCHAR[]": pa.list_(pa.string()),
}
_batch_names = itertools.count()


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


def _connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """Open the DuckDB file, turning DuckDB's IO errors into messages a user can act on."""
    if read_only and not path.exists():
        raise ArchiveError(f"no archive at {path}: check the path, or run a session first")
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error as exc:
        message = one_line(str(exc))
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
        raise ArchiveError(f"cannot open archive {path}: {message}") from None


class Archive:
    """A coevo archive file. Open with `Archive.open(path)`; use as a context manager."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
        self._con = con
        self.path = path
        self.read_only = read_only
        self._in_transaction = False
        self._columns = self._load_columns()

    # ----------------------------------------------------------------- open / close

    @classmethod
    def open(cls, path: Path, *, read_only: bool = False) -> Archive:
        """Open (and, when writable, create and migrate) the archive at `path`.

        A read-only open never changes the file; it refuses an archive whose schema differs
        from this code's, saying what to do.
        """
        path = Path(path)
        con = _connect(path, read_only)
        try:
            version = _schema_version(con, path)
            if version > SCHEMA_VERSION:
                raise ArchiveError(
                    f"archive {path} has schema v{version}, newer than this coevo's "
                    f"v{SCHEMA_VERSION}: upgrade coevo to read it"
                )
            if version < SCHEMA_VERSION:
                if read_only:
                    raise ArchiveError(
                        f"archive {path} has schema v{version}, this coevo expects "
                        f"v{SCHEMA_VERSION}: open it once writable (coevo sql --write, or "
                        f"resume its session) to migrate it"
                    )
                _migrate(con, version)
        except BaseException:
            con.close()
            raise
        return cls(con, path, read_only)

    def close(self) -> None:
        """Close the connection (a no-op when already closed)."""
        self._con.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Archive]:
        """Group writes: all of them land on exit, none of them if the block raises."""
        self._check_writable()
        if self._in_transaction:
            raise ArchiveError("archive transactions do not nest")
        self._con.begin()
        self._in_transaction = True
        try:
            yield self
        except BaseException:
            self._con.rollback()
            raise
        else:
            self._con.commit()
        finally:
            self._in_transaction = False

    # ----------------------------------------------------------------------- writes

    def add_session(
        self,
        session_id: str,
        mode: str,
        seed: int,
        config: dict[str, Any] | str,
        *,
        status: str = "running",
        started_at: datetime | None = None,
    ) -> None:
        """Record a session (ignored if `session_id` exists, so resuming is harmless)."""
        row: dict[str, Any] = {
            "session_id": session_id,
            "mode": mode,
            "seed": seed,
            "config_json": config,
            "status": status,
        }
        if started_at is not None:
            row["started_at"] = started_at
        self._insert("sessions", [row])

    def finish_session(self, session_id: str, status: str = "finished") -> None:
        """Mark a session ended now with `status` ('finished', 'failed', 'stopped', …)."""
        self._check_writable()
        updated = self._execute(
            "UPDATE sessions SET status = ?, finished_at = (now() AT TIME ZONE 'UTC') "
            "WHERE session_id = ?",
            [status, session_id],
        ).fetchone()
        if not updated or updated[0] == 0:
            raise ArchiveError(f"no session {session_id!r} in archive {self.path}")

    def add_prompt(self, role: str, name: str, text: str) -> str:
        """Store a prompt text once and return its hash (the id artifacts refer to).

        The hash covers the text only: the same text under another role or name keeps the
        role and name it was first stored with.
        """
        digest = prompt_hash(text)
        self._insert("prompts", [{"prompt_hash": digest, "role": role, "name": name, "text": text}])
        return digest

    def add_generator_version(
        self,
        session_id: str,
        version: int,
        path: str,
        *,
        parent_version: int | None = None,
        dpo_run_id: str | None = None,
    ) -> None:
        """Record a generator checkpoint (version 0 is the initial generator)."""
        self._insert(
            "generator_versions",
            [
                {
                    "session_id": session_id,
                    "version": version,
                    "path": str(path),
                    "parent_version": parent_version,
                    "dpo_run_id": dpo_run_id,
                }
            ],
        )

    def add_algorithms(self, rows: list[dict[str, Any]]) -> int:
        """Insert generated programs; returns how many were new.

        Keys: algorithm_id, session_id, iteration, sample_index, generator_version,
        prompt_hash, temperature, code, code_hash, normalized_hash, policy_ok; optional:
        duplicate_of, policy_rule, policy_reason, exemplar_ids (list[str]), created_at.
        """
        return self._insert("algorithms", rows)

    def add_sandbox_runs(self, rows: list[dict[str, Any]]) -> int:
        """Insert sandbox executions; returns how many were new.

        Keys: run_id, algorithm_id, runner, verdict; optional: reason, duration_s,
        peak_memory_mb, stdout, stderr, created_at.
        """
        return self._insert("sandbox_runs", rows)

    def add_models(self, rows: list[dict[str, Any]]) -> int:
        """Insert models; returns how many were new.

        Keys: model_id, session_id, kind ('base' | 'expert' | 'baseline' | 'merged'), name;
        optional: algorithm_id, parent_ids (list[str]), mutation, path, created_at.
        """
        return self._insert("models", rows)

    def add_tasks(self, rows: list[dict[str, Any]]) -> int:
        """Insert tasks; returns how many were new.

        Keys: task_id, skill, split ('dev' | 'test'), prompt, origin; optional: answer,
        checker, created_at.
        """
        return self._insert("tasks", rows)

    def add_evaluations(self, rows: list[dict[str, Any]]) -> int:
        """Insert scores of models on tasks; returns how many were new.

        Keys: model_id, task_id, judge, score; optional: answer, created_at.
        """
        return self._insert("evaluations", rows)

    def add_preference_pairs(self, rows: list[dict[str, Any]]) -> int:
        """Insert DPO preference pairs; returns how many were new.

        Keys: pair_id, session_id, iteration, prompt_hash, chosen_algorithm_id,
        rejected_algorithm_id, chosen_score, rejected_score; optional: created_at.
        """
        return self._insert("preference_pairs", rows)

    def add_dpo_run(self, row: dict[str, Any]) -> int:
        """Insert one DPO run; returns 1 if new, 0 if already recorded.

        Keys: dpo_run_id, session_id, iteration, base_version, new_version, num_pairs,
        config_json (dict or JSON str); optional: final_loss, duration_s, created_at.
        """
        return self._insert("dpo_runs", [row])

    # ------------------------------------------------------------------------ reads

    def query(self, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple]]:
        """Run SQL; return (column names, rows). Statements without a result give ([], [])."""
        result = self._execute(sql, params)
        if result.description is None:
            return [], []
        columns = [d[0] for d in result.description]
        try:
            rows = result.fetchall()
        except duckdb.Error as exc:
            raise ArchiveError(one_line(str(exc))) from None
        return columns, rows

    def scalar(self, sql: str, params: list[Any] | None = None) -> Any:
        """The first column of the first row, or None when there is no row."""
        _, rows = self.query(sql, params)
        return rows[0][0] if rows else None

    def records(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Run SQL; return one dict per row."""
        columns, rows = self.query(sql, params)
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def algorithm_scores(self, session_id: str, iteration: int | None = None) -> list[dict]:
        """Rows of the `algorithm_scores` view for a session (optionally one iteration)."""
        sql = "SELECT * FROM algorithm_scores WHERE session_id = ?"
        params: list[Any] = [session_id]
        if iteration is not None:
            sql += " AND iteration = ?"
            params.append(iteration)
        return self.records(sql + " ORDER BY iteration, sample_index, algorithm_id", params)

    def top_algorithms(
        self, session_id: str, k: int, *, max_iteration: int | None = None
    ) -> list[dict]:
        """The k executable algorithms with the best dev score, best first, with their code.

        Keys: algorithm_id, iteration, sample_index, generator_version, prompt_hash,
        dev_score, test_score, code.
        """
        sql = """
            SELECT s.algorithm_id, s.iteration, s.sample_index, s.generator_version,
                   s.prompt_hash, s.dev_score, s.test_score, a.code
            FROM algorithm_scores s JOIN algorithms a USING (algorithm_id)
            WHERE s.session_id = ? AND s.verdict = 'ok' AND s.dev_score IS NOT NULL
        """
        params: list[Any] = [session_id]
        if max_iteration is not None:
            sql += " AND s.iteration <= ?"
            params.append(max_iteration)
        sql += " ORDER BY s.dev_score DESC, s.test_score DESC NULLS LAST, s.algorithm_id LIMIT ?"
        params.append(k)
        return self.records(sql, params)

    def existing_ids(self, table: str, id_column: str, ids: list[str]) -> set[str]:
        """Which of `ids` are already in `table.id_column` (resume skips those)."""
        if table not in self._columns or id_column not in self._columns[table]:
            raise ArchiveError(f"archive has no column {table}.{id_column}")
        if not ids:
            return set()
        _, rows = self.query(
            f"SELECT DISTINCT {_quote(id_column)} FROM {_quote(table)} "
            f"WHERE {_quote(id_column)} IN (SELECT unnest(?::VARCHAR[]))",
            [list(ids)],
        )
        return {row[0] for row in rows}

    def latest_session(self) -> dict | None:
        """The most recently started session as a dict, or None for an empty archive."""
        rows = self.records(
            "SELECT * FROM sessions ORDER BY started_at DESC, session_id DESC LIMIT 1"
        )
        return rows[0] if rows else None

    # ---------------------------------------------------------------------- helpers

    def _execute(self, sql: str, params: list[Any] | None = None) -> duckdb.DuckDBPyConnection:
        try:
            return self._con.execute(sql, params)
        except duckdb.Error as exc:
            message = one_line(str(exc))
            if "read-only mode" in message:
                message += (
                    f" (archive {self.path} is open read-only; open it writable to change it)"
                )
            raise ArchiveError(message) from None

    def _check_writable(self) -> None:
        if self.read_only:
            raise ArchiveError(
                f"archive {self.path} is open read-only: open it with read_only=False to write"
            )

    def _load_columns(self) -> dict[str, dict[str, _Column]]:
        """table -> column -> its type, whether a row must give it, and its SQL default."""
        rows = self._con.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND NOT internal ORDER BY table_name, column_index"
        ).fetchall()
        tables: dict[str, dict[str, _Column]] = {}
        for table, column, data_type, nullable, default in rows:
            required = not nullable and default is None
            tables.setdefault(table, {})[column] = _Column(data_type, required, default)
        return tables

    def _insert(self, table: str, rows: list[dict[str, Any]]) -> int:
        """Insert `rows` into `table` in one statement, ignoring rows whose key exists."""
        self._check_writable()
        if not rows:
            return 0
        columns = self._columns[table]
        unknown = sorted({key for row in rows for key in row} - set(columns))
        if unknown:
            raise ArchiveError(f"{table}: unknown column(s) {unknown}; known: {sorted(columns)}")
        required = [name for name, column in columns.items() if column.required]
        for index, row in enumerate(rows):
            missing = [name for name in required if row.get(name) is None]
            if missing:
                raise ArchiveError(f"{table} row {index}: missing {missing}: {row!r:.200}")
        present = [name for name in columns if any(name in row for row in rows)]
        arrays = {}
        for name in present:
            data_type = columns[name].data_type
            values = [row.get(name) for row in rows]
            if data_type == "JSON":
                values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
            try:
                arrays[name] = pa.array(values, type=_ARROW_TYPES.get(data_type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                raise ArchiveError(f"{table}.{name} ({data_type}): {one_line(str(exc))}") from None
        # A column with a SQL default may be given for some rows only: SQL fills the others.
        select = ", ".join(
            f"coalesce({_quote(name)}, {columns[name].default})"
            if columns[name].default is not None
            else _quote(name)
            for name in present
        )
        view = f"_archive_batch_{next(_batch_names)}"
        self._con.register(view, pa.table(arrays))
        try:
            result = self._execute(
                f"INSERT OR IGNORE INTO {_quote(table)} ({', '.join(map(_quote, present))}) "
                f"SELECT {select} FROM {view}"
            ).fetchone()
        finally:
            self._con.unregister(view)
        return int(result[0]) if result else 0


class _Column(NamedTuple):
    data_type: str
    required: bool
    default: str | None


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _schema_version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
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


def _migrate(con: duckdb.DuckDBPyConnection, current: int) -> None:
    """Apply the migrations above `current`, each in its own transaction."""
    con.execute(_BOOTSTRAP)
    for version, name, sql in migrations():
        if version <= current:
            continue
        con.begin()
        try:
            con.execute(sql)
            con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [version, name])
        except duckdb.Error as exc:
            con.rollback()
            raise ArchiveError(f"migration {name} failed: {one_line(str(exc))}") from None
        con.commit()
