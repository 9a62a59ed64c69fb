"""The coevo archive: one DuckDB file, one writer process, written in batches.

The schema lives in `schema/NNN_*.sql`; `Archive.open` applies the migrations the file has
not seen yet and records each in `schema_version`. Writers hand over `list[dict]` rows; each
batch becomes one pyarrow table and one `INSERT OR IGNORE … SELECT`, so replaying a batch on
resume is harmless and 50k evaluation rows cost one statement, not 50k.

DuckDB allows one process to hold a file writable, and no other process may open it while it
does (not even read-only). So readers never touch the live file: the writer publishes a
read-only copy, `<archive>.snapshot`, after every graph step (`publish_snapshot`) and when it
closes, by copying the checkpointed file and renaming the copy into place. Readers
(`Archive.open(read_only=True)`) open the snapshot when there is one: they never block or
break the writer, any number of them can read at once, and what they see is at most one graph
step old. Only an archive without a snapshot (never closed by a writer) is read directly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
import os
import re
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterator
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
# Summary tables: derived from `evaluations` / `sandbox_runs`, kept by `add_evaluations` /
# `add_sandbox_runs` in the writer's transaction, rebuilt after imports, never exported.
SUMMARY_TABLES = ("model_scores", "task_scores", "generation_task_scores", "model_family_scores", "latest_runs")
# Adds the sandbox runs in the registered relation `{new}` to `latest_runs`.
_ADD_RUNS_TO_SUMMARIES = """
INSERT INTO latest_runs
SELECT algorithm_id,
       arg_max(run_id, (created_at, run_id)), arg_max(verdict, (created_at, run_id)),
       arg_max(duration_s, (created_at, run_id)), arg_max(peak_memory_mb, (created_at, run_id)),
       max(created_at)
FROM {new}
GROUP BY algorithm_id
ON CONFLICT (algorithm_id) DO UPDATE SET
    run_id = excluded.run_id, verdict = excluded.verdict, duration_s = excluded.duration_s,
    peak_memory_mb = excluded.peak_memory_mb, created_at = excluded.created_at
WHERE excluded.created_at > latest_runs.created_at
   OR (excluded.created_at = latest_runs.created_at AND excluded.run_id >= latest_runs.run_id);
"""
# Recounts the evaluation summaries of the models, tasks and generations that the registered
# batch `{batch}` touches, from all their evaluations (after a partly replayed batch).
_RECOUNT_SUMMARIES = """
CREATE OR REPLACE TEMP TABLE _touched AS
SELECT DISTINCT e.model_id, e.task_id, e.judge FROM {batch} e;
CREATE OR REPLACE TEMP TABLE _touched_generations AS
SELECT DISTINCT m.session_id, m.generation
FROM _touched t JOIN models m ON m.model_id = t.model_id
WHERE m.generation IS NOT NULL;
DELETE FROM model_scores WHERE model_id IN (SELECT model_id FROM _touched);
DELETE FROM model_family_scores WHERE model_id IN (SELECT model_id FROM _touched);
DELETE FROM task_scores WHERE task_id IN (SELECT task_id FROM _touched);
DELETE FROM generation_task_scores g USING _touched_generations t
WHERE g.session_id = t.session_id AND g.generation = t.generation;
INSERT INTO model_scores
SELECT e.model_id, t.split, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM evaluations e JOIN tasks t ON t.task_id = e.task_id
WHERE e.model_id IN (SELECT model_id FROM _touched)
GROUP BY ALL;
INSERT INTO task_scores
SELECT e.task_id, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM evaluations e
WHERE e.task_id IN (SELECT task_id FROM _touched)
GROUP BY ALL;
INSERT INTO model_family_scores
SELECT e.model_id, t.family_id, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM evaluations e JOIN tasks t ON t.task_id = e.task_id
WHERE e.model_id IN (SELECT model_id FROM _touched) AND t.family_id IS NOT NULL
GROUP BY ALL;
INSERT INTO generation_task_scores
SELECT m.session_id, m.generation, e.task_id, e.judge, count(*), max(e.score)
FROM evaluations e JOIN models m ON m.model_id = e.model_id
JOIN _touched_generations t ON t.session_id = m.session_id AND t.generation = m.generation
GROUP BY ALL;
DROP TABLE _touched;
DROP TABLE _touched_generations;
"""
# Adds the evaluations in the registered relation `{new}` to the summary tables.
_ADD_TO_SUMMARIES = """
INSERT INTO model_scores
SELECT e.model_id, t.split, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM {new} e JOIN tasks t ON t.task_id = e.task_id
GROUP BY ALL
ON CONFLICT (model_id, split, judge) DO UPDATE SET
    n_tasks = model_scores.n_tasks + excluded.n_tasks,
    sum_score = model_scores.sum_score + excluded.sum_score,
    n_solved = model_scores.n_solved + excluded.n_solved;
