"""Reading an archive: SQL in, rows out, and the reads the loops and tools share.

`ArchiveReader` holds one DuckDB connection (to the live file for the writer, to the published
snapshot for readers) and runs queries with one-line errors. `Archive` (`archive_store.store`)
extends it with the writes; named reads for reports and tools are in `archive_store.queries`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import duckdb

from archive_store.db import (
    DAMAGED,
    SCHEMA_VERSION,
    ArchiveError,
    damaged,
    one_line,
    quote,
    sql_path,
)
from archive_store.summaries import SUMMARY_TABLES

# A condition on an algorithm id column: its latest human verdict is not 'quarantine'.
NOT_QUARANTINED = (
    "{column} NOT IN (SELECT algorithm_id FROM latest_reviews WHERE verdict = 'quarantine')"
)


class Column(NamedTuple):
    """A column of an archive table: its type, whether a row must give it, its SQL default."""

    data_type: str
    required: bool
    default: str | None


class ArchiveReader:
    """An open archive file, for reading; see `Archive.open`."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
        self._con = con
        self.path = path
        self.source = path  # the file actually open: the snapshot, for readers that have one
        self.read_only = read_only
        self._columns = self._load_columns()

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
        """The k executable algorithms with the best dev score, best first, with their code;
        quarantined ones (a reviewer's latest verdict) never count.

        Keys: algorithm_id, iteration, sample_index, generator_version, prompt_hash,
        dev_score, test_score, code.
        """
        sql = f"""
            SELECT s.algorithm_id, s.iteration, s.sample_index, s.generator_version,
                   s.prompt_hash, s.dev_score, s.test_score, a.code
            FROM algorithm_scores s JOIN algorithms a USING (algorithm_id)
            WHERE s.session_id = ? AND s.verdict = 'ok' AND s.dev_score IS NOT NULL
              AND {NOT_QUARANTINED.format(column="s.algorithm_id")}
        """
        params: list[Any] = [session_id]
        if max_iteration is not None:
            sql += " AND s.iteration <= ?"
            params.append(max_iteration)
        sql += " ORDER BY s.dev_score DESC, s.test_score DESC NULLS LAST, s.algorithm_id LIMIT ?"
        params.append(k)
        return self.records(sql, params)

    def model_paths(self, model_ids: list[str]) -> dict[str, str]:
        """model id -> where its weights are, for the given models that exist."""
        if not model_ids:
            return {}
        return dict(self.query(
            "SELECT model_id, path FROM models WHERE model_id IN (SELECT unnest(?))", [model_ids]
        )[1])

    def existing_ids(self, table: str, id_column: str, ids: list[str]) -> set[str]:
        """Which of `ids` are already in `table.id_column` (resume skips those)."""
        if table not in self._columns or id_column not in self._columns[table]:
            raise ArchiveError(f"archive has no column {table}.{id_column}")
        if not ids:
            return set()
        _, rows = self.query(
            f"SELECT DISTINCT {quote(id_column)} FROM {quote(table)} "
            f"WHERE {quote(id_column)} IN (SELECT unnest(?::VARCHAR[]))",
            [list(ids)],
        )
        return {row[0] for row in rows}

    def latest_session(self) -> dict | None:
        """The most recently started session as a dict, or None for an empty archive."""
        rows = self.records(
            "SELECT * FROM sessions ORDER BY started_at DESC, session_id DESC LIMIT 1"
        )
        return rows[0] if rows else None

    def step_done(self, session_id: str, generation: int, step: str) -> bool:
        return bool(self.scalar(
            "SELECT count(*) FROM graph_steps WHERE session_id = ? AND generation = ? AND step = ?",
            [session_id, generation, step],
        ))

    # ----------------------------------------------------------------------- export

    def tables(self) -> list[str]:
        """The archive's data tables (not `schema_version` nor the derived summary tables)."""
        rows = self._execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND table_name != 'schema_version' ORDER BY table_oid"
        ).fetchall()
        return [row[0] for row in rows if row[0] not in SUMMARY_TABLES]

    def export_parquet(self, out_dir: Path) -> dict[str, int]:
        """Write one Parquet file per table plus `manifest.json`; returns rows per table.

        Files are written under a temporary name and renamed, table by table; the manifest is
        written last, so a directory with a manifest is a complete export.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "manifest.json").unlink(missing_ok=True)
        counts: dict[str, int] = {}
        for table in self.tables():
            tmp = out_dir / f".{table}.parquet.tmp"
            self._execute(
                f"COPY (SELECT * FROM {quote(table)}) TO '{sql_path(tmp)}' "
                "(FORMAT parquet, COMPRESSION zstd)"
            )
            os.replace(tmp, out_dir / f"{table}.parquet")
            counts[table] = int(self.scalar(f"SELECT count(*) FROM {quote(table)}"))
        manifest = {"format": "coevo-archive-export", "schema_version": SCHEMA_VERSION, "rows": counts}
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return counts

    def _execute(self, sql: str, params: list[Any] | None = None) -> duckdb.DuckDBPyConnection:
        try:
            return self._con.execute(sql, params)
        except duckdb.Error as exc:
            message = one_line(str(exc))
            if DAMAGED.search(message):
                raise ArchiveError(damaged(self.source, message)) from None
            if "read-only mode" in message:
                message += (
                    f" (archive {self.path} is open read-only; open it writable to change it)"
                )
            raise ArchiveError(message) from None

    def _load_columns(self) -> dict[str, dict[str, Column]]:
        """table -> column -> its type, whether a row must give it, and its SQL default."""
        rows = self._con.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND NOT internal ORDER BY table_name, column_index"
        ).fetchall()
        tables: dict[str, dict[str, Column]] = {}
        for table, column, data_type, nullable, default in rows:
            required = not nullable and default is None
            tables.setdefault(table, {})[column] = Column(data_type, required, default)
        return tables
