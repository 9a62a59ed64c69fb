"""Full discovery sessions on the real embedded zoo: archive contents, SIGKILL + resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archive_store import Archive

pytestmark = pytest.mark.slow

ITERATIONS, PROGRAMS = 2, 12


def write_config(path: Path, zoo_dir: Path, runner: str = "process") -> Path:
    path.write_text(
        f'seed = 1\n[zoo]\ndir = "{zoo_dir}"\n[session]\niterations = {ITERATIONS}\n'
        f"[generator]\nprograms_per_iteration = {PROGRAMS}\n[sandbox]\nrunner = \"{runner}\"\n"
        "[report]\ntop_k = 3\n"
    )
    return path


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "coevo", "launch", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=env,
    )


def counts(workdir: Path) -> dict[str, int]:
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        return {
            table: archive.scalar(f"select count(*) from {table}")
            for table in ("algorithms", "sandbox_runs", "models", "evaluations", "generator_versions",
                          "dpo_runs", "preference_pairs", "sessions")
        }


def check_complete(workdir: Path) -> None:
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        (session,) = archive.query("select session_id, status from sessions")[1]
        assert session[1] == "finished"
        sid = session[0]
        per_iteration = archive.query(
            "select iteration, count(*), count(distinct sample_index) from algorithms group by 1 order by 1"
        )[1]
        assert per_iteration == [(i, PROGRAMS, PROGRAMS) for i in range(ITERATIONS)]
        # every program that passed policy and is no duplicate ran exactly once
        runnable = archive.scalar("select count(*) from algorithms where policy_ok and duplicate_of is null")
        assert archive.scalar("select count(*) from sandbox_runs") == runnable
        assert archive.scalar("select count(distinct algorithm_id) from sandbox_runs") == runnable
        # every executable program's model answered every dev task exactly once
        n_dev = archive.scalar("select count(*) from tasks where split = 'dev'")
        merged = archive.scalar("select count(*) from models where kind = 'merged'")
        assert merged == archive.scalar("select count(*) from sandbox_runs where verdict = 'ok'")
        assert merged > 0
        merged_dev_evals = archive.scalar(
            "select count(*) from evaluations e join models m using (model_id) join tasks t using (task_id) "
            "where m.kind = 'merged' and t.split = 'dev'"
        )
        assert merged_dev_evals == merged * n_dev
        assert archive.scalar("select count(*) from generator_versions where session_id = ?", [sid]) == ITERATIONS + 1
        assert archive.scalar("select count(*) from dpo_runs") == ITERATIONS
        assert archive.scalar("select count(*) from preference_pairs") > 0
        # baselines were scored on dev and test
        assert archive.scalar("select count(distinct model_id) from models where kind in ('base', 'expert', 'baseline')") == 6


def test_session_end_to_end(tmp_path: Path, zoo_dir: Path) -> None:
    """The default runner ("auto") is Docker wherever a daemon and the image are there (CI)."""
    from sandbox.docker_runner import docker_problem

    expected = "docker" if docker_problem() is None else "process"
    if expected == "process" and os.environ.get("COEVO_REQUIRE_DOCKER") == "1":
        pytest.fail(f"Docker required but unusable: {docker_problem()}")
    config = write_config(tmp_path / "c.toml", zoo_dir, runner="auto")
    proc = launch(str(config), "--workdir", str(tmp_path / "w"))
    output, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, output
    assert f"[session] sandbox runner: {expected}" in output
    with Archive.open(tmp_path / "w" / "archive.duckdb", read_only=True) as archive:
        assert archive.query("select distinct runner from sandbox_runs")[1] == [(expected,)]
    assert "Leaderboard" in output and "Per iteration" in output
    assert "baseline:task_arithmetic" in output and "baseline:ties" in output
    check_complete(tmp_path / "w")

    sql = subprocess.run(
        [sys.executable, "-m", "coevo", "sql", "--workdir", str(tmp_path / "w"), "--format", "csv",
         "-c", "select count(*) as n from algorithms"],
        capture_output=True, text=True, check=True,
    )
    assert sql.stdout.split() == ["n", str(ITERATIONS * PROGRAMS)]
    review = subprocess.run(
        [sys.executable, "-m", "coevo", "review", "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, check=True,
    )
    best = review.stdout.splitlines()[2].split()[0]
    shown = subprocess.run(
        [sys.executable, "-m", "coevo", "review", "show", best, "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, check=True,
    )
    assert "def merge" in shown.stdout and "outcome    ok" in shown.stdout


def test_sigkill_in_iteration_two_then_resume(tmp_path: Path, zoo_dir: Path) -> None:
    config = write_config(tmp_path / "c.toml", zoo_dir)
    workdir = tmp_path / "w"
    proc = launch(str(config), "--workdir", str(workdir))
    assert proc.stdout is not None
    seen = []
    deadline = time.time() + 900
    for line in proc.stdout:  # kill once iteration 1 (the second) is executing programs
        seen.append(line)
        if "[iteration 1]" in line:
            break
        assert time.time() < deadline, "".join(seen)
    for line in proc.stdout:
        seen.append(line)
        if "vetted:" in line:
            break
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    before = counts(workdir)
    assert before["algorithms"] == 2 * PROGRAMS
    assert before["dpo_runs"] == 1

    resumed = launch("--resume", "--workdir", str(workdir))
    output, _ = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, output
    assert "resuming" in output
    check_complete(workdir)
    after = counts(workdir)
    assert after["algorithms"] == before["algorithms"]
    assert after["sandbox_runs"] >= before["sandbox_runs"]
