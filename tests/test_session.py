"""Full discovery sessions on the real embedded zoo: archive contents, SIGKILL + resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import launch, read_until

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
    from sandbox.docker_pool import docker_problem

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


# ----------------------------------------------------------------------------- session lifecycle


def session_rows(workdir: Path) -> dict[str, str]:
    """session id -> status."""
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        return dict(archive.query("select session_id, status from sessions")[1])


def test_second_launch_in_a_busy_workdir_fails_at_once(tmp_path: Path, zoo_dir: Path) -> None:
    """Two launches in one workdir: the second exits at once naming the running session and
    its pid; the first finishes untouched. A SIGKILLed session leaves no stale lock."""
    config = write_config(tmp_path / "c.toml", zoo_dir)
    workdir = tmp_path / "w"
    first = launch(str(config), "--workdir", str(workdir))
    seen: list[str] = []
    line = read_until(first, "iterations x", seen)  # "[session] <id>: 2 iterations x ..."
    session_id = line.split("]", 1)[1].split(":", 1)[0].strip()
    started = time.time()
    second = subprocess.run([sys.executable, "-m", "coevo", "launch", str(config), "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=120)
    assert time.time() - started < 30
    assert second.returncode == 2
    error = second.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: workdir"), second.stderr
    assert session_id in error[0] and f"pid {first.pid}" in error[0]
    assert "Traceback" not in second.stderr
    resume = subprocess.run([sys.executable, "-m", "coevo", "launch", "--resume", "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=120)
    assert resume.returncode == 2 and session_id in resume.stderr  # a running session is not resumed twice
    output, _ = first.communicate(timeout=1200)
    assert first.returncode == 0, "".join(seen) + output
    check_complete(workdir)

    # SIGKILL: the kernel drops the lock with the process; the next launch resumes at once.
    again = launch(str(config), "--workdir", str(tmp_path / "w2"))
    read_until(again, "vetted:", [])
    os.killpg(again.pid, signal.SIGKILL)
    again.wait()
    resumed = launch("--resume", "--workdir", str(tmp_path / "w2"))
    output, _ = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, output
    check_complete(tmp_path / "w2")


def test_resume_an_older_unfinished_session_by_id(tmp_path: Path, zoo_dir: Path) -> None:
    """Two killed sessions in one workdir: `--resume` takes the latest unfinished one,
    `--resume ID` the one named; a finished or unknown id is refused in one line."""
    config = write_config(tmp_path / "c.toml", zoo_dir)
    workdir = tmp_path / "w"
    ids = []
    for _ in range(2):
        proc = launch(str(config), "--workdir", str(workdir))
        seen: list[str] = []
        line = read_until(proc, "iterations x", seen)
        ids.append(line.split("]", 1)[1].split(":", 1)[0].strip())
        read_until(proc, "vetted:", seen)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    older, newer = ids
    assert session_rows(workdir) == {older: "running", newer: "running"}

    latest = launch("--resume", "--workdir", str(workdir))
    output, _ = latest.communicate(timeout=1200)
    assert latest.returncode == 0 and f"resuming {newer}" in output, output
    assert session_rows(workdir) == {older: "running", newer: "finished"}

    named = launch("--resume", older, "--workdir", str(workdir))
    output, _ = named.communicate(timeout=1200)
    assert named.returncode == 0 and f"resuming {older}" in output, output
    assert session_rows(workdir) == {older: "finished", newer: "finished"}
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        for sid in ids:  # each finished with all its programs, each run once
            assert archive.scalar("select count(*) from algorithms where session_id = ?", [sid]) == ITERATIONS * PROGRAMS
            runs = archive.query(
                "select count(*), count(distinct algorithm_id) from sandbox_runs r join algorithms a using (algorithm_id) "
                "where a.session_id = ?", [sid])[1][0]
            assert runs[0] == runs[1]

    for which, message in ((older, "already finished"), ("no-such-session", "no session 'no-such-session'")):
        done = subprocess.run([sys.executable, "-m", "coevo", "launch", "--resume", which, "--workdir", str(workdir)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_failing_node_stops_the_session_and_resume_continues_there(tmp_path: Path, zoo_dir: Path) -> None:
    """A generator template that cannot be rendered fails the `propose` node: one line names
    the session, the node and the error, the traceback goes to a log in the workdir, the
    session is marked stopped; once the template is fixed, `--resume` continues from there."""
    from agents.prompts import DEFAULT_PROMPTS_DIR

    prompts = tmp_path / "prompts"
    shutil.copytree(DEFAULT_PROMPTS_DIR, prompts)
    template = prompts / "generator.md"
    good = template.read_text()
    template.write_text(good.replace("## New algorithm", "## New algorithm ($oops)"))
    config = write_config(tmp_path / "c.toml", zoo_dir)
    config.write_text(f'prompts_dir = "{prompts}"\n' + config.read_text())
    workdir = tmp_path / "w"
    failed = subprocess.run([sys.executable, "-m", "coevo", "launch", str(config), "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=1200)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    (line,) = [x for x in failed.stderr.splitlines() if x.startswith("error:")]
    (session_id, status), = session_rows(workdir).items()
    assert status == "stopped"
    assert f"session {session_id} stopped in node 'propose'" in line and "oops" in line
    assert "Traceback" not in failed.stderr
    log = workdir / "logs" / f"{session_id}.log"
    assert str(log) in line and "Traceback" in log.read_text() and "PromptError" in log.read_text()

    template.write_text(good)
    resumed = launch("--resume", "--workdir", str(workdir))
    output, _ = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, output
    assert f"resuming {session_id} (stopped)" in output
    check_complete(workdir)
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        # the baselines ran once, before the failure; nothing was redone on resume
        assert archive.scalar("select count(*) from graph_steps where step = 'baselines'") == 1
        assert archive.scalar("select count(*) from evaluations") == archive.scalar(
            "select count(distinct (model_id, task_id, judge)) from evaluations")


def test_judge_only_weights_in_ram_backed_scratch(tmp_path: Path, zoo_dir: Path) -> None:
    """judge.scratch_dir (here in /dev/shm): each merged model is judged as it is merged and its
    weights deleted unless it can still make the report's top-k, which are kept in the workdir.
    Scratch lost to a reboot mid-iteration is no loss (the iteration is redone), and a top-k
    model whose weights were lost before they were moved is merged again."""
    shm = Path("/dev/shm")
    scratch = (shm if shm.is_dir() else tmp_path) / f"coevo-test-{os.getpid()}-{time.time_ns()}"
    config = write_config(tmp_path / "c.toml", zoo_dir)
    config.write_text(config.read_text() + f'[judge]\nscratch_dir = "{scratch}"\n')
    workdir = tmp_path / "w"
    try:
        proc = launch(str(config), "--workdir", str(workdir))
        seen: list[str] = []
        read_until(proc, "+ judge (dev): ", seen)  # iteration 0: merging and judging
        assert "[iteration 1]" not in "".join(seen)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert 0 < len(list(scratch.iterdir())) <= 2 + 3 + 1  # in flight + contenders + the one judged
        shutil.rmtree(scratch)  # what a reboot does to /dev/shm

        resumed = launch("--resume", "--workdir", str(workdir))
        seen = []
        read_until(resumed, "[iteration 1]", seen)  # iteration 0 done again, its top-3 kept
        assert "weights: 3 kept (top 3)" in "".join(seen), "".join(seen)
        read_until(resumed, "  iteration 1: ", seen)  # the last iteration judged: the top-3 is final
        os.killpg(resumed.pid, signal.SIGKILL)
        resumed.wait()
        with Archive.open(workdir / "archive.duckdb") as archive:  # as if killed before the move
            best = f"{archive.top_algorithms(archive.scalar('select session_id from sessions'), 1)[0]['algorithm_id']}/model"
            path = archive.model_paths([best])[best]
            archive.query("update models set path = ? where model_id = ?", [str(scratch / "lost"), best])
        shutil.rmtree(path)

        resumed = launch("--resume", "--workdir", str(workdir))
        output, _ = resumed.communicate(timeout=1200)
        assert resumed.returncode == 0, output
        check_complete(workdir)
        with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
            top = [f"{a['algorithm_id']}/model" for a in archive.top_algorithms(archive.scalar("select session_id from sessions"), 3)]
            kept = dict(archive.query("select model_id, path from models where kind = 'merged' and weights_deleted_at is null")[1])
            deleted = [r[0] for r in archive.query(
                "select path from models where kind = 'merged' and weights_deleted_at is not null")[1]]
            best_path = archive.model_paths([best])[best]
            tested = archive.scalar(
                "select count(distinct model_id) from evaluations join tasks using (task_id) where split = 'test' "
                "and model_id in (select model_id from models where kind = 'merged')")
        assert "1 top-3 models' weights are gone" in output, output  # merged again, into the workdir
        assert best in top and best_path == kept[best] and sorted(kept) == sorted(top) and tested == 3
        for model in kept.values():
            assert Path(model).parent == workdir / "models" and (Path(model) / "config.json").is_file()
        assert deleted and not any(Path(p).exists() for p in deleted)
        assert not scratch.exists() or not any(scratch.iterdir())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_reviewer_verdicts_train_the_next_dpo_update(tmp_path: Path, zoo_dir: Path) -> None:
    """A session stopped after its first iteration's programs are scored; a reviewer approves
    one, rejects one and quarantines the best (`coevo review`); the resumed session's DPO update
    carries the human pairs, and the quarantined program is never an exemplar nor in the top-k."""
    config = write_config(tmp_path / "c.toml", zoo_dir)
    workdir = tmp_path / "w"
    proc = launch(str(config), "--workdir", str(workdir))
    read_until(proc, "  DPO: ", [])  # iteration 0 judged; its DPO update is training
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        sid = archive.scalar("select session_id from sessions")
        ranked = [a["algorithm_id"] for a in archive.top_algorithms(sid, 100)]
        assert archive.scalar("select count(*) from dpo_runs") == 0
    best, liked, worst = ranked[0], ranked[1], ranked[-1]
    for verdict, algorithm in (("quarantine", best), ("approve", liked), ("reject", worst)):
        done = subprocess.run([sys.executable, "-m", "coevo", "review", verdict, algorithm, "--workdir", str(workdir)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "recorded" in done.stdout, done.stdout + done.stderr

    resumed = launch("--resume", "--workdir", str(workdir))
    output, _ = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, output
    assert "from reviewers (x2)" in output
    check_complete(workdir)
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        human = archive.query("select dpo_run_id, chosen_algorithm_id, rejected_algorithm_id from preference_pairs "
                              "where source = 'human' order by pair_id")[1]
        assert human and {r[0] for r in human} == {f"{sid}/dpo/it0", f"{sid}/dpo/it1"}  # a verdict keeps training
        assert {r[1] for r in human} == {liked} and worst in {r[2] for r in human}
        assert archive.scalar("select count(*) from preference_pairs where source = 'scores'") > 0
        assert archive.scalar("select count(*) from preference_pairs where chosen_algorithm_id = ?", [best]) == 0
        exemplars = {e for (ids,) in archive.query("select exemplar_ids from algorithms where iteration = 1")[1] for e in ids}
        assert exemplars and best not in exemplars
        tested = {r[0] for r in archive.query(
            "select distinct m.algorithm_id from evaluations e join tasks t using (task_id) join models m using (model_id) "
            "where t.split = 'test' and m.kind = 'merged'")[1]}
        assert len(tested) == 3 and best not in tested
