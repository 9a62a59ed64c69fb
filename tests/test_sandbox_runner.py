"""Tests of the process sandbox on real tiny models: real child processes, real verdicts."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from coevo.zoo.tiny import save_tiny_llama
from merging.io import open_weights
from sandbox.cli import add_sandbox_parser
from sandbox.jobs import VERDICTS, MergeJob, SandboxLimits, SandboxResult, SandboxUnavailable
from sandbox.process_runner import ProcessRunner, network_prefix
from sandbox.runners import make_runner, run_many

HEADER = "import torch\n\n\ndef merge(task_vectors, *, name, base):\n"
MEAN = HEADER + "    return torch.stack(task_vectors).mean(dim=0)\n"


def _program(*body: str) -> str:
    return HEADER + "".join(f"    {line}\n" for line in body)


def _job(tiny_models: dict, source: str, out_dir: Path) -> MergeJob:
    return MergeJob(source, tiny_models["base"], list(tiny_models["experts"]), out_dir)


def _run(tiny_models: dict, source: str, out_dir: Path, **limits: float) -> SandboxResult:
    result = ProcessRunner(SandboxLimits(**limits)).run(_job(tiny_models, source, out_dir))  # type: ignore[arg-type]
    assert result.verdict in VERDICTS
    assert result.runner == "process"
    assert len(result.reason) <= 600 and "\n" not in result.reason
    return result


def _no_leftovers(out_dir: Path) -> bool:
    return not out_dir.exists() and not list(out_dir.parent.glob(f".*{out_dir.name}*"))


def test_ok_writes_a_loadable_model(tiny_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = _run(
        tiny_models, _program("print('merging', name)", "return sum(task_vectors) / 3"), out
    )
    assert result.verdict == "ok", result
    assert result.peak_memory_mb > 10
    assert "merging lm_head.weight" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["base"])
    experts = [AutoModelForCausalLM.from_pretrained(d) for d in tiny_models["experts"]]
    name = "model.layers.0.mlp.up_proj.weight"
    expected = sum(e.state_dict()[name] for e in experts) / 3
    assert torch.allclose(model.state_dict()[name], expected, atol=1e-5)
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])
    assert not list(tmp_path.glob(".sandbox-*"))


def test_ok_replaces_an_existing_output(tiny_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert _run(tiny_models, MEAN, out).verdict == "ok"
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").is_file()


def test_rejected_by_policy_starts_no_process(tiny_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = _run(tiny_models, "import socket\n" + MEAN, out)
    assert result.verdict == "rejected_by_policy"
    assert result.reason.startswith("import:")
    assert result.duration_s < 1.0 and result.peak_memory_mb == 0.0
    assert _no_leftovers(out)


def test_runtime_error_is_truncated(tiny_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = _run(tiny_models, _program("raise ValueError('boom' * 10_000)"), out)
    assert result.verdict == "runtime_error"
    assert "ValueError: boomboom" in result.reason
    assert len(result.reason) <= 500
    assert _no_leftovers(out)


def test_runtime_error_from_a_runtime_guard(tiny_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = _run(tiny_models, _program("return torch.os.getcwd()"), out)
    assert result.verdict == "runtime_error"
    assert "not allowed" in result.reason


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("return torch.zeros(3)", "shape"),
        ("return task_vectors[0] * float('nan')", "not finite"),
        ("return 1.0", "not a torch.Tensor"),
    ],
)
def test_output_invalid(tiny_models: dict, tmp_path: Path, body: str, expected: str) -> None:
    out = tmp_path / "merged"
    result = _run(tiny_models, _program(body), out)
    assert result.verdict == "output_invalid"
    assert expected in result.reason
    assert _no_leftovers(out)


@pytest.mark.slow
def test_timeout_kills_the_process_group(tiny_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    start = time.monotonic()
    result = _run(tiny_models, _program("while True:", "    pass"), out, timeout_s=3)
    assert result.verdict == "timeout"
    assert time.monotonic() - start < 3 + 3
    assert _no_leftovers(out)


@pytest.mark.slow
def test_memory_exceeded(tiny_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    source = _program(
        "keep = []", "while True:", "    keep.append(torch.ones(50_000_000))"
    )  # 200 MB at a time
    result = _run(tiny_models, source, out, memory_mb=512, timeout_s=30)
    assert result.verdict == "memory_exceeded", result
    assert _no_leftovers(out)


@pytest.mark.slow
def test_stdout_flood_is_truncated_and_returns_promptly(tiny_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    start = time.monotonic()
    source = _program("while True:", "    print('x' * 1000)")
    result = _run(tiny_models, source, out, timeout_s=4, max_log_bytes=10_000)
    assert result.verdict == "timeout"
    assert time.monotonic() - start < 4 + 3
    assert 5_000 < len(result.stdout) <= 10_000 + 100


def test_environment_is_scrubbed(
    tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The program cannot read the environment itself, so check what a child is given.
    from sandbox.process_runner import _child_env

    monkeypatch.setenv("HF_TOKEN", "secret")
    env = _child_env(tmp_path, 3, None)
    assert "HF_TOKEN" not in env and not any("secret" in v for v in env.values())
    assert env["HOME"].startswith(str(tmp_path))
    assert env["OMP_NUM_THREADS"] == "3" and env["THP_MEM_ALLOC_ENABLE"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # no GPU unless the runner was given some


def test_peak_memory_is_the_jobs_not_the_callers(tiny_models: dict, tmp_path: Path) -> None:
    # A child exec'd from a large process inherits its ru_maxrss; the job reports its own peak.
    ballast = bytearray(1536 * 1024 * 1024)  # touched by the zero fill
    try:
        result = _run(tiny_models, MEAN, tmp_path / "out")
    finally:
        del ballast
    assert result.verdict == "ok", result.reason
    assert 10 < result.peak_memory_mb < 1024


def test_gpus_a_job_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.process_runner import _visible_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _visible_gpus(None) == ""
    assert _visible_gpus("all") is None  # left unset: every GPU
    assert _visible_gpus("2") == "0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    assert _visible_gpus("all") == "3,5,7"
    assert _visible_gpus("2") == "3,5"


THREADS = _program("return torch.full_like(base, float(torch.get_num_threads())) - base")


@pytest.mark.parametrize("cpus", [1.0, 2.0])
def test_job_runs_as_many_threads_as_its_cpus(tiny_models: dict, tmp_path: Path, cpus: float) -> None:
    result = _run(tiny_models, THREADS, tmp_path / "out", cpus=cpus)
    assert result.verdict == "ok", result.reason
    with open_weights(tmp_path / "out") as merged:
        assert set(merged.get("model.norm.weight").tolist()) == {cpus}


def test_network_is_isolated_when_unshare_works() -> None:
    prefix = network_prefix()
    if not prefix:
        pytest.skip("no network namespace on this machine")
    connect = "import socket; socket.create_connection(('1.1.1.1', 53), timeout=5)"
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", connect], capture_output=True, text=True, timeout=30
    )
    assert probe.returncode != 0
    assert "unreachable" in probe.stderr.lower() or "OSError" in probe.stderr


def test_run_many_keeps_order(tiny_models: dict, tmp_path: Path) -> None:
    runner = make_runner("auto", SandboxLimits(timeout_s=60))
    jobs = [
        _job(tiny_models, MEAN, tmp_path / "a"),
        _job(tiny_models, _program("return torch.zeros(2)"), tmp_path / "b"),
        _job(tiny_models, "import os\n" + MEAN, tmp_path / "c"),
    ]
    verdicts = [r.verdict for r in run_many(runner, jobs, workers=2)]
    assert verdicts == ["ok", "output_invalid", "rejected_by_policy"]


def test_make_runner_kinds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert make_runner("process").name == "process"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(SandboxUnavailable, match="no Docker daemon reachable"):
        make_runner("docker")
    assert make_runner("auto").name == "process"  # falls back, loudly
    with pytest.raises(ValueError, match="unknown sandbox runner"):
        make_runner("vm")
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coevo")
    add_sandbox_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def _cli_args(tiny_models: dict, program: Path, out: Path) -> list[str]:
    experts = [arg for d in tiny_models["experts"] for arg in ("--expert", str(d))]
    return ["sandbox", "run", str(program), "--base", str(tiny_models["base"]), *experts,
            "--out", str(out)]  # fmt: skip


def test_cli_prints_one_json_object(
    tiny_models: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    program = tmp_path / "program.py"
    program.write_text(_program("return torch.zeros(1)"))
    code = _cli([*_cli_args(tiny_models, program, tmp_path / "out"), "--json", "--timeout", "60"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert result["verdict"] == "output_invalid"
    assert {"verdict", "reason", "duration_s", "peak_memory_mb", "runner"} <= set(result)

    program.write_text(MEAN)
    assert _cli(_cli_args(tiny_models, program, tmp_path / "out")) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_cli_bad_arguments_exit_2(
    tiny_models: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    program = tmp_path / "program.py"
    args = _cli_args(tiny_models, program, tmp_path / "out")
    assert _cli(args) == 2
    assert "program file" in capsys.readouterr().err

    program.write_text(MEAN)
    missing = [a if a != str(tiny_models["base"]) else str(tmp_path / "nope") for a in args]
    assert _cli(missing) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1

    other = save_tiny_llama(tmp_path / "wider", seed=5, hidden_size=32)
    capsys.readouterr()  # saving prints progress bars
    assert _cli([*args, "--expert", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coevo sandbox run: error: expert 'wider'") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_cpus_and_gpus_flags(
    tiny_models: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    program = tmp_path / "program.py"
    program.write_text(THREADS)
    args = [*_cli_args(tiny_models, program, tmp_path / "out"), "--runner", "process", "--json"]
    assert _cli([*args, "--cpus", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "ok"
    with open_weights(tmp_path / "out") as merged:
        assert set(merged.get("model.norm.weight").tolist()) == {2.0}
    for flag, value, message in [("--cpus", "0", "--cpus must be positive, got 0"), ("--gpus", "two", "--gpus must be 'all' or a positive count, got 'two'")]:
        assert _cli([*args, flag, value]) == 2
        assert capsys.readouterr().err == f"coevo sandbox run: error: {message}\n"


def test_a_gpu_job_without_cuda_says_so(tiny_models: dict, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = ProcessRunner(SandboxLimits(timeout_s=60), gpus="1").run(_job(tiny_models, MEAN, tmp_path / "out"))
    assert result.verdict == "sandbox_error"
    assert result.reason.startswith("the job was given GPUs but CUDA is not available in the sandbox (torch ")
    assert _no_leftovers(tmp_path / "out")


def test_config_cpus_default_shares_the_cores_among_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox import config as config_module
    from sandbox.config import SandboxConfig
    from sandbox.runners import runner_from_config

    monkeypatch.setattr(config_module, "available_cpus", lambda: 16)
    assert SandboxConfig(workers=4).job_cpus() == 4.0
    assert SandboxConfig(workers=32).job_cpus() == 1.0
    assert SandboxConfig(workers=4, cpus=2.5).job_cpus() == 2.5
    runner = runner_from_config(SandboxConfig(runner="process", workers=8))
    assert runner.limits.cpus == 2.0 and runner.limits.threads == 2
    assert SandboxLimits(cpus=0.5).threads == 1 and SandboxLimits(cpus=3.9).threads == 3


def test_the_image_ships_every_module_the_harness_imports() -> None:
    # The image copies a fixed list of files (sandbox.image.CONTAINER_MODULES); a module the
    # harness or the pool worker reaches that is not on it fails every container at start.
    import ast

    from sandbox.image import CONTAINER_MODULES, SOURCE_ROOT

    shipped = {f"{package}/{name}" for package, names in CONTAINER_MODULES.items() for name in names}
    todo = ["sandbox/harness.py", "sandbox/pool_worker.py"]
    reached: set[str] = set()
    while todo:
        path = todo.pop()
        if path in reached:
            continue
        reached.add(path)
        for node in ast.walk(ast.parse((SOURCE_ROOT / path).read_text())):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for module in modules:
                if module.split(".")[0] in CONTAINER_MODULES:
                    file = module.replace(".", "/") + ".py"
                    if (SOURCE_ROOT / file).is_file():
                        todo.append(file)
                    elif (SOURCE_ROOT / module.replace(".", "/")).is_dir():
                        todo.append(module.replace(".", "/") + "/__init__.py")
    assert reached - shipped == set()
