"""The Docker runner against a real daemon: container confinement, warm pool, cold mode,
checker jobs, the CLI. Required (not skipped) in CI, where COEVO_REQUIRE_DOCKER=1."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox.cli import add_sandbox_parser
from sandbox.jobs import CheckJob, MergeJob, SandboxLimits

pytestmark = pytest.mark.docker

HEADER = "import torch\n\n\ndef merge(task_vectors, *, name, base):\n"
MEAN = HEADER + "    return torch.stack(task_vectors).mean(dim=0)\n"
SPIN = HEADER + "    while True:\n        pass\n"

# Raw Python run in a container confined exactly as the runner confines jobs (no harness, no
# RestrictedPython): what hostile code would meet if it escaped both.
PROBE = r"""
import json, os, socket, subprocess
out = {}
def attempt(key, fn):
    try:
        fn()
        out[key] = "allowed"
    except Exception as err:
        out[key] = type(err).__name__
attempt("connect", lambda: socket.create_connection(("1.1.1.1", 53), timeout=2))
attempt("dns", lambda: socket.getaddrinfo("example.com", 80))
attempt("write_root", lambda: open("/etc/pwned", "w"))
attempt("write_opt", lambda: open("/opt/coevo/pwned", "w"))
attempt("write_input", lambda: open("/in/0/pwned", "w"))
attempt("write_out", lambda: open("/out/ok", "w").write("x"))
attempt("tmp_small", lambda: open("/tmp/ok", "w").write("x" * 1000))
attempt("tmp_fill", lambda: open("/tmp/big", "wb").write(b"x" * (80 * 1024 * 1024)))
attempt("docker_sock", lambda: open("/var/run/docker.sock"))
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
out["uid"] = os.getuid()
out["cap_eff"] = status["CapEff"].strip()
out["no_new_privs"] = status["NoNewPrivs"].strip()
out["seccomp"] = status["Seccomp"].strip()
out["interfaces"] = sorted(os.listdir("/sys/class/net"))
out["env"] = dict(os.environ)
procs = []
try:
    for _ in range(200):
        procs.append(subprocess.Popen(["sleep", "30"]))
    out["fork"] = "allowed"
except Exception as err:
    out["fork"] = type(err).__name__
for p in procs:
    p.kill()
try:
    limit = open("/sys/fs/cgroup/memory/memory.limit_in_bytes").read()
except OSError:
    limit = open("/sys/fs/cgroup/memory.max").read()