INSERT INTO task_scores
SELECT e.task_id, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM {new} e
GROUP BY ALL
ON CONFLICT (task_id, judge) DO UPDATE SET
    n_models = task_scores.n_models + excluded.n_models,
    sum_score = task_scores.sum_score + excluded.sum_score,
    n_solved = task_scores.n_solved + excluded.n_solved;
INSERT INTO generation_task_scores
SELECT m.session_id, m.generation, e.task_id, e.judge, count(*), max(e.score)
FROM {new} e JOIN models m ON m.model_id = e.model_id
WHERE m.generation IS NOT NULL
GROUP BY ALL
ON CONFLICT (session_id, generation, task_id, judge) DO UPDATE SET
    n_models = generation_task_scores.n_models + excluded.n_models,
    best_score = greatest(generation_task_scores.best_score, excluded.best_score);
INSERT INTO model_family_scores
SELECT e.model_id, t.family_id, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM {new} e JOIN tasks t ON t.task_id = e.task_id
WHERE t.family_id IS NOT NULL
GROUP BY ALL
ON CONFLICT (model_id, family_id, judge) DO UPDATE SET
    n_tasks = model_family_scores.n_tasks + excluded.n_tasks,
    sum_score = model_family_scores.sum_score + excluded.sum_score,
    n_solved = model_family_scores.n_solved + excluded.n_solved;
