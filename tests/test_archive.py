"""The DuckDB archive on a real file: migrations, batched idempotent writes, views, shell."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from archive_store import (
    SCHEMA_VERSION,
    Archive,
    ArchiveError,
    prompt_hash,
    run_sql,
    tables_and_views,
)

SESSION = "s1"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "archive.duckdb"


def algorithm(algorithm_id: str, iteration: int, index: int, **extra: object) -> dict:
    row = {
        "algorithm_id": algorithm_id,
        "session_id": SESSION,
        "iteration": iteration,
        "sample_index": index,
        "generator_version": iteration,
        "prompt_hash": "p" * 16,
        "temperature": 0.8,
        "code": f"def merge(task_vectors, *, name, base):\n    return sum(task_vectors)  # {algorithm_id}",
        "code_hash": f"h-{algorithm_id}",
        "normalized_hash": f"n-{algorithm_id}",
        "policy_ok": True,
    }
    row.update(extra)
    return row


# (algorithm, iteration, sandbox verdict, dev scores on d1 and d2, test score on t1)
OK_RUNS = [
    ("a0", 0, (1.0, 0.0), 1.0),  # dev 0.5
    ("a1", 0, (1.0, 1.0), 0.0),  # dev 1.0
    ("b0", 1, (1.0, 0.0), 0.5),  # dev 0.5
    ("b1", 1, (1.0, 0.5), 0.5),  # dev 0.75
    ("b2", 1, (0.0, 0.0), 0.0),  # dev 0.0
    ("b3", 1, (1.0, 1.0), 1.0),  # dev 1.0
]


def fill(archive: Archive) -> None:
    """A small hand-made session: 2 iterations, 10 programs, every kind of outcome."""
    archive.add_session(SESSION, "self_developing", 0, {"iterations": 2})
    prompt = archive.add_prompt("generator", "generator.md", "Write a merge function.")
    assert prompt == prompt_hash("Write a merge function.") and len(prompt) == 16
    archive.add_generator_version(SESSION, 0, "zoo/generator")
    archive.add_generator_version(SESSION, 1, "runs/s1/gen1", parent_version=0, dpo_run_id="d0")
    archive.add_algorithms(
        [
            algorithm("a0", 0, 0),
            algorithm("a1", 0, 1),
            algorithm("a2", 0, 2, policy_ok=False, policy_rule="no_io", policy_reason="open()"),
            algorithm("a3", 0, 3, duplicate_of="a0"),
            algorithm("a4", 0, 4),
            *(algorithm(f"b{i}", 1, i, exemplar_ids=["a1", "a0"]) for i in range(5)),
        ]
    )
    runs = [
        {"run_id": f"r-{a}", "algorithm_id": a, "runner": "process", "verdict": "ok"}
        for a, *_ in OK_RUNS
    ]
    runs += [
        # a4 ran twice: the latest run's verdict counts.
        {
            "run_id": "r-a4-1",
            "algorithm_id": "a4",
            "runner": "process",
            "verdict": "error",
            "created_at": datetime(2026, 1, 1, 0, 0),
        },
        {
            "run_id": "r-a4-2",
            "algorithm_id": "a4",
            "runner": "process",
            "verdict": "timeout",
            "created_at": datetime(2026, 1, 1, 0, 5),
            "duration_s": 30.0,
        },
        {
            "run_id": "r-b4",
            "algorithm_id": "b4",
            "runner": "process",
            "verdict": "error",
            "stderr": "RuntimeError: shape mismatch",
        },
    ]
    archive.add_sandbox_runs(runs)
    archive.add_tasks(
        [
            {
                "task_id": "d1",
                "skill": "math",
                "split": "dev",
                "prompt": "1+1",
                "answer": "2",
                "origin": "builtin",
            },
            {
                "task_id": "d2",
                "skill": "code",
                "split": "dev",
                "prompt": "len('ab')",
                "answer": "2",
                "origin": "builtin",
            },
            {
                "task_id": "t1",
                "skill": "math",
                "split": "test",
                "prompt": "2+2",
                "answer": "4",
                "origin": "builtin",
            },
        ]
    )
    models = [{"model_id": "base", "session_id": SESSION, "kind": "base", "name": "tiny"}]
    models += [
        {
            "model_id": f"m-{a}",
            "session_id": SESSION,
            "kind": "merged",
            "name": a,
            "algorithm_id": a,
            "parent_ids": ["e0", "e1"],
        }
        for a, *_ in OK_RUNS
    ]
    archive.add_models(models)
    evaluations = [
        {"model_id": "base", "task_id": t, "judge": "exact_match", "score": 0.0}
        for t in ("d1", "d2", "t1")
    ]
    for a, _, (d1, d2), t1 in OK_RUNS:
        for task, score in (("d1", d1), ("d2", d2), ("t1", t1)):
            evaluations.append(
                {
                    "model_id": f"m-{a}",
                    "task_id": task,
                    "judge": "exact_match",
                    "answer": "2",
                    "score": score,
                }
            )
    archive.add_evaluations(evaluations)


def test_migrations_apply_once_and_are_recorded(path: Path) -> None:
    with Archive.open(path) as archive:
        _, rows = archive.query("SELECT version, name FROM schema_version ORDER BY version")
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        assert rows[0][1] == "001_init.sql"
        archive.add_session(SESSION, "self_developing", 0, {"a": 1})
    with Archive.open(path) as archive:
        assert archive.scalar("SELECT count(*) FROM schema_version") == SCHEMA_VERSION
        session = archive.latest_session()
        assert session is not None and session["session_id"] == SESSION
        assert session["status"] == "running" and json.loads(session["config_json"]) == {"a": 1}


def test_read_only_refuses_other_schema_versions(path: Path) -> None:
    with Archive.open(path) as archive:
        archive.query("DELETE FROM schema_version WHERE version = ?", [SCHEMA_VERSION])
    with pytest.raises(ArchiveError, match="open it once writable") as err:
        Archive.open(path, read_only=True)
    assert "\n" not in str(err.value)
    with Archive.open(path) as archive:  # writable: migrates forward
        assert archive.scalar("SELECT max(version) FROM schema_version") == SCHEMA_VERSION
    with Archive.open(path) as archive:
        archive.query("INSERT INTO schema_version (version, name) VALUES (99, 'future.sql')")
    for read_only in (True, False):
        with pytest.raises(ArchiveError, match="upgrade coevo"):
            Archive.open(path, read_only=read_only)


def test_same_batch_twice_leaves_one_copy(path: Path) -> None:
    with Archive.open(path) as archive:
        fill(archive)
        counts = archive.query(
            "SELECT (FROM algorithms SELECT count(*)), (FROM evaluations SELECT count(*))"
        )[1]
        fill(archive)  # a resumed session replays what it already wrote
        assert (
            archive.query(
                "SELECT (FROM algorithms SELECT count(*)), (FROM evaluations SELECT count(*))"
            )[1]
            == counts
        )
        assert archive.add_algorithms([algorithm("a0", 0, 0), algorithm("new", 0, 9)]) == 1
        assert archive.existing_ids("algorithms", "algorithm_id", ["a0", "zz", "b4"]) == {
            "a0",
            "b4",
        }
        assert archive.existing_ids("algorithms", "algorithm_id", []) == set()
        with pytest.raises(ArchiveError, match="no column"):
            archive.existing_ids("algorithms; DROP TABLE x", "algorithm_id", ["a0"])


def test_bad_rows_fail_early_with_the_column_named(path: Path) -> None:
    with Archive.open(path) as archive:
        with pytest.raises(ArchiveError, match=r"unknown column\(s\) \['scor'\]"):
            archive.add_evaluations([{"model_id": "m", "task_id": "t", "judge": "j", "scor": 1}])
        with pytest.raises(ArchiveError, match=r"missing \['score'\]"):
            archive.add_evaluations([{"model_id": "m", "task_id": "t", "judge": "j"}])
        with pytest.raises(ArchiveError, match=r"evaluations.score \(DOUBLE\)"):
            archive.add_evaluations(
                [{"model_id": "m", "task_id": "t", "judge": "j", "score": "high"}]
            )
        with pytest.raises(ArchiveError, match="CHECK constraint"):
            archive.add_tasks(
                [{"task_id": "t", "skill": "s", "split": "train", "prompt": "p", "origin": "o"}]
            )
        assert archive.scalar("SELECT count(*) FROM evaluations") == 0


def test_transaction_rollback_leaves_nothing(path: Path) -> None:
    with Archive.open(path) as archive:
        with pytest.raises(RuntimeError, match="crash"):
            with archive.transaction():
                fill(archive)
                assert archive.scalar("SELECT count(*) FROM algorithms") == 10
                raise RuntimeError("crash")
        for table in ("sessions", "algorithms", "sandbox_runs", "evaluations", "prompts"):
            assert archive.scalar(f"SELECT count(*) FROM {table}") == 0
        with archive.transaction():
            fill(archive)
    with Archive.open(path, read_only=True) as archive:
        assert archive.scalar("SELECT count(*) FROM algorithms") == 10


def test_views_on_a_hand_made_session(path: Path) -> None:
    with Archive.open(path) as archive:
        fill(archive)
        archive.finish_session(SESSION, "finished")
        scores = {r["algorithm_id"]: r for r in archive.algorithm_scores(SESSION)}
        assert scores["a0"]["dev_score"] == pytest.approx(0.5)
        assert scores["a0"]["test_score"] == pytest.approx(1.0)
        assert scores["b1"]["dev_score"] == pytest.approx(0.75)
        assert scores["a0"]["n_dev_evals"] == 2 and scores["a0"]["n_test_evals"] == 1
        assert scores["a4"]["verdict"] == "timeout" and scores["a4"]["duration_s"] == 30.0
        assert scores["a2"]["verdict"] is None and scores["a2"]["dev_score"] is None
        assert {a: r["outcome"] for a, r in scores.items() if r["outcome"] != "ok"} == {
            "a2": "rejected_by_policy",
            "a3": "duplicate",
            "a4": "timeout",
            "b4": "error",
        }
        assert [r["algorithm_id"] for r in archive.algorithm_scores(SESSION, 0)] == [
            "a0",
            "a1",
            "a2",
            "a3",
            "a4",
        ]

        columns, rows = archive.query("FROM iteration_stats")
        stats = [dict(zip(columns, row, strict=True)) for row in rows]
        assert [(s["iteration"], s["generator_version"]) for s in stats] == [(0, 0), (1, 1)]
        it0, it1 = stats
        assert (it0["n_programs"], it0["n_policy_ok"], it0["n_executable"]) == (5, 4, 2)
        assert it0["executable_rate"] == pytest.approx(0.4)
        assert it0["mean_dev"] == pytest.approx(0.75)
        assert it0["median_dev"] == pytest.approx(0.75)
        assert it0["max_dev"] == pytest.approx(1.0)
        assert it0["top3_mean_dev"] == pytest.approx(0.75)
        assert (it1["n_programs"], it1["n_policy_ok"], it1["n_executable"]) == (5, 5, 4)
        assert it1["executable_rate"] == pytest.approx(0.8)
        assert it1["mean_dev"] == pytest.approx(2.25 / 4)
        assert it1["median_dev"] == pytest.approx(0.625)
        assert it1["max_dev"] == pytest.approx(1.0)
        assert it1["top3_mean_dev"] == pytest.approx(0.75)

        _, rows = archive.query(
            "SELECT iteration, verdict, n FROM verdict_breakdown WHERE session_id = ?", [SESSION]
        )
        assert {(i, v): n for i, v, n in rows} == {
            (0, "ok"): 2,
            (0, "rejected_by_policy"): 1,
            (0, "duplicate"): 1,
            (0, "timeout"): 1,
            (1, "ok"): 4,
            (1, "error"): 1,
        }

        _, rows = archive.query("SELECT algorithm_id, rank, dev_score FROM leaderboard")
        assert [r[0] for r in rows] == ["b3", "a1", "b1", "a0", "b0", "b2"]
        assert [r[1] for r in rows] == [1, 1, 3, 4, 4, 6]

        session = archive.latest_session()
        assert session is not None and session["status"] == "finished"
        assert session["finished_at"] is not None
        with pytest.raises(ArchiveError, match="no session 'nope'"):
            archive.finish_session("nope", "failed")


def test_top_algorithms(path: Path) -> None:
    with Archive.open(path) as archive:
        fill(archive)
        top = archive.top_algorithms(SESSION, 3)
        # b3 and a1 tie on dev; the better test score breaks the tie.
        assert [t["algorithm_id"] for t in top] == ["b3", "a1", "b1"]
        assert top[0]["code"].startswith("def merge(") and top[0]["dev_score"] == 1.0
        early = archive.top_algorithms(SESSION, 10, max_iteration=0)
        assert [t["algorithm_id"] for t in early] == ["a1", "a0"]
        assert archive.top_algorithms("other", 3) == []


def test_read_only_cannot_write(path: Path) -> None:
    with Archive.open(path) as archive:
        fill(archive)
    with Archive.open(path, read_only=True) as archive:
        with pytest.raises(ArchiveError, match="read-only"):
            archive.add_tasks(
                [{"task_id": "x", "skill": "s", "split": "dev", "prompt": "p", "origin": "o"}]
            )
        with pytest.raises(ArchiveError, match="read-only"):
            archive.query("DELETE FROM algorithms")
        assert archive.scalar("SELECT count(*) FROM algorithms") == 10
    with pytest.raises(ArchiveError, match="read-only.*--write"):
        run_sql(path, "DELETE FROM algorithms")
    deleted = run_sql(path, "DELETE FROM algorithms WHERE algorithm_id = 'a4'", write=True)
    assert deleted == "OK, 1 row changed"
    assert run_sql(path, "CREATE TABLE notes (note TEXT)", write=True) == "OK"
    assert "| 9 |" in run_sql(path, "SELECT count(*) AS n FROM algorithms")
    assert run_sql(path, "SELECT count(*) AS Count FROM algorithms").splitlines()[2] == "|     9 |"


def test_files_that_are_not_archives(tmp_path: Path) -> None:
    garbage = tmp_path / "notes.duckdb"
    garbage.write_bytes(b"this is not a database\n" * 500)
    for read_only in (True, False):
        with pytest.raises(ArchiveError, match="is not a coevo archive") as err:
            Archive.open(garbage, read_only=read_only)
        assert str(garbage) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ArchiveError, match="no archive at"):
        Archive.open(tmp_path / "missing.duckdb", read_only=True)
    other = tmp_path / "other.duckdb"
    import duckdb

    duckdb.connect(str(other)).execute("CREATE TABLE t (x INT)").close()
    with pytest.raises(ArchiveError, match="not a coevo archive .*without a schema_version"):
        Archive.open(other)


def test_archive_locked_by_a_running_writer(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers read the published snapshot and never touch the writer's file; a second
    writer waits for the lock, then says who holds it."""
    import archive_store.store

    monkeypatch.setattr(archive_store.store, "WRITER_LOCK_WAIT_S", 0.5)
    with Archive.open(path) as archive:
        fill(archive)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('ready', flush=True);"
            " time.sleep(30)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        assert run_sql(path, "SELECT count(*) AS n FROM algorithms", fmt="csv").split() == [
            "n",
            "10",
        ]
        with pytest.raises(
            ArchiveError, match=f"in use by a running session \\(pid {writer.pid}\\)"
        ):
            Archive.open(path)
    finally:
        writer.kill()
        writer.wait()