out["memory_limit"] = int(limit)
print(json.dumps(out))
"""


def _runner(**options: Any) -> Any:
    from sandbox.docker_runner import DockerRunner

    limits = options.pop("limits", SandboxLimits(timeout_s=30, memory_mb=1024))
    return DockerRunner(limits, **options)


def _job(tiny_models: dict, source: str, out: Path) -> MergeJob:
    return MergeJob(source, tiny_models["base"], list(tiny_models["experts"]), out)


def _sandbox_containers(runner: Any) -> list[Any]:
    from sandbox.docker_pool import LABEL

    return [
        c
        for c in runner.client.containers.list(all=True, filters={"label": LABEL}, ignore_removed=True)
        if c.name.startswith("coevo-sandbox-") and (runner.scratch / c.name).exists()
    ]


def test_container_is_confined(
    docker_ready: None, tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COEVO_HOST_SECRET", "s3cret")
    runner = _runner(pool_size=0, scratch_mb=64)
    out = tmp_path / "out"
    out.mkdir()
    runner._make_dir(out / "x")
    kwargs = runner._container_kwargs(
        ((Path(tiny_models["base"]).resolve(), "/in/0"),),
        out / "x",
        ["python3", "-c", PROBE],
        "coevo-sandbox-probe",
    )
    container = runner.client.containers.create(**kwargs)
    try:
        container.start()
        assert container.wait(timeout=120)["StatusCode"] == 0, container.logs()
        probe = json.loads(container.logs(stdout=True, stderr=False).decode().strip().splitlines()[-1])
    finally:
        container.remove(force=True)
        runner.close()
    assert probe["connect"] == "OSError" and probe["dns"] in ("gaierror", "OSError")
    assert probe["interfaces"] == ["lo"]
    assert probe["write_root"] == "OSError" and probe["write_opt"] == "OSError"
    assert probe["write_input"] == "OSError"  # weights are mounted read-only
    assert probe["write_out"] == "allowed" and probe["tmp_small"] == "allowed"
    assert probe["tmp_fill"] == "OSError"  # /tmp is a 64 MB tmpfs
    assert probe["docker_sock"] == "FileNotFoundError"
    assert probe["uid"] != 0
    assert probe["cap_eff"] == "0000000000000000"
    assert probe["no_new_privs"] == "1" and probe["seccomp"] == "2"
    assert probe["fork"] in ("BlockingIOError", "OSError")  # pids limit
    assert probe["memory_limit"] == (1024 + 768) * 1024 * 1024
    assert "COEVO_HOST_SECRET" not in probe["env"] and probe["env"]["HOME"] == "/tmp"
    assert "s3cret" not in json.dumps(probe)


def test_warm_pool_reuses_containers_and_retires_after_violations(
    docker_ready: None, tiny_models: dict, tmp_path: Path
) -> None:
    runner = _runner(
        pool_size=1, jobs_per_container=3, limits=SandboxLimits(timeout_s=3, memory_mb=1024)
    )
    try:
        first = runner.run(_job(tiny_models, MEAN, tmp_path / "m0"))
        assert first.verdict == "ok", first
        (before,) = _sandbox_containers(runner)
        timings = []
        for i in (1, 2):
            result = runner.run(_job(tiny_models, MEAN, tmp_path / f"m{i}"))
            assert result.verdict == "ok", result
            timings.append(result.duration_s)
        assert [c.id for c in _sandbox_containers(runner)] == [before.id]
        assert max(timings) < 1.0  # torch already imported: no container start, no import

        # the third job retired it (jobs_per_container=3): a fresh container serves the next
        started = time.monotonic()
        spin = runner.run(_job(tiny_models, SPIN, tmp_path / "spin"))
        assert spin.verdict == "timeout" and spin.runner == "docker"
        assert time.monotonic() - started < 3 + 15
        assert not (tmp_path / "spin").exists()
        after = runner.run(_job(tiny_models, MEAN, tmp_path / "m3"))
        assert after.verdict == "ok"
        ids = {c.id for c in _sandbox_containers(runner)}
        assert before.id not in ids and len(ids) == 1
    finally:
        runner.close()
    assert _sandbox_containers(runner) == []


def test_cold_mode_runs_one_container_per_job(
    docker_ready: None, tiny_models: dict, tmp_path: Path
) -> None:
    runner = _runner(pool_size=0)
    try:
        result = runner.run(_job(tiny_models, HEADER + "    print('cold', name)\n    return base * 0\n", tmp_path / "m"))
        assert result.verdict == "ok", result
        assert "cold lm_head.weight" in result.stdout
        assert (tmp_path / "m" / "config.json").is_file()
        assert _sandbox_containers(runner) == []
        assert "cold container per job" in runner.description
    finally:
        runner.close()


def test_checker_jobs_run_without_weights(docker_ready: None) -> None:
    runner = _runner(pool_size=1)
    source = (
        "import re\n\n\ndef check(answer, instance):\n"
        "    found = re.findall(r'-?\\d+', answer)\n"
        "    return bool(found) and int(found[-1]) == instance['sum']\n"
    )
    cases = [
        {"answer": "the answer is 7", "instance": {"sum": 7}},
        {"answer": "8", "instance": {"sum": 7}},
        {"answer": "3", "instance": {}},
    ]
    try:
        result = runner.run_check(CheckJob(source, cases))
        assert result.verdict == "ok", result
        assert result.scores == [1.0, 0.0, 0.0]
        assert result.errors is not None and result.errors[2] and "KeyError" in result.errors[2]
        hostile = runner.run_check(CheckJob("import os\n\ndef check(answer, instance):\n    return 1\n", cases))
        assert hostile.verdict == "rejected_by_policy" and hostile.reason.startswith("import:")
    finally:
        runner.close()


def test_unreadable_models_give_a_clear_error(docker_ready: None, tmp_path: Path) -> None:
    import os
    import shutil

    from coevo.zoo.tiny import save_tiny_llama

    if os.getuid() != 0:
        pytest.skip("the container runs as the host user: it reads what the user reads")
    base = save_tiny_llama(tmp_path / "base", seed=0)
    expert = tmp_path / "expert"
    shutil.copytree(base, expert)
    (expert / "model.safetensors").chmod(0o600)
    runner = _runner(pool_size=1)
    try:
        result = runner.run(MergeJob(MEAN, base, [expert], tmp_path / "out"))
    finally:
        runner.close()
    assert result.verdict == "sandbox_error"
    assert "not readable by the sandbox user" in result.reason and "chmod -R a+rX" in result.reason


@pytest.fixture(scope="module")
def model_roots(tiny_models: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A zoo root holding the base and a models root holding six children of generation 1."""
    from coevo.zoo.tiny import perturbed_copy

    top = tmp_path_factory.mktemp("roots")
    zoo, models = top / "zoo", top / "models"
    base = Path(shutil.copytree(tiny_models["base"], zoo / "base"))
    children = [perturbed_copy(base, models / "gen1" / f"child{i}", seed=10 + i) for i in range(6)]
    return {"zoo": zoo, "models": models, "base": base, "children": children}


