"""Archive v3 on real DuckDB files: in-place upgrade from v2, provenance views, live snapshots,
export / import / merge, bad archive files, and the `coevo sql` / `coevo archive` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from test_archive import OK_RUNS, SESSION, fill

from archive_store import SCHEMA_VERSION, VIEWS, Archive, ArchiveError, run_sql, snapshot_path
from archive_store.db import migrations
from archive_store.summaries import SUMMARY_TABLES


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "archive.duckdb"


def fill_v3(archive: Archive) -> None:
    """`fill` plus what v3 links: generations, a DPO run and the pairs it used."""
    fill(archive)
    archive.query(
        "UPDATE models SET generation = a.iteration FROM algorithms a "
        "WHERE a.algorithm_id = models.algorithm_id"
    )
    archive.rebuild_summaries()  # generations changed after the evaluations went in
    archive.add_dpo_run(
        {"dpo_run_id": "d0", "session_id": SESSION, "iteration": 0, "base_version": 0,
         "new_version": 1, "num_pairs": 2, "config_json": {"beta": 0.1}, "final_loss": 0.5}
    )  # fmt: skip
    archive.add_preference_pairs(
        [
            {"pair_id": f"d0/p{i}", "session_id": SESSION, "iteration": 0, "prompt_hash": "p" * 16,
             "chosen_algorithm_id": "a1", "rejected_algorithm_id": rejected, "chosen_score": 1.0,
             "rejected_score": 0.5, "dpo_run_id": "d0"}
            for i, rejected in enumerate(("a0", "a4"))
        ]
    )  # fmt: skip


def make_v2_archive(path: Path) -> None:
    """An archive as coevo with schema v2 wrote it: migrations 1-2 only, with a session."""
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
        "applied_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'))"
    )
    for version, name, sql in migrations()[:2]:
        con.execute(sql)
        con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [version, name])
    con.execute(
        "INSERT INTO algorithms (algorithm_id, session_id, iteration, sample_index, "
        "generator_version, prompt_hash, temperature, code, code_hash, normalized_hash, policy_ok) "
        "VALUES ('s/it1/s000', 's', 1, 0, 1, 'p', 1.0, 'code', 'h', 'n', true)"
    )
    con.execute(
        "INSERT INTO models (model_id, session_id, kind, name, algorithm_id, parent_ids) VALUES "
        "('s/base', 's', 'base', 'base', NULL, []), "
        "('s/it1/s000/model', 's', 'merged', 'x', 's/it1/s000', ['s/base'])"
    )
    con.execute(
        "INSERT INTO dpo_runs (dpo_run_id, session_id, iteration, base_version, new_version, "
        "num_pairs, config_json) VALUES ('s/dpo/it1', 's', 1, 1, 2, 1, '{}')"
    )
    con.execute("INSERT INTO generator_versions (session_id, version, path) VALUES ('s', 0, '/m/gen'), ('s', 1, 'w/v1')")
    con.execute(
        "INSERT INTO preference_pairs (pair_id, session_id, iteration, prompt_hash, "
        "chosen_algorithm_id, rejected_algorithm_id, chosen_score, rejected_score) "
        "VALUES ('s/dpo/it1/p0000', 's', 1, 'p', 's/it1/s000', 's/it1/s000', 1.0, 0.0)"
    )
    con.close()


def test_v2_archive_upgrades_in_place(path: Path) -> None:
    make_v2_archive(path)
    with pytest.raises(ArchiveError, match="schema v2.*open it once writable"):
        Archive.open(path, read_only=True)
    with Archive.open(path) as archive:
        assert archive.scalar("SELECT max(version) FROM schema_version") == SCHEMA_VERSION == 7
        # v7: algorithms from before templates were editable have no template hash
        assert archive.query("SELECT template_hash FROM algorithms")[1] == [(None,)]
        # v5: earlier versions were full model dirs, run on their own weights, no adapter
        assert archive.query("SELECT version, weights, adapter_path, served_name FROM generator_versions "
                             "ORDER BY version")[1] == [(0, "/m/gen", None, None), (1, "w/v1", None, None)]
        assert archive.scalar("SELECT count(*) FROM algorithms") == 1
        assert archive.query("SELECT dpo_run_id FROM preference_pairs")[1] == [("s/dpo/it1",)]
        assert dict(archive.query("SELECT model_id, generation FROM models")[1]) == {
            "s/base": None,
            "s/it1/s000/model": 1,
        }
    with Archive.open(path, read_only=True) as archive:  # the published snapshot is v3
        assert archive.scalar("SELECT count(*) FROM lineage") == 1


def test_summaries_kept_on_insert_match_a_full_rebuild(path: Path) -> None:
    with Archive.open(path) as archive:
        fill_v3(archive)
        archive.add_evaluations(  # more rows later, some of them replays (ignored)
            [{"model_id": "m-a0", "task_id": "d1", "judge": "exact_match", "score": 0.0},
             {"model_id": "m-a0", "task_id": "d2", "judge": "llm", "score": 1.0},
             {"model_id": "m-b2", "task_id": "t1", "judge": "llm", "score": 0.25}]
        )  # fmt: skip
        kept = {t: sorted(archive.query(f"SELECT * FROM {t}")[1]) for t in SUMMARY_TABLES}
        archive.rebuild_summaries()
        assert {t: sorted(archive.query(f"SELECT * FROM {t}")[1]) for t in SUMMARY_TABLES} == kept
        assert archive.query(
            "SELECT n_tasks, sum_score FROM model_scores WHERE model_id = 'm-a0' AND judge = 'exact_match' AND split = 'dev'"
        )[1] == [(2, 1.0)]


def test_every_view_returns_rows(path: Path) -> None:
    with Archive.open(path) as archive:
        fill_v3(archive)
        template = archive.add_prompt("generator-template", "generator", "Merge $n_experts experts.\n$exemplars")
        archive.query("UPDATE algorithms SET template_hash = ? WHERE iteration = 1", [template])
    with Archive.open(path, read_only=True) as archive:
        for view in VIEWS:
            assert archive.scalar(f"SELECT count(*) FROM {view}") > 0, view
        assert archive.query("SELECT name, n_artifacts FROM prompt_versions")[1] == [("generator", 5)]
        lineage = archive.records("SELECT * FROM lineage WHERE model_id = 'm-a1' ORDER BY ancestor_id")
        assert [(r["ancestor_id"], r["depth"], r["algorithm_id"]) for r in lineage] == [
            ("e0", 1, "a1"),
            ("e1", 1, "a1"),
        ]
        coverage = archive.records("SELECT * FROM coverage WHERE split = 'dev' ORDER BY generation")
        # generation 0: a0 solves d1, a1 solves both; generation 1: b3 solves both
        assert [(r["generation"], r["n_covered"], r["n_tasks"]) for r in coverage] == [(0, 2, 2), (1, 2, 2)]
        tasks = {r["task_id"]: r for r in archive.records("SELECT * FROM task_stats")}
        n_ok = len(OK_RUNS)
        assert tasks["d1"]["n_models"] == n_ok + 1 and tasks["d1"]["n_solved"] == 5
        (dpo,) = archive.records("SELECT * FROM dpo_history")
        assert dpo["n_pairs_archived"] == 2 and dpo["mean_chosen"] == 1.0
        assert dpo["mean_dev_before"] == pytest.approx(0.75)  # a0 0.5, a1 1.0 (v0 programs)
        assert dpo["mean_dev_after"] == pytest.approx(0.5625)  # b0..b3 (v1 programs)


def test_readers_use_the_snapshot_published_after_each_step(path: Path) -> None:
    archive = Archive.open(path)
    try:
        fill(archive)  # committed but not yet published: readers still see the empty archive
        assert run_sql(path, "SELECT count(*) AS n FROM algorithms", fmt="csv").split() == ["n", "0"]
        archive.publish_snapshot()
        assert run_sql(path, "SELECT count(*) AS n FROM algorithms", fmt="csv").split() == ["n", "10"]
        with archive.transaction():
            with pytest.raises(ArchiveError, match="half a step"):
                archive.publish_snapshot()
    finally:
        archive.close()
    assert snapshot_path(path).is_file()
    with pytest.raises(ArchiveError, match="read-only"):
        run_sql(path, "DELETE FROM algorithms")
    assert run_sql(path, "SELECT count(*) AS n FROM algorithms", fmt="csv").split() == ["n", "10"]


def test_export_import_round_trip_and_merge(tmp_path: Path) -> None:
    first, second = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    with Archive.open(first) as archive:
        fill_v3(archive)
        exported = archive.export_parquet(tmp_path / "export")
    assert exported["algorithms"] == 10 and exported["evaluations"] == 21
    assert json.loads((tmp_path / "export" / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION == 7
    with Archive.open(second) as archive:
        added = archive.import_parquet(tmp_path / "export")
        assert added == exported
        assert archive.import_parquet(tmp_path / "export") == dict.fromkeys(exported, 0)
        assert archive.query("SELECT * FROM leaderboard")[1] == Archive.open(
            first, read_only=True
        ).query("SELECT * FROM leaderboard")[1]

    # another machine's session: same shape, its own session id prefix on every id
    other = tmp_path / "c.duckdb"
    with Archive.open(other) as archive:
        archive.add_session("other-session", "self_developing", 1, {})
        archive.add_algorithms(
            [{"algorithm_id": "other-session/it0/s000", "session_id": "other-session",
              "iteration": 0, "sample_index": 0, "generator_version": 0, "prompt_hash": "p" * 16,
              "temperature": 1.0, "code": "x", "code_hash": "h", "normalized_hash": "n",
              "policy_ok": True}]
        )  # fmt: skip
    with Archive.open(second) as archive:
        assert archive.merge_from(other)["algorithms"] == 1
        assert archive.merge_from(other)["algorithms"] == 0
        assert archive.scalar("SELECT count(DISTINCT session_id) FROM sessions") == 2
        with pytest.raises(ArchiveError, match="into itself"):
            archive.merge_from(second)
    (tmp_path / "export" / "manifest.json").write_text('{"schema_version": 2, "rows": {}}')
    with Archive.open(second) as archive, pytest.raises(ArchiveError, match="schema v2"):
        archive.import_parquet(tmp_path / "export")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty_dir_name"])
def test_bad_archive_files_give_one_line_errors(path: Path, damage: str) -> None:
    if damage == "garbage":
        path.write_bytes(b"definitely not a database" * 100)
    elif damage == "truncated":
        with Archive.open(path) as archive:
            fill(archive)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
        snapshot_path(path).unlink()
    else:
        path.mkdir()
    with pytest.raises(ArchiveError) as err:
        with Archive.open(path, read_only=True) as archive:
            archive.query("SELECT * FROM leaderboard")
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    if damage == "truncated":
        assert "damaged or truncated" in str(err.value)


def coevo(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coevo", *args], capture_output=True, text=True, cwd=cwd,
        input=stdin, env={**os.environ, "HOME": str(cwd)},
    )  # fmt: skip


def test_sql_and_archive_commands(tmp_path: Path) -> None:
    with Archive.open(tmp_path / "coevo_work" / "archive.duckdb") as archive:
        fill_v3(archive)
    done = coevo("sql", "-c", "SELECT * FROM leaderboard", "--format", "parquet", "--out", "lb.parquet", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "wrote 6 rows to lb.parquet", done.stderr
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'lb.parquet'}'").fetchall() == [(6,)]
    done = coevo("sql", "-c", "SELECT 1 AS x", "--format", "csv", "--out", "x.csv", cwd=tmp_path)
    assert (tmp_path / "x.csv").read_text() == "x\n1\n"
    done = coevo("sql", "-c", "SELECT * FROM nope", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "nope" in done.stderr
    assert "Traceback" not in done.stderr
    done = coevo("sql", "--format", "parquet", "-c", "SELECT 1", cwd=tmp_path)
    assert done.returncode == 2 and "--out" in done.stderr

    shell = coevo(
        "sql", cwd=tmp_path,
        stdin=".views\n.schema coverage\nSELECT count(*)\n  AS n FROM\n  algorithms;\n.quit\n",
    )  # fmt: skip
    assert shell.returncode == 0, shell.stderr
    assert "dpo_history" in shell.stdout and "CREATE VIEW coverage" in shell.stdout
    assert "| 10 |" in shell.stdout
    assert (tmp_path / ".cache" / "coevo" / "sql_history").is_file()

    assert coevo("archive", "export", "exp", cwd=tmp_path).returncode == 0
    done = coevo("archive", "import", "exp", "--archive", "copy.duckdb", cwd=tmp_path)
    assert done.returncode == 0 and "algorithms 10" in done.stdout, done.stderr
    done = coevo("archive", "merge", "copy.duckdb", cwd=tmp_path)
    assert done.returncode == 0 and "nothing new" in done.stdout, done.stderr
    done = coevo("archive", "import", "missing", cwd=tmp_path)
    assert done.returncode == 2 and "not a complete coevo archive export" in done.stderr