def test_run_sql_formats(path: Path) -> None:
    with Archive.open(path) as archive:
        fill(archive)
        archive.add_prompt("judge", "judge.md", "x" * 200)
    sql = "SELECT algorithm_id, dev_score FROM leaderboard LIMIT 2"

    table = run_sql(path, sql).splitlines()
    assert table[0] == "| algorithm_id | dev_score |"
    assert table[2] == "| b3           |         1 |"
    assert table[-1] == "(2 rows)"
    wide = run_sql(path, "SELECT text FROM prompts WHERE role = 'judge'").splitlines()[2]
    assert "x" * 59 + "…" in wide and "x" * 60 not in wide

    rows = list(csv.reader(io.StringIO(run_sql(path, sql, fmt="csv"))))
    assert rows == [["algorithm_id", "dev_score"], ["b3", "1.0"], ["a1", "1.0"]]

    assert json.loads(run_sql(path, sql, fmt="json")) == [
        {"algorithm_id": "b3", "dev_score": 1.0},
        {"algorithm_id": "a1", "dev_score": 1.0},
    ]
    with_lists = json.loads(
        run_sql(path, "SELECT parent_ids, created_at FROM models LIMIT 1 OFFSET 1", fmt="json")
    )
    assert with_lists[0]["parent_ids"] == ["e0", "e1"]

    markdown = run_sql(path, sql, fmt="markdown").splitlines()
    assert markdown == ["| algorithm_id | dev_score |", "| --- | --- |", "| b3 | 1 |", "| a1 | 1 |"]

    with pytest.raises(ArchiveError, match="unknown format"):
        run_sql(path, sql, fmt="xml")

    listing = tables_and_views(path)
    for name in (
        "algorithms",
        "evaluations",
        "leaderboard",
        "iteration_stats",
        "verdict_breakdown",
    ):
        assert f"| {name} " in listing


def test_sql_error_is_one_line_with_duckdbs_message(path: Path) -> None:
    Archive.open(path).close()
    with pytest.raises(ArchiveError) as err:
        run_sql(path, "SELEC * FROM algorithms")
    message = str(err.value)
    assert "\n" not in message
    assert 'Parser Error: syntax error at or near "SELEC"' in message
    with pytest.raises(ArchiveError, match="Catalog Error.*nope"):
        run_sql(path, "SELECT * FROM nope")


def test_bulk_evaluations_in_one_statement(path: Path) -> None:
    rows = [
        {
            "model_id": f"m{i // 500}",
            "task_id": f"t{i % 500}",
            "judge": "exact_match",
            "answer": str(i),
            "score": (i % 7) / 7,
        }
        for i in range(50_000)
    ]
    with Archive.open(path) as archive:
        started = time.perf_counter()
        assert archive.add_evaluations(rows) == 50_000
        elapsed = time.perf_counter() - started
        assert elapsed < 5.0, f"50k evaluations took {elapsed:.1f}s"
        assert archive.add_evaluations(rows[:1000]) == 0
        assert archive.scalar("SELECT count(*) FROM evaluations") == 50_000