def _mean_merged(base: Path, experts: list[Path], out: Path) -> dict[str, Any]:
    """The weights MEAN gives, merged on the host with the same merging code."""
    import torch
    from safetensors.torch import load_file

    from merging.apply import merge_models

    merge_models(lambda tvs, *, name, base: torch.stack(tvs).mean(dim=0), base, experts, out)
    return load_file(out / "model.safetensors")


def _assert_same_weights(model_dir: Path, expected: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import load_file

    merged = load_file(model_dir / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, rtol=0, atol=1e-6), name


def _wait_for(condition: Any, timeout_s: float = 60.0) -> None:
    """Containers are removed and replaced in background threads: wait for them to settle."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out waiting for the containers to settle"
        time.sleep(0.2)


def test_shared_input_roots_serve_every_parent_pair_from_one_pool(
    docker_ready: None, model_roots: dict, tiny_models: dict, tmp_path: Path
) -> None:
    from coevo.zoo.tiny import perturbed_copy

    base, children = model_roots["base"], model_roots["children"]
    runner = _runner(pool_size=1, input_roots=[model_roots["zoo"], model_roots["models"]])
    try:
        assert "2 shared input roots" in runner.description
        pairs = [[children[i], children[i + 1]] for i in range(5)]
        container_ids = []
        for i, experts in enumerate(pairs):
            result = runner.run(MergeJob(MEAN, base, experts, tmp_path / f"pair{i}"))
            assert result.verdict == "ok", result
            container_ids.append([c.id for c in _sandbox_containers(runner)])
            expected = _mean_merged(base, experts, tmp_path / f"expected{i}")
            _assert_same_weights(tmp_path / f"pair{i}", expected)
        assert len(container_ids[0]) == 1 and all(ids == container_ids[0] for ids in container_ids)

        # a child written into a root after the pool started is visible to the same container
        newborn = perturbed_copy(children[0], model_roots["models"] / "gen2" / "child0", seed=99)
        result = runner.run(MergeJob(MEAN, base, [newborn, children[5]], tmp_path / "newborn"))
        assert result.verdict == "ok", result
        assert [c.id for c in _sandbox_containers(runner)] == container_ids[0]

        # models outside the roots get their own pool, as before
        outside = list(tiny_models["experts"][:2])
        result = runner.run(MergeJob(MEAN, tiny_models["base"], outside, tmp_path / "outside"))
        assert result.verdict == "ok", result
        _assert_same_weights(
            tmp_path / "outside", _mean_merged(tiny_models["base"], outside, tmp_path / "expected")
        )
        ids = {c.id for c in _sandbox_containers(runner)}
        assert len(ids) == 2 and container_ids[0][0] in ids
    finally:
        runner.close()
    assert _sandbox_containers(runner) == []


def test_shared_roots_are_mounted_read_only(
    docker_ready: None, model_roots: dict, tmp_path: Path
) -> None:
    zoo, models = model_roots["zoo"].resolve(), model_roots["models"].resolve()
    runner = _runner(pool_size=1, input_roots=[zoo, models])
    try:
        experts = model_roots["children"][:2]
        result = runner.run(MergeJob(MEAN, model_roots["base"], experts, tmp_path / "m"))
        assert result.verdict == "ok", result
        (container,) = _sandbox_containers(runner)
        container.reload()
        mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in container.attrs["Mounts"]}
        assert mounts == {
            "/roots/0": (str(zoo), False),
            "/roots/1": (str(models), False),
            "/out": (str(runner.scratch / container.name), True),
        }
        # what hostile code that escaped the harness would meet: even a dir the sandbox user
        # may write to on the host is a read-only file system in the container
        writable = models / "world-writable"
        writable.mkdir(exist_ok=True)
        writable.chmod(0o777)
        code, output = container.exec_run(
            ["python3", "-c", "open('/roots/1/world-writable/x', 'w')"]
        )
        assert code != 0 and b"Read-only file system" in output, output
        assert not (writable / "x").exists()
        for target in ("/roots/0/pwned", "/roots/1/gen1/child0/model.safetensors"):
            code, output = container.exec_run(["python3", "-c", f"open({target!r}, 'a')"])
            assert code != 0 and (b"Read-only file system" in output or b"denied" in output)
    finally:
        runner.close()
    assert _sandbox_containers(runner) == []


def test_input_roots_are_checked(docker_ready: None, model_roots: dict, tmp_path: Path) -> None:
    import os

    with pytest.raises(ValueError, match="is not a directory"):
        _runner(input_roots=[tmp_path / "missing"])
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    with pytest.raises(ValueError, match="overlaps the sandbox scratch dir"):
        _runner(input_roots=[workdir], scratch_dir=workdir / ".sandbox")
    if os.getuid() != 0:
        return  # the container runs as the host user: it reads what the user reads
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(ValueError, match="not searchable by the sandbox user"):
        _runner(input_roots=[closed])
    root = tmp_path / "root"
    (root / "hidden").mkdir(parents=True)
    child = Path(shutil.copytree(model_roots["children"][0], root / "hidden" / "child"))
    (root / "hidden").chmod(0o700)
    runner = _runner(pool_size=1, input_roots=[root])
    try:
        result = runner.run(MergeJob(MEAN, model_roots["base"], [child], tmp_path / "m"))
    finally:
        runner.close()
    assert result.verdict == "sandbox_error"
    assert "not searchable by the sandbox user" in result.reason and "chmod o+x" in result.reason


def test_per_input_pools_are_bounded(docker_ready: None, tiny_models: dict, tmp_path: Path) -> None:
    import threading

    base, experts = tiny_models["base"], list(tiny_models["experts"])
    runner = _runner(pool_size=1, max_pools=2, limits=SandboxLimits(timeout_s=5, memory_mb=1024))

    def run(expert_dirs: list[Path], out: str) -> Any:
        result = runner.run(MergeJob(MEAN, base, expert_dirs, tmp_path / out))
        _wait_for(lambda: len(_sandbox_containers(runner)) <= 2)
        return result

    try:
        assert run([experts[0]], "a").verdict == "ok"
        (first,) = _sandbox_containers(runner)
        assert run([experts[1]], "b").verdict == "ok"
        assert run([experts[0]], "a2").verdict == "ok"  # the first pool is now the most recent
        assert run([experts[2]], "c").verdict == "ok"  # closes the pool of experts[1]
        assert first.id in {c.id for c in _sandbox_containers(runner)}
        assert run([experts[0], experts[1]], "ab").verdict == "ok"  # closes the first pool
        ids = {c.id for c in _sandbox_containers(runner)}
        assert len(ids) == 2 and first.id not in ids

        # a pool with a job in flight is never closed, even past the bound
        small = _runner(pool_size=1, max_pools=1, limits=SandboxLimits(timeout_s=5, memory_mb=1024))
        try:
            spin: list[Any] = []
            job = MergeJob(SPIN, base, [experts[0]], tmp_path / "spin")
            spinning = threading.Thread(target=lambda: spin.append(small.run(job)))
            spinning.start()
            time.sleep(0.5)
            result = small.run(MergeJob(MEAN, base, [experts[1]], tmp_path / "during"))
            spinning.join()
            assert result.verdict == "ok", result
            assert spin[0].verdict == "timeout", spin[0]  # not killed by a pool being closed
            _wait_for(lambda: len(_sandbox_containers(small)) <= 1)
        finally:
            small.close()
    finally:
        runner.close()
    assert _sandbox_containers(runner) == [] and _sandbox_containers(small) == []


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coevo")
    add_sandbox_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_cli_run_and_check_with_docker(
    docker_ready: None, tiny_models: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    program = tmp_path / "p.py"
    program.write_text(MEAN)
    experts = [arg for d in tiny_models["experts"] for arg in ("--expert", str(d))]
    code = _cli(["sandbox", "run", str(program), "--base", str(tiny_models["base"]), *experts,
                 "--out", str(tmp_path / "out"), "--runner", "docker", "--json"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] == "ok" and result["runner"] == "docker"

    checker = tmp_path / "c.py"
    checker.write_text("def check(answer, instance):\n    return answer == instance['a']\n")
    cases = tmp_path / "cases.jsonl"
    cases.write_text('{"answer": "x", "instance": {"a": "x"}}\n{"answer": "y", "instance": {"a": "x"}}\n')
    assert _cli(["sandbox", "check", str(checker), "--cases", str(cases), "--runner", "docker", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] == "ok" and result["scores"] == [1.0, 0.0]

    cases.write_text('{"answer": 3, "instance": {}}\n')
    assert _cli(["sandbox", "check", str(checker), "--cases", str(cases), "--runner", "docker"]) == 2
    err = capsys.readouterr().err
    assert "answer must be a str" in err and err.count("\n") == 1


def test_stale_containers_of_dead_sessions_are_removed(docker_ready: None) -> None:
    from sandbox.docker_pool import LABEL
    from sandbox.docker_pool import remove_stale_containers as _remove_stale_containers

    runner = _runner(pool_size=1)
    try:
        import socket

        stale = runner.client.containers.create(
            runner.image,
            ["sleep", "600"],
            labels={LABEL: "1", f"{LABEL}.host": socket.gethostname(), f"{LABEL}.pid": "999999999"},
        )
        _remove_stale_containers(runner.client)
        names = [c.name for c in runner.client.containers.list(all=True, ignore_removed=True)]
        assert stale.name not in names
    finally:
        runner.close()


def test_a_killed_owner_leaves_no_container(docker_ready: None) -> None:
    """SIGKILL of the process that holds a warm pool (an orchestrator, a cluster node's actor):
    its reaper removes the pool's containers within seconds, with no later run needed."""
    import signal
    import subprocess
    import sys

    import docker

    from sandbox.docker_pool import LABEL

    code = (
        "import time\nfrom sandbox.docker_runner import DockerRunner\nfrom sandbox.jobs import CheckJob, SandboxLimits\n"
        "runner = DockerRunner(SandboxLimits(timeout_s=30), pool_size=2)\n"
        "result = runner.run_check(CheckJob('def check(answer, instance):\\n    return 1\\n',"
        " [{'answer': 'a', 'instance': {}}]))\n"
        "print('up' if result.verdict == 'ok' else result, flush=True)\ntime.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    client = docker.from_env()
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "up"

        def mine() -> list[Any]:
            return client.containers.list(all=True, filters={"label": f"{LABEL}.pid={owner.pid}"}, ignore_removed=True)

        deadline = time.time() + 120
        while not mine() and time.time() < deadline:  # the pool fills in the background
            time.sleep(0.5)
        assert mine(), "the warm pool started no container"
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.time() + 30
        while mine() and time.time() < deadline:
            time.sleep(0.5)
        assert not mine(), "containers of a killed owner are still there"
    finally:
        if owner.poll() is None:
            owner.kill()


THREADS = HEADER + "    return torch.full_like(base, float(torch.get_num_threads())) - base\n"


def test_cpus_set_the_quota_and_the_threads_of_warm_jobs(
    docker_ready: None, tiny_models: dict, tmp_path: Path
) -> None:
    from merging.io import open_weights
    from sandbox.jobs import available_cpus

    for cpus in (1.0, 2.0):
        runner = _runner(pool_size=1, limits=SandboxLimits(timeout_s=60, memory_mb=1024, cpus=cpus))
        try:
            kwargs = runner._container_kwargs((), tmp_path, ["true"], "coevo-sandbox-spec")
            assert kwargs["nano_cpus"] == int(min(cpus, available_cpus()) * 1e9)
            assert kwargs["environment"]["OMP_NUM_THREADS"] == str(int(cpus))
            for i in range(2):  # the first job starts the container, the second reuses it
                result = runner.run(_job(tiny_models, THREADS, tmp_path / f"out{cpus}-{i}"))
                assert result.verdict == "ok", result.reason
                with open_weights(tmp_path / f"out{cpus}-{i}") as merged:
                    assert set(merged.get("model.norm.weight").tolist()) == {cpus}
        finally:
            runner.close()
    # A quota above the machine's cores is capped (the daemon refuses it); threads are not.
    runner = _runner(pool_size=0, limits=SandboxLimits(cpus=available_cpus() * 4.0))
    try:
        kwargs = runner._container_kwargs((), tmp_path, ["true"], "coevo-sandbox-spec")
        assert kwargs["nano_cpus"] == available_cpus() * 10**9
    finally:
        runner.close()
