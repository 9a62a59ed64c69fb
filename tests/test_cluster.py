"""Sandbox jobs and judges on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`: a
head and two worker nodes on this machine, the test process as driver).

The cluster runner must give the verdicts and guarantees of the local sandbox (a sample of the
hostile suite goes through it), keep going when a node dies mid-batch (every job answered
exactly once), say which node cannot read which path, and a session on the cluster must archive
what the same session archives on one machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CLUSTER_SECRET_VAR
from launching import launch, read_until
from test_sandbox_hostile import CASES, Case, Host, assert_sane

from agents.cluster import JudgePool, LatencyJudge
from agents.config import ClusterConfig, DiscoveryConfig
from archive_store import Archive
from sandbox.cluster import RayRunner
from sandbox.config import SandboxConfig
from sandbox.jobs import MergeJob, SandboxUnavailable
from sandbox.runners import run_many

pytestmark = pytest.mark.ray

TA = "import torch\n\n\ndef merge(task_vectors, *, name, base):\n    return sum(task_vectors) / len(task_vectors)\n"


def _sandbox(**overrides: Any) -> SandboxConfig:
    values: dict[str, Any] = {"runner": "auto", "workers": 1, "pool_size": 1, "timeout_s": 20, "memory_mb": 1024}
    return SandboxConfig(**(values | overrides))


def _jobs(tiny_models: dict[str, Any], out: Path, n: int, source: str = TA) -> list[MergeJob]:
    return [MergeJob(source, tiny_models["base"], list(tiny_models["experts"]), out / f"m{i}") for i in range(n)]


@pytest.fixture(scope="module")
def cluster_runner(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayRunner]:
    runner = RayRunner(ray_cluster.address, _sandbox(), scratch_dir=tmp_path_factory.mktemp("cluster-scratch"))
    yield runner
    runner.close()


# --- the runner ---------------------------------------------------------------------------


def test_jobs_run_on_every_node_with_the_local_verdicts(
    cluster_runner: RayRunner, tiny_models: dict[str, Any], tmp_path: Path
) -> None:
    assert len([n for n in cluster_runner.nodes if n["alive"]]) == 3
    assert cluster_runner.slots == 3
    before = {n["node_id"]: n["jobs"] for n in cluster_runner.nodes}
    jobs = _jobs(tiny_models, tmp_path, 6)
    results = run_many(cluster_runner, jobs, workers=cluster_runner.slots)
    assert [r.verdict for r in results] == ["ok"] * 6, [r.reason for r in results]
    for job in jobs:
        assert (job.out_dir / "config.json").is_file()
    local_kind = "docker" if "docker" in cluster_runner.description else "process"
    assert {r.runner.split("@")[0] for r in results} == {local_kind}
    spread = [n["jobs"] - before[n["node_id"]] for n in cluster_runner.nodes]
    assert sum(spread) == 6 and sum(1 for s in spread if s) >= 2, spread  # not all on one node

    broken = cluster_runner.run(MergeJob("def merge(task_vectors, *, name, base):\n    return 1 / 0\n",
                                         tiny_models["base"], list(tiny_models["experts"]), tmp_path / "bad"))
    assert broken.verdict == "runtime_error" and "ZeroDivisionError" in broken.reason
    assert not (tmp_path / "bad").exists()


def test_a_node_that_cannot_read_a_model_is_named(cluster_runner: RayRunner, tiny_models: dict[str, Any],
                                                  tmp_path: Path) -> None:
    cluster_runner.check_paths([tiny_models["base"], *tiny_models["experts"]], [tmp_path / "models"])
    missing = tmp_path / "not-shared"
    with pytest.raises(SandboxUnavailable) as err:
        cluster_runner.check_paths([tiny_models["base"], missing])
    message = str(err.value)
    assert "\n" not in message and str(missing) in message and message.startswith("node ")
    assert "storage every node sees" in message


def _sample() -> list[Case]:
    """One run-time case of each verdict and two policy rejections, none of them an xfail."""
    picked: dict[str, Case] = {}
    policy = []
    for case in CASES:
        if case.xfail:
            continue
        if case.runs and case.verdict not in picked:
            picked[case.verdict] = case
        elif not case.runs and len(policy) < 2:
            policy.append(case)
    return [*picked.values(), *policy]


_limited: dict[tuple[float, int], RayRunner] = {}


@pytest.fixture(scope="module")
def limited_runners(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    yield _limited
    for runner in _limited.values():
        runner.close()
    _limited.clear()


@pytest.mark.parametrize("case", _sample(), ids=lambda c: c.id)
def test_hostile_sample_through_the_cluster(case: Case, ray_cluster: Any, limited_runners: dict,
                                            tiny_models: dict[str, Any], tmp_path: Path) -> None:
    key = (float(case.limits["timeout_s"]), int(case.limits["memory_mb"]))
    if key not in limited_runners:
        limited_runners[key] = RayRunner(ray_cluster.address, _sandbox(timeout_s=key[0], memory_mb=key[1]))
    host = Host.record(tiny_models, tmp_path, os.environ[CLUSTER_SECRET_VAR])
    source = host.source(case.source)
    result = limited_runners[key].run(host.job(source))
    assert_sane(result, case.limits)
    assert result.verdict == case.verdict, result
    if case.verdict == "rejected_by_policy":
        assert case.reason is not None and result.reason.startswith(case.reason), result.reason
    elif case.reason is not None:
        assert case.reason in result.reason, result.reason
    host.assert_unchanged(result)


def test_a_node_removed_mid_batch_loses_no_job(ray_cluster: Any, tiny_models: dict[str, Any], tmp_path: Path) -> None:
    doomed = ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    runner = RayRunner(ray_cluster.address, _sandbox(runner="process"), max_retries=2)
    try:
        assert runner.slots == 4
        doomed_id = doomed.node_id
        jobs = _jobs(tiny_models, tmp_path, 12)
        removed = threading.Event()

        def remove_when_busy(_: Any) -> None:
            if removed.is_set():
                return
            deadline = time.time() + 60
            while runner._nodes[doomed_id].in_flight == 0 and time.time() < deadline:
                time.sleep(0.01)
            ray_cluster.remove_node(doomed)
            removed.set()

        results = run_many(runner, jobs, workers=runner.slots, on_result=remove_when_busy)
        assert removed.is_set()
        assert len(results) == 12 and [r.verdict for r in results] == ["ok"] * 12, [r.reason for r in results]
        assert all((job.out_dir / "config.json").is_file() for job in jobs)
        dead = [n for n in runner.nodes if not n["alive"]]
        assert [n["node_id"] for n in dead] == [doomed_id]
        assert runner.retried >= 1  # the job in flight on the removed node ran again elsewhere
        assert sum(n["jobs"] for n in runner.nodes) == 12  # each job finished exactly once
    finally:
        runner.close()


def test_jobs_lost_on_every_node_are_a_sandbox_error(ray_cluster: Any, tiny_models: dict[str, Any],
                                                     tmp_path: Path) -> None:
    runner = RayRunner(ray_cluster.address, _sandbox(runner="process"), max_retries=1)
    try:
        for node in runner._nodes.values():  # every actor gone, and no new one can start
            runner._kill(node.actor)
        runner._refresh = lambda: None  # type: ignore[method-assign]
        result = runner.run(_jobs(tiny_models, tmp_path, 1)[0])
        assert result.verdict == "sandbox_error"
        assert result.reason.startswith("lost on 2 node(s)") and "died" in result.reason
    finally:
        runner.close()


# --- judges -------------------------------------------------------------------------------


def test_judge_pool_spreads_candidates_and_survives_a_dead_actor(ray_cluster: Any) -> None:
    pool = JudgePool(ray_cluster.address, DiscoveryConfig(), Path("."), actors=3, actor_class=LatencyJudge,
                     actor_args=(0.3,), gpus=0.0)
    try:
        items = [(Path(f"/models/m{i}"), ["t1", "t2"]) for i in range(9)]
        start = time.perf_counter()
        answers = list(pool.answer_many(items))
        took = time.perf_counter() - start
        assert answers == [[f"m{i}:t1", f"m{i}:t2"] for i in range(9)]
        assert took < 9 * 0.3 * 0.75, took  # three at a time, not one after another

        import ray

        victim = pool.actors[0]
        stream = pool.answer_many(items)
        first = next(stream)
        ray.kill(victim, no_restart=True)
        rest = list(stream)
        assert [first, *rest] == answers  # every candidate answered once, in order
        assert victim not in pool.actors and len(pool.actors) == 3
    finally:
        pool.close()


def test_judge_actor_answers_as_the_local_judge(ray_cluster: Any, tiny_models: dict[str, Any]) -> None:
    from agents.answerer import Answerer
    from agents.tasks import Task

    tasks = [Task(f"t{i}", "add", "dev", f"{i} + {i} =", str(2 * i)) for i in range(4)]
    config = DiscoveryConfig()
    local = Answerer(tiny_models["base"], max_new_tokens=config.judge.max_new_tokens)
    expected = [local.answer_tasks(Path(d), tasks) for d in tiny_models["experts"]]
    pool = JudgePool(ray_cluster.address, config, tiny_models["base"], actors=2)
    try:
        assert list(pool.answer_many([(Path(d), tasks) for d in tiny_models["experts"]])) == expected
        assert pool.answer_tasks(Path(tiny_models["experts"][0]), tasks) == expected[0]
    finally:
        pool.close()


# --- config and sessions ------------------------------------------------------------------


def test_no_cluster_no_ray_import(tmp_path: Path) -> None:
    (tmp_path / "w" / "models").mkdir(parents=True)
    (tmp_path / "base").mkdir()
    code = (
        "import sys, contextlib\n"
        "from pathlib import Path\n"
        "from coevo.config import Config\n"
        "from coevo import session, cli\n"
        "with contextlib.ExitStack() as stack:\n"
        f"    runner, slots, judges = session._runners(Config(), Path({str(tmp_path / 'w')!r}), Path({str(tmp_path / 'base')!r}), [], stack)\n"
        "assert slots == 0 and judges is None, (slots, judges)\n"
        "assert 'ray' not in sys.modules, 'ray imported without [cluster]'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_cluster_config_is_validated() -> None:
    assert ClusterConfig().address == ""
    assert ClusterConfig(address=" auto ").address == "auto"
    assert ClusterConfig(address="ray://head:10001").address == "ray://head:10001"
    with pytest.raises(ValueError, match="'auto', 'ray://host:port'"):
        ClusterConfig(address="head-node")


def test_unreachable_cluster_is_one_line(tmp_path: Path, tiny_models: dict[str, Any]) -> None:
    experts = ", ".join(f'"{e}"' for e in tiny_models["experts"])
    config = tmp_path / "c.toml"
    config.write_text('[cluster]\naddress = "127.0.0.1:1"\n[sandbox]\nrunner = "process"\n'
                      f'[models]\nbase = "{tiny_models["base"]}"\nexperts = [{experts}]\ntasks = "{tmp_path}"\n')
    proc = launch(str(config), "--workdir", str(tmp_path / "w"))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in output
    assert "cannot connect to the Ray cluster at '127.0.0.1:1'" in output, output


SESSION_ITERATIONS, SESSION_PROGRAMS = 1, 8


def _session_config(path: Path, zoo_dir: Path, mode: str, address: str = "") -> Path:
    cluster = f'[cluster]\naddress = "{address}"\n' if address else ""
    if mode == "selfdev":
        body = (f"[session]\niterations = {SESSION_ITERATIONS}\n[generator]\nprograms_per_iteration = {SESSION_PROGRAMS}\n"
                "[report]\ntop_k = 2\n")
    else:
        body = ("[population]\ngenerations = 2\nchildren = 3\nsize = 3\n"
                "[tasks]\nadapt_every = 1\nnew_per_round = 2\ninstances = 4\n")
    path.write_text(f'mode = "{mode}"\nseed = 3\n[zoo]\ndir = "{zoo_dir}"\n[sandbox]\nrunner = "process"\n'
                    f"{body}{cluster}")
    return path


def _archived(workdir: Path) -> dict[str, list[tuple]]:
    """What a session archived, without timings, node names and the session's id."""
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        sid = archive.scalar("select session_id from sessions")
        assert archive.scalar("select status from sessions") == "finished"

        def rows(sql: str) -> list[tuple]:
            return [tuple(str(v).replace(sid, "SID") for v in row) for row in archive.query(sql)[1]]

        return {
            "algorithms": rows("select algorithm_id, code_hash, policy_ok, duplicate_of from algorithms order by 1"),
            "sandbox_runs": rows("select algorithm_id, verdict, reason from sandbox_runs order by 1"),
            "models": rows("select model_id, kind, algorithm_id from models order by 1"),
            "evaluations": rows("select model_id, task_id, judge, answer, score from evaluations order by 1, 2, 3"),
        }


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["selfdev", "acdc"])
def test_a_session_on_the_cluster_archives_what_one_machine_does(
    mode: str, ray_cluster: Any, zoo_dir: Path, tmp_path: Path
) -> None:
    outputs = {}
    for where, address in (("local", ""), ("cluster", ray_cluster.address)):
        config = _session_config(tmp_path / f"{where}.toml", zoo_dir, mode, address)
        proc = launch(str(config), "--workdir", str(tmp_path / where))
        outputs[where], _ = proc.communicate(timeout=1500)
        assert proc.returncode == 0, outputs[where]
    assert "[session] sandbox runner: ray cluster (3 nodes" in outputs["cluster"]
    assert "[judge]" in outputs["cluster"] and "judge actors on the cluster" in outputs["cluster"]
    local, cluster = _archived(tmp_path / "local"), _archived(tmp_path / "cluster")
    assert local["sandbox_runs"] and local["evaluations"]
    for table in local:
        assert cluster[table] == local[table], table
    with Archive.open(tmp_path / "cluster" / "archive.duckdb", read_only=True) as archive:
        assert {r[0].split("@")[0] for r in archive.query("select distinct runner from sandbox_runs")[1]} == {"process"}


