"""The Docker runner against a real daemon: container confinement, warm pool, cold mode,
checker jobs, the CLI. Required (not skipped) in CI, where COEVO_REQUIRE_DOCKER=1."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox.checker import CheckJob
from sandbox.cli import add_sandbox_parser
from sandbox.runner import MergeJob, SandboxLimits

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
    from sandbox.docker_runner import LABEL

    return [
        c
        for c in runner.client.containers.list(all=True, filters={"label": LABEL})
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
        (Path(tiny_models["base"]).resolve(),), out / "x", ["python3", "-c", PROBE], "coevo-sandbox-probe"
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
    from sandbox.docker_runner import LABEL, _remove_stale_containers

    runner = _runner(pool_size=1)
    try:
        import socket

        stale = runner.client.containers.create(
            runner.image,
            ["sleep", "600"],
            labels={LABEL: "1", f"{LABEL}.host": socket.gethostname(), f"{LABEL}.pid": "999999999"},
        )
        _remove_stale_containers(runner.client)
        names = [c.name for c in runner.client.containers.list(all=True)]
        assert stale.name not in names
    finally:
        runner.close()
