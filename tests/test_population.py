"""Population modes (acdc, cycleqd) end to end on the real embedded zoo: what the archive
holds afterwards, the live display, and SIGKILL + resume in both modes."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from launching import launch

from archive_store import POPULATION_VIEWS, Archive

pytestmark = pytest.mark.slow

GENERATIONS, CHILDREN, SIZE = 3, 4, 4


def write_config(path: Path, zoo_dir: Path, mode: str, runner: str = "process", extra: str = "") -> Path:
    path.write_text(
        f'mode = "{mode}"\nseed = 1\n[zoo]\ndir = "{zoo_dir}"\n'
        f"[population]\ngenerations = {GENERATIONS}\nchildren = {CHILDREN}\nsize = {SIZE}\n"
        f"[tasks]\nadapt_every = 1\nnew_per_round = 3\ninstances = 6\n"
        f'[sandbox]\nrunner = "{runner}"\n{extra}'
    )
    return path


def check_complete(workdir: Path, mode: str) -> dict:
    """Everything a finished population session must have archived, exactly once."""
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        (sid, status, archived_mode) = archive.query("select session_id, status, mode from sessions")[1][0]
        assert (status, archived_mode) == ("finished", mode)
        metrics = archive.records("select * from generation_metrics order by generation")
        assert [m["generation"] for m in metrics] == list(range(GENERATIONS + 1))
        for m in metrics:
            assert 0 <= m["team_coverage"] <= m["population_coverage"] <= 1
            assert len(json.loads(m["team"])) == min(3, m["n_models"])
            assert len(json.loads(m["coverage_curve"])) == len(json.loads(m["team"]))
        # every generation bred CHILDREN programs, each run once in the sandbox
        per_generation = archive.query(
            "select iteration, count(*), count(distinct sample_index) from algorithms "
            "where algorithm_id like ? group by 1 order by 1", [f"{sid}/g%"],
        )[1]
        assert per_generation == [(g, CHILDREN, CHILDREN) for g in range(1, GENERATIONS + 1)]
        assert archive.scalar("select count(*) from sandbox_runs") == archive.scalar(
            "select count(distinct algorithm_id) from sandbox_runs"
        )
        children = archive.scalar("select count(*) from models where kind = 'merged' and generation >= 1 and name like 'g%'")
        assert children == archive.scalar("select count(*) from sandbox_runs where verdict = 'ok' and algorithm_id like ?", [f"{sid}/g%"])
        assert children > 0
        # lineage: every child's parents were in the archive of the generation before
        orphans = archive.scalar(
            """select count(*) from (select model_id, generation, unnest(parent_ids) as parent from models
                                     where kind = 'merged' and name like 'g%') c
               where parent not in (select model_id from population_snapshots p
                                    where p.session_id = ? and p.generation = c.generation - 1)""", [sid],
        )
        assert orphans == 0
        assert archive.scalar("select count(*) from lineage where depth >= 1") > 0
        # every kept child answered every task active when it was judged, scored by checker code
        assert archive.scalar("select count(distinct judge) from evaluations") == 1
        assert archive.scalar("select any_value(judge) from evaluations") == "checker"
        assert archive.scalar("select count(distinct generation) from population_snapshots") == GENERATIONS + 1
        for view in POPULATION_VIEWS:
            assert archive.scalar(f"select count(*) from {view}") > 0, view
        assert archive.scalar("select count(*) from task_families where action = 'seed'") > 0
        assert archive.scalar("select sum(n_tasks) from model_scores") == archive.scalar("select count(*) from evaluations")
        # the skill-vector running totals match a recount of the evaluations (replays included)
        recount = archive.query(
            "select e.model_id, t.family_id, e.judge, count(*), sum(e.score), count(*) filter (where e.score >= 1) "
            "from evaluations e join tasks t using (task_id) where t.family_id is not null group by all order by all"
        )[1]
        assert archive.query("select * from model_family_scores order by all")[1] == recount
        return {
            "families": archive.scalar("select count(*) from task_families"),
            "rejections": archive.scalar("select count(*) from task_rejections"),
            "removed": archive.scalar("select count(*) from task_families where status = 'removed'"),
            "evaluations": archive.scalar("select count(*) from evaluations"),
            "grids": [r[0] for r in archive.query("select distinct grid from population_snapshots order by 1")[1]],
            "metrics": [(m["generation"], round(m["population_coverage"], 6), m["team"].replace(sid, "SID")) for m in metrics],
        }


def test_acdc_end_to_end(tmp_path: Path, zoo_dir: Path) -> None:
    """The default runner ("auto") is Docker where a daemon and the image are there (CI)."""
    config = write_config(tmp_path / "c.toml", zoo_dir, "acdc", runner="auto")
    proc = launch(str(config), "--workdir", str(tmp_path / "w"))
    output, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, output
    for g in range(GENERATIONS + 1):  # coverage per generation, live
        assert re.search(rf"^\[generation {g}\] coverage \d", output, re.MULTILINE), output
    assert "Final team" in output and "tasks:" in output
    found = check_complete(tmp_path / "w", "acdc")
    assert found["grids"] == ["population"]
    assert found["families"] > 7  # the seeds plus families the writer added while coevolving
    with Archive.open(tmp_path / "w" / "archive.duckdb", read_only=True) as archive:
        # the population never exceeds its size and the DNS scores are stored
        sizes = archive.query("select generation, count(*) from population_snapshots group by 1 order by 1")[1]
        assert all(n <= SIZE for _, n in sizes[1:])
        assert archive.scalar("select count(*) from population_snapshots where novelty is not null") > 0
        runners = archive.query("select distinct runner from sandbox_runs")[1]
        if os.environ.get("COEVO_REQUIRE_DOCKER") == "1":
            assert runners == [("docker",)]
        # a child's code is the crossover plus the mutation, reviewable like any program
        code = archive.scalar("select code from algorithms where algorithm_id like '%/g1/c00'")
        assert "def crossover_step" in code and "def mutate" in code and "svd" in code
        rejected = archive.records("select stage, reason from task_rejections")
        assert all(r["reason"] for r in rejected)


def test_cycleqd_end_to_end(tmp_path: Path, zoo_dir: Path) -> None:
    config = write_config(tmp_path / "c.toml", zoo_dir, "cycleqd", runner="auto")
    proc = launch(str(config), "--workdir", str(tmp_path / "w"))
    output, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, output
    assert "Final team" in output and "Merged elites" in output
    found = check_complete(tmp_path / "w", "cycleqd")
    assert found["grids"] == ["add", "copy", "reverse", "upper"]  # one MAP-Elites grid per skill
    assert found["removed"] == 0  # cycleqd keeps a static task set by default
    with Archive.open(tmp_path / "w" / "archive.duckdb", read_only=True) as archive:
        assert archive.scalar("select count(*) from models where name like 'cycleqd-final%'") == 1
        code = archive.scalar("select code from algorithms where algorithm_id like '%/g1/c00'")
        assert "svd" in code


def test_acdc_sigkill_inside_a_write_then_resume(tmp_path: Path, zoo_dir: Path) -> None:
    config = write_config(tmp_path / "c.toml", zoo_dir, "acdc")
    workdir = tmp_path / "w"
    # SIGKILL inside the transaction of the 3rd evaluations write (generation 1's new tasks or
    # children), after its rows went in, before the commit.
    env = {**os.environ, "COEVO_FAULT_KILL_IN_WRITE": "evaluations:3"}
    proc = launch(str(config), "--workdir", str(workdir), env=env)
    output, _ = proc.communicate(timeout=1200)
    assert proc.returncode == -signal.SIGKILL, output
    resumed = launch("--resume", "--workdir", str(workdir))
    out, _ = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, out
    found = check_complete(workdir, "acdc")

    # the same session without a kill archives exactly the same thing
    clean = tmp_path / "clean"
    proc = launch(str(config), "--workdir", str(clean))
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out
    assert check_complete(clean, "acdc") == found


def test_cycleqd_sigkill_mid_generation_then_resume(tmp_path: Path, zoo_dir: Path) -> None:
    config = write_config(tmp_path / "c.toml", zoo_dir, "cycleqd")
    workdir = tmp_path / "w"
    proc = launch(str(config), "--workdir", str(workdir))
    assert proc.stdout is not None
    seen = []
    deadline = time.time() + 900
    for line in proc.stdout:  # kill while generation 2 is being bred
        seen.append(line)
        if line.startswith("[generation 1]"):
            break
        assert time.time() < deadline, "".join(seen)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = launch("--resume", "--workdir", str(workdir))
    out, _ = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, "".join(seen) + out
    check_complete(workdir, "cycleqd")
