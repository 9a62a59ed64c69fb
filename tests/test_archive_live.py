"""The archive under a real session: readers while it writes, a SIGKILL inside a step's
write, and the README's views on a finished session."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_session import ITERATIONS, PROGRAMS, check_complete, launch, write_config

from archive_store import VIEWS, Archive, snapshot_path

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"


def sql(workdir: Path, query: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coevo", "sql", "--workdir", str(workdir), "--format", "csv", "-c", query],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_twenty_readers_while_a_session_writes(tmp_path: Path, zoo_dir: Path) -> None:
    workdir = tmp_path / "w"
    proc = launch(str(write_config(tmp_path / "c.toml", zoo_dir)), "--workdir", str(workdir))
    output: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.time() + 600
    while not snapshot_path(workdir / "archive.duckdb").exists():
        assert time.time() < deadline and proc.poll() is None, "".join(output)
        time.sleep(0.5)

    queries = [f"SELECT count(*) AS n FROM {view}" for view in VIEWS]
    queries += ["SELECT count(*) AS n FROM algorithms", "SELECT count(*) AS n FROM evaluations"]
    # 20 readers in 4 waves of 5 concurrent processes: all of them while the session writes
    # (sequential readers with pauses outlasted the session on a fast hour of this machine).
    waves: list[list[int]] = []
    for wave in range(4):
        batch = [queries[(4 * wave + k) % len(queries)] for k in range(4)] + ["SELECT count(*) AS n FROM algorithms"]
        with ThreadPoolExecutor(len(batch)) as pool:
            results = list(pool.map(lambda query: sql(workdir, query), batch))
        for done in results:
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines()[0] == "n" and done.stdout.split()[1].isdigit()
        waves.append([int(r.stdout.split()[1]) for q, r in zip(batch, results, strict=True) if "FROM algorithms" in q])
    assert proc.poll() is None, "the session ended before the readers did: make it longer"
    # what readers see only grows: every reader of a wave sees at least what the previous wave saw
    assert all(max(a) <= min(b) for a, b in zip(waves, waves[1:], strict=False))

    assert proc.wait(timeout=1200) == 0, "".join(output)
    reader.join(timeout=10)
    report = "".join(output)
    # the per-iteration table the session printed: iter, gen, programs, executable, ...
    printed = [
        tuple(int(x) for x in m.groups())
        for m in re.finditer(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\d+%", report, re.MULTILINE)
    ]
    assert len(printed) == ITERATIONS
    done = sql(workdir, "SELECT iteration, generator_version, n_programs, n_executable FROM iteration_stats ORDER BY 1")
    archived = [tuple(int(x) for x in line.split(",")) for line in done.stdout.split()[1:]]
    assert archived == printed
    assert all(row[2] == PROGRAMS for row in archived)

    readme = README.read_text()
    for view in VIEWS:  # every view the README documents has rows after a session
        assert f"`{view}`" in readme, view
        done = sql(workdir, f"SELECT count(*) AS n FROM {view}")
        assert done.returncode == 0 and int(done.stdout.split()[1]) > 0, (view, done.stdout, done.stderr)


def test_sigkill_inside_a_step_write_then_resume(tmp_path: Path, zoo_dir: Path) -> None:
    workdir = tmp_path / "w"
    config = write_config(tmp_path / "c.toml", zoo_dir)
    # SIGKILL inside the transaction of the 2nd evaluations write (the judge step of
    # iteration 0; the baselines step wrote the 1st), after its rows went in, before commit.
    env = {**os.environ, "COEVO_FAULT_KILL_IN_WRITE": "evaluations:2"}
    proc = launch(str(config), "--workdir", str(workdir), env=env)
    output, _ = proc.communicate(timeout=1200)
    assert proc.returncode == -signal.SIGKILL, output

    with Archive.open(workdir / "archive.duckdb") as archive:  # replays the log, as a resume does
        merged = archive.scalar("SELECT count(*) FROM models WHERE kind = 'merged'")
        ok_runs = archive.scalar("SELECT count(*) FROM sandbox_runs WHERE verdict = 'ok'")
        assert merged == ok_runs > 0  # the execute step is whole
        judged = archive.scalar(
            "SELECT count(*) FROM evaluations e JOIN models m USING (model_id) WHERE m.kind = 'merged'"
        )
        assert judged == 0  # the judge step is absent, not half there
        assert archive.scalar("SELECT count(*) FROM model_scores WHERE model_id LIKE '%/model'") == 0
        assert archive.scalar("SELECT count(*) FROM evaluations") > 0  # baselines committed

    resumed = launch("--resume", "--workdir", str(workdir))
    out, _ = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, out
    check_complete(workdir)
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        assert archive.scalar("SELECT sum(n_tasks) FROM model_scores") == archive.scalar(
            "SELECT count(*) FROM evaluations"
        )
