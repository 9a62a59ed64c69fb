"""The coevo archive: one DuckDB file, one writer process, written in batches.

The schema lives in `schema/NNN_*.sql`; `Archive.open` applies the migrations the file has
not seen yet (`archive_store.db`) and records each in `schema_version`. Writers hand over `list[dict]` rows; each
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

import itertools
import json
import os
import shutil
import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb

from archive_store import summaries
from archive_store.batches import batch_insert
from archive_store.db import (
    SCHEMA_VERSION,
    ArchiveError,
    connect,
    migrate,
    one_line,
    prompt_hash,
    quote,
    schema_version,
    sql_path,
)
from archive_store.reader import ArchiveReader

_batch_names = itertools.count()


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
    "prompt_versions",
)
# Views over what only the population modes (acdc, cycleqd) write.
POPULATION_VIEWS = ("skill_vectors", "task_pool")
SNAPSHOT_SUFFIX = ".snapshot"
# A reader of an archive without a snapshot holds the file for a moment: a writer waits this long.
WRITER_LOCK_WAIT_S = 10.0
# Fault injection for the crash tests: "TABLE:N" SIGKILLs this process inside the transaction
# of the N-th write to TABLE, after the rows went in and before the commit.
_FAULT = os.environ.get("COEVO_FAULT_KILL_IN_WRITE", "")
_fault_writes: dict[str, int] = {}


def snapshot_path(path: Path) -> Path:
    """Where readers find the published copy of the archive at `path`."""
    return Path(path).with_name(Path(path).name + SNAPSHOT_SUFFIX)


class Archive(ArchiveReader):
    """A coevo archive file. Open with `Archive.open(path)`; use as a context manager."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
        super().__init__(con, path, read_only)
        self._in_transaction = False
        self._closed = False

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
        con = connect(source, read_only, WRITER_LOCK_WAIT_S)
        try:
            version = schema_version(con, path)
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
                migrate(con, version)
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

    def resume_session(self, session_id: str) -> None:
        """Mark a stopped (or killed) session running again."""
        self._check_writable()
        self._execute(
            "UPDATE sessions SET status = 'running', finished_at = NULL WHERE session_id = ?", [session_id]
        )

    def add_prompt(self, role: str, name: str, text: str) -> str:
        """Store a prompt text once and return its hash (the id artifacts refer to).

        The hash covers the text only: the same text under another role or name keeps the
        role and name it was first stored with.
        """
        digest = prompt_hash(text)
        self._insert("prompts", [{"prompt_hash": digest, "role": role, "name": name, "text": text}])
        return digest

    def add_prompt_uses(self, session_id: str, generation: int, prompts: list[tuple[str, str, str, str]]) -> None:
        """Record that iteration / generation `generation` used these templates: (role, name,
        text, hash) each; the texts are stored too (`add_prompt`). A replay adds nothing."""
        for role, name, text, _ in prompts:
            self.add_prompt(role, name, text)
        self._insert("prompt_uses", [
            {"session_id": session_id, "generation": generation, "name": name, "prompt_hash": digest}
            for _, name, _, digest in prompts
        ])

    def add_generator_version(
        self,
        session_id: str,
        version: int,
        path: str,
        *,
        parent_version: int | None = None,
        dpo_run_id: str | None = None,
        weights: str | None = None,
        adapter_path: str | None = None,
        served_name: str | None = None,
    ) -> None:
        """Record a generator checkpoint (version 0 is the initial generator): its dir, the
        weights it runs on (default: `path`), its LoRA adapter if any, and the name it is
        sampled under behind a server or vLLM engine."""
        self._insert(
            "generator_versions",
            [
                {
                    "session_id": session_id,
                    "version": version,
                    "path": str(path),
                    "parent_version": parent_version,
                    "dpo_run_id": dpo_run_id,
                    "weights": str(weights or path),
                    "adapter_path": adapter_path,
                    "served_name": served_name,
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
        return self._add_to_summaries(new, summaries.ADD_RUNS)

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

    def move_model_weights(self, moves: dict[str, str]) -> None:
        """Record that models' weights now live at new paths (model id -> path)."""
        self._check_writable()
        if moves:
            self._execute(
                "UPDATE models m SET path = d.path "
                "FROM (SELECT unnest(?) AS model_id, unnest(?) AS path) d WHERE m.model_id = d.model_id",
                [list(moves), list(moves.values())],
            )

    def mark_weights_deleted(self, model_ids: list[str]) -> None:
        """Record that models' weights were deleted (judged, not kept); scores stay."""
        self._check_writable()
        if model_ids:
            self._execute(
                "UPDATE models SET weights_deleted_at = (now() AT TIME ZONE 'UTC') "
                "WHERE model_id IN (SELECT unnest(?)) AND weights_deleted_at IS NULL",
                [model_ids],
            )

    def mark_step(self, session_id: str, generation: int, step: str) -> None:
        """Record that a graph step's writes are in (call inside the step's transaction)."""
        self._insert("graph_steps", [{"session_id": session_id, "generation": generation, "step": step}])

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
                self._execute(summaries.ADD_EVALUATIONS.format(new=batch))
            elif inserted:  # partly a replay: recount what the batch touches
                self._execute(summaries.RECOUNT.format(batch=batch))

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
            summaries.refill(self._con)
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
        rejected_algorithm_id, chosen_score, rejected_score; optional: dpo_run_id,
        source ('scores' | 'human'), created_at.
        """
        return self._insert("preference_pairs", rows)

    def add_reviews(self, rows: list[dict[str, Any]]) -> int:
        """Insert human verdicts (never overwritten: a new verdict is a new row); returns how
        many were new. Keys: review_id, algorithm_id, verdict ('approve' | 'reject' |
        'quarantine'), note, reviewer, created_at."""
        return self._insert("reviews", rows)

    def add_dpo_run(self, row: dict[str, Any]) -> int:
        """Insert one DPO run; returns 1 if new, 0 if already recorded.

        Keys: dpo_run_id, session_id, iteration, base_version, new_version, num_pairs,
        config_json (dict or JSON str); optional: final_loss, duration_s, created_at.
        """
        return self._insert("dpo_runs", [row])

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
        sources = {t: f"read_parquet('{sql_path(in_dir / f'{t}.parquet')}')" for t in manifest["rows"]}
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
        self._execute(f"ATTACH '{sql_path(source)}' AS merge_source (READ_ONLY)")
        try:
            version = self.scalar("SELECT coalesce(max(version), 0) FROM merge_source.schema_version")
            if version != SCHEMA_VERSION:
                raise ArchiveError(
                    f"{other} has schema v{version}, this coevo writes v{SCHEMA_VERSION}: open it "
                    "once with this coevo (coevo sql --write --archive ...) to migrate it first"
                )
            return self._add_from({t: f"merge_source.{quote(t)}" for t in self.tables()})
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
                    f"INSERT OR IGNORE INTO {quote(table)} BY NAME SELECT * FROM {source}"
                ).fetchone()
                added[table] = int(result[0]) if result else 0
            self.rebuild_summaries()
        return added

    # ---------------------------------------------------------------------- helpers

    def _check_writable(self) -> None:
        if self.read_only:
            raise ArchiveError(
                f"archive {self.path} is open read-only: open it with read_only=False to write"
            )

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
        view = f"_archive_batch_{next(_batch_names)}"
        batch, statement = batch_insert(table, rows, self._columns[table], view)
        self._con.register(view, batch)
        try:
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


def _maybe_crash(table: str) -> None:
    """SIGKILL this process mid-transaction on the N-th write to TABLE ("TABLE:N"); tests only."""
    name, _, count = _FAULT.partition(":")
    if name != table:
        return
    _fault_writes[table] = _fault_writes.get(table, 0) + 1
    if _fault_writes[table] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