"""
# The named views users rely on (documented in the README, timed in bench/archive_scale.py).
VIEWS = (
    "algorithm_scores",
    "leaderboard",
    "iteration_stats",
    "lineage",
    "verdict_breakdown",
    "task_stats",
    "coverage",
    "dpo_history",
)
# Views over what only the population modes (acdc, cycleqd) write.
POPULATION_VIEWS = ("skill_vectors", "task_pool")
SNAPSHOT_SUFFIX = ".snapshot"
WRITER_LOCK_WAIT_S = 10.0
# Fault injection for the crash tests: "TABLE:N" SIGKILLs this process inside the transaction
# of the N-th write to TABLE, after the rows went in and before the commit.
_FAULT = os.environ.get("COEVO_FAULT_KILL_IN_WRITE", "")
_fault_writes: dict[str, int] = {}


def snapshot_path(path: Path) -> Path:
    """Where readers find the published copy of the archive at `path`."""
    return Path(path).with_name(Path(path).name + SNAPSHOT_SUFFIX)

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
    # A reader of an archive without a snapshot holds the file for a moment: a writer waits.
    deadline = time.monotonic() + (0 if read_only else WRITER_LOCK_WAIT_S)
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
    if _DAMAGED.search(message):
        raise ArchiveError(_damaged(path, message)) from None
    raise ArchiveError(f"cannot open archive {path}: {message}") from None


class Archive:
    """A coevo archive file. Open with `Archive.open(path)`; use as a context manager."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
        self._con = con
        self.path = path
        self.source = path  # the file actually open: the snapshot, for readers that have one
        self.read_only = read_only
        self._in_transaction = False
        self._closed = False
        self._columns = self._load_columns()

    # ----------------------------------------------------------------- open / close

    @classmethod
    def open(cls, path: Path, *, read_only: bool = False) -> Archive:
        """Open (and, when writable, create and migrate) the archive at `path`.

        A read-only open never changes the file; it refuses an archive whose schema differs
        from this code's, saying what to do.
        """
        path = Path(path)
        source = path
        if read_only and snapshot_path(path).is_file():
            source = snapshot_path(path)
        con = _connect(source, read_only)
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
        archive = cls(con, path, read_only)
        archive.source = source
        # Readers need a snapshot of this schema; otherwise the next step or `close` publishes.
        if not read_only and (version < SCHEMA_VERSION or not snapshot_path(path).is_file()):
            archive.publish_snapshot()
        return archive

    def close(self) -> None:
        """Publish the snapshot (writers) and close the connection; a no-op when closed."""
        if self._closed:
            return
        try:
            if not self.read_only and not self._in_transaction:
                self.publish_snapshot()
        finally:
            self._closed = True
            self._con.close()

    def publish_snapshot(self) -> None:
        """Give readers the committed state: checkpoint, copy, rename over `<file>.snapshot`.

        Called by the session after every graph step and by `close`; readers that have the old
        snapshot open keep reading it (the rename does not touch their file).
        """
        self._check_writable()
        if self._in_transaction:
            raise ArchiveError("publish_snapshot inside a transaction would publish half a step")
        self._execute("CHECKPOINT")
        target = snapshot_path(self.path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(self.path, tmp)
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise ArchiveError(f"cannot publish the archive snapshot {target}: {err}") from None

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
        peak_memory_mb, stdout, stderr, created_at. `latest_runs` takes the new rows too.
        """
        new = self._insert(
            "sandbox_runs",
            rows,
            returning="algorithm_id, run_id, verdict, duration_s, peak_memory_mb, created_at",
        )
        return self._add_to_summaries(new, _ADD_RUNS_TO_SUMMARIES)

    def add_models(self, rows: list[dict[str, Any]]) -> int:
        """Insert models; returns how many were new.

        Keys: model_id, session_id, kind ('base' | 'expert' | 'baseline' | 'merged'), name;
        optional: algorithm_id, parent_ids (list[str]), mutation, path, generation, operator,
        crossover_weights (JSON), discarded_reason, created_at.
        """
        return self._insert("models", rows)

    def add_tasks(self, rows: list[dict[str, Any]]) -> int:
        """Insert tasks; returns how many were new.

        Keys: task_id, skill, split ('dev' | 'test'), prompt, origin; optional: answer,
        checker, family_id, created_at.
        """
        return self._insert("tasks", rows)

    def add_task_families(self, rows: list[dict[str, Any]]) -> int:
        """Insert task families (population modes); returns how many were new.

        Keys: family_id, session_id, generation, name, instructions, checker, params (JSON),
        action, origin, n_instances; optional: parent_id, prompt_hash, status.
        """
        return self._insert("task_families", rows)

    def remove_task_families(self, removals: list[tuple[str, str]], generation: int) -> None:
        """Mark families removed from the active pool at `generation`, with the reason each.

        A family already removed keeps its first removal (so replaying a step changes nothing).
        """
        self._check_writable()
        if not removals:
            return
        self._execute(
            "UPDATE task_families f SET status = 'removed', removed_generation = ?, removed_reason = r.reason "
            "FROM (SELECT unnest(?) AS family_id, unnest(?) AS reason) r "
            "WHERE f.family_id = r.family_id AND f.status = 'active'",
            [generation, [f for f, _ in removals], [r for _, r in removals]],
        )

    def add_task_rejections(self, rows: list[dict[str, Any]]) -> int:
        """Insert rejected task candidates with their reasons; returns how many were new."""
        return self._insert("task_rejections", rows)

    def add_population_snapshot(self, rows: list[dict[str, Any]]) -> int:
        """Insert a generation's archive of models (population or MAP-Elites cells)."""
        return self._insert("population_snapshots", rows)

    def discard_models(self, discards: list[tuple[str, str]]) -> None:
        """Record why models were discarded before selection (e.g. the gibberish filter)."""
        self._check_writable()
        if discards:
            self._execute(
                "UPDATE models m SET discarded_reason = d.reason "
                "FROM (SELECT unnest(?) AS model_id, unnest(?) AS reason) d WHERE m.model_id = d.model_id",
                [[m for m, _ in discards], [r for _, r in discards]],
            )

    def mark_step(self, session_id: str, generation: int, step: str) -> None:
        """Record that a graph step's writes are in (call inside the step's transaction)."""
        self._insert("graph_steps", [{"session_id": session_id, "generation": generation, "step": step}])

    def step_done(self, session_id: str, generation: int, step: str) -> bool:
        return bool(self.scalar(
            "SELECT count(*) FROM graph_steps WHERE session_id = ? AND generation = ? AND step = ?",
            [session_id, generation, step],
        ))

    def add_generation_metrics(self, row: dict[str, Any]) -> int:
        """Insert one generation's coverage metrics (population modes)."""
        return self._insert("generation_metrics", [row])

    def add_evaluations(self, rows: list[dict[str, Any]]) -> int:
        """Insert scores of models on tasks; returns how many were new.

        Keys: model_id, task_id, judge, score; optional: answer, created_at. The summary
        tables (`model_scores`, `task_scores`, `generation_task_scores`) take the new rows in
        the same statement group, so they always match the evaluations (inside a transaction,
        both land or neither does).
        """
        def summarise(batch: str, inserted: int) -> None:
            if inserted == len(rows):  # all new (the usual case): the batch is the increment
                self._execute(_ADD_TO_SUMMARIES.format(new=batch))
            elif inserted:  # partly a replay: recount what the batch touches
                self._execute(_RECOUNT_SUMMARIES.format(batch=batch))

        return int(self._insert("evaluations", rows, after=summarise))

    def _add_to_summaries(self, new: Any, sql: str) -> int:
        """Run a summary update over the just-inserted rows `new` (Arrow); their count."""
        if isinstance(new, int) or new.num_rows == 0:
            return 0
        view = f"_archive_new_{next(_batch_names)}"
        self._con.register(view, new)
        try:
            self._execute(sql.format(new=view))
        finally:
            self._con.unregister(view)
        return int(new.num_rows)

    def rebuild_summaries(self) -> None:
        """Recompute the summary tables from all evaluations (after an import or a merge)."""
        self._check_writable()
        own = not self._in_transaction
        if own:
            self._con.begin()
        try:
            _refill_summaries(self._con)
        except duckdb.Error as exc:
            if own:
                self._con.rollback()
            raise ArchiveError(f"rebuilding the summaries failed: {one_line(str(exc))}") from None
        except BaseException:
            if own:
                self._con.rollback()
            raise
        if own:
            self._con.commit()

    def add_preference_pairs(self, rows: list[dict[str, Any]]) -> int:
        """Insert DPO preference pairs; returns how many were new.

        Keys: pair_id, session_id, iteration, prompt_hash, chosen_algorithm_id,
        rejected_algorithm_id, chosen_score, rejected_score; optional: dpo_run_id, created_at.
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

    # ------------------------------------------------------- export / import / merge

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
                f"COPY (SELECT * FROM {_quote(table)}) TO '{_sql_path(tmp)}' "
                "(FORMAT parquet, COMPRESSION zstd)"
            )
            os.replace(tmp, out_dir / f"{table}.parquet")
            counts[table] = int(self.scalar(f"SELECT count(*) FROM {_quote(table)}"))
        manifest = {"format": "coevo-archive-export", "schema_version": SCHEMA_VERSION, "rows": counts}
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return counts

    def import_parquet(self, in_dir: Path) -> dict[str, int]:
        """Add an export's rows (rows whose key is already here are kept as they are), in one
        transaction; returns the new rows per table."""
        in_dir = Path(in_dir)
        try:
            manifest = json.loads((in_dir / "manifest.json").read_text())
        except (OSError, ValueError) as err:
            raise ArchiveError(
                f"{in_dir} is not a complete coevo archive export (manifest.json: {err})"
            ) from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArchiveError(
                f"{in_dir} was exported at schema v{version}, this coevo writes v{SCHEMA_VERSION}: "
                "export it again with this coevo (opening the source archive migrates it)"
            )
        sources = {t: f"read_parquet('{_sql_path(in_dir / f'{t}.parquet')}')" for t in manifest["rows"]}
        return self._add_from(sources)

    def merge_from(self, other: Path) -> dict[str, int]:
        """Add another archive's rows (rows whose key is already here are kept), in one
        transaction; returns the new rows per table. Ids carry their session id, so archives
        of different sessions and machines merge without collisions."""
        other = Path(other)
        if other.resolve() == self.path.resolve():
            raise ArchiveError("cannot merge an archive into itself")
        source = snapshot_path(other) if snapshot_path(other).is_file() else other
        if not source.is_file():
            raise ArchiveError(f"no archive at {other}")
        self._execute(f"ATTACH '{_sql_path(source)}' AS merge_source (READ_ONLY)")
        try:
            version = self.scalar("SELECT coalesce(max(version), 0) FROM merge_source.schema_version")
            if version != SCHEMA_VERSION:
                raise ArchiveError(
                    f"{other} has schema v{version}, this coevo writes v{SCHEMA_VERSION}: open it "
                    "once with this coevo (coevo sql --write --archive ...) to migrate it first"
                )
            return self._add_from({t: f"merge_source.{_quote(t)}" for t in self.tables()})
        finally:
            self._con.execute("DETACH merge_source")

    def _add_from(self, sources: dict[str, str]) -> dict[str, int]:
        unknown = sorted(set(sources) - set(self.tables()))
        if unknown:
            raise ArchiveError(f"unknown table(s) {unknown}: not an archive of this schema")
        added: dict[str, int] = {}
        with self.transaction():
            for table, source in sources.items():
                result = self._execute(
                    f"INSERT OR IGNORE INTO {_quote(table)} BY NAME SELECT * FROM {source}"
                ).fetchone()
                added[table] = int(result[0]) if result else 0
            self.rebuild_summaries()
        return added

    # ---------------------------------------------------------------------- helpers

    def _execute(self, sql: str, params: list[Any] | None = None) -> duckdb.DuckDBPyConnection:
        try:
            return self._con.execute(sql, params)
        except duckdb.Error as exc:
            message = one_line(str(exc))
            if _DAMAGED.search(message):
                raise ArchiveError(_damaged(self.source, message)) from None
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

    def _insert(
        self,
        table: str,
        rows: list[dict[str, Any]],
        *,
        returning: str = "",
        after: Callable[[str, int], None] | None = None,
    ) -> Any:
        """Insert `rows` into `table` in one statement, ignoring rows whose key exists.

        Returns the number of new rows, or with `returning` ("col, col") the new rows' columns
        as an Arrow table. `after(batch_view, n_new)` runs while the batch is still registered.
        """
        self._check_writable()
        if not rows:
            return 0
        columns = self._columns[table]
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
                arrays[name] = pa.array(values, type=_ARROW_TYPES.get(column.data_type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                raise ArchiveError(
                    f"{table}.{name} ({column.data_type}): {one_line(str(exc))}"
                ) from None
        missing = [n for n, c in columns.items() if c.required and n not in given]
        if missing:
            raise ArchiveError(f"{table} row 0: missing {missing}: {rows[0]!r:.200}")
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
            statement = (
                f"INSERT OR IGNORE INTO {_quote(table)} ({', '.join(map(_quote, present))}) "
                f"SELECT {select} FROM {view}"
            )
            if returning:
                with warnings.catch_warnings():  # "an extra copy": a batch, not a big result
                    warnings.simplefilter("ignore", UserWarning)
                    inserted = self._execute(f"{statement} RETURNING {returning}").to_arrow_table()
            else:
                result = self._execute(statement).fetchone()
                if after is not None:
                    after(view, int(result[0]) if result else 0)
        finally:
            self._con.unregister(view)
        if _FAULT and self._in_transaction:
            _maybe_crash(table)
        if returning:
            return inserted
        return int(result[0]) if result else 0


_DAMAGED = re.compile(r"Could not read enough bytes|[Cc]orrupt|checksum|Invalid block")


def _damaged(path: Path, message: str) -> str:
    return (
        f"archive {path} is damaged or truncated ({message}): restore it from a backup or an "
        "export (`coevo archive import`)"
    )


def _maybe_crash(table: str) -> None:
    """SIGKILL this process mid-transaction on the N-th write to TABLE ("TABLE:N"); tests only."""
    name, _, count = _FAULT.partition(":")
    if name != table:
        return
    _fault_writes[table] = _fault_writes.get(table, 0) + 1
    if _fault_writes[table] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class _Column(NamedTuple):
    data_type: str
    required: bool
    default: str | None


def _sql_path(path: Path) -> str:
    """A file path as the inside of a single-quoted SQL string."""
    return str(path).replace("'", "''")


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


def _refill_summaries(con: duckdb.DuckDBPyConnection) -> None:
    """Recompute every summary table from `evaluations` and `sandbox_runs`."""
    for table in SUMMARY_TABLES:
        con.execute(f"DELETE FROM {table}")
    con.execute(_ADD_TO_SUMMARIES.format(new="evaluations"))
    con.execute(_ADD_RUNS_TO_SUMMARIES.format(new="sandbox_runs"))


def _migrate(con: duckdb.DuckDBPyConnection, current: int) -> None:
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
                _refill_summaries(con)
            con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [version, name])
        except duckdb.Error as exc:
            con.rollback()
            raise ArchiveError(f"migration {name} failed: {one_line(str(exc))}") from None
        con.commit()