@pytest.mark.slow
def test_a_node_removed_mid_session_loses_nothing(ray_cluster: Any, zoo_dir: Path, tmp_path: Path) -> None:
    doomed = ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    config = _session_config(tmp_path / "c.toml", zoo_dir, "selfdev", ray_cluster.address)
    proc = launch(str(config), "--workdir", str(tmp_path / "w"))
    seen: list[str] = []
    try:
        read_until(proc, "vetted:", seen)  # the execute step starts next
        time.sleep(1.0)
        ray_cluster.remove_node(doomed)
        output, _ = proc.communicate(timeout=1500)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(seen) + output
    assert proc.returncode == 0, output
    with Archive.open(tmp_path / "w" / "archive.duckdb", read_only=True) as archive:
        assert archive.scalar("select status from sessions") == "finished"
        runnable = archive.scalar("select count(*) from algorithms where policy_ok and duplicate_of is null")
        assert runnable > 0
        assert archive.scalar("select count(*) from sandbox_runs") == runnable
        assert archive.scalar("select count(distinct algorithm_id) from sandbox_runs") == runnable
        assert archive.scalar("select count(*) from sandbox_runs where verdict = 'sandbox_error'") == 0
        n_dev = archive.scalar("select count(*) from tasks where split = 'dev'")
        merged = archive.scalar("select count(*) from models where kind = 'merged'")
        assert merged == archive.scalar("select count(*) from sandbox_runs where verdict = 'ok'") > 0
        per_model = archive.query(
            "select e.model_id, count(*), count(distinct e.task_id) from evaluations e join models m using (model_id) "
            "join tasks t using (task_id) where m.kind = 'merged' and t.split = 'dev' group by 1"
        )[1]
        assert len(per_model) == merged and all(n == n_dev == distinct for _, n, distinct in per_model)
