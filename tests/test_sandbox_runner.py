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
    env = _child_env(tmp_path)
    assert "HF_TOKEN" not in env and not any("secret" in v for v in env.values())
    assert env["HOME"].startswith(str(tmp_path))


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
