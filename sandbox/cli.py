"""`coevo sandbox ...`: run one program, score answers with checker code, build the image.

- `run PROGRAM.py --base DIR --expert DIR ... --out DIR`: one merge program, one verdict.
- `check CHECKER.py --cases FILE.jsonl`: task-checker code scoring (answer, instance) cases.
- `build [--offline] [--gpu] [--base IMAGE]`: the sandbox image.
- `info`: which runners work on this machine.

Once their arguments are valid, `run` and `check` always exit 0 and report the verdict (the
program failing is a result, not an error of the command). Bad arguments (a missing file or
model dir, models that cannot be merged, no Docker for `--runner docker`) print one line on
stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from merging.contract import SIGNATURE
from sandbox.jobs import (
    CheckJob,
    MergeJob,
    Runner,
    SandboxLimits,
    SandboxUnavailable,
    available_cpus,
)
from sandbox.runners import make_runner

EXIT_USAGE = 2


def add_sandbox_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `sandbox` (with its `run` subcommand) on the main CLI's subparsers."""
    sandbox = subparsers.add_parser("sandbox", help="run generated merge programs in a sandbox")
    commands = sandbox.add_subparsers(dest="sandbox_command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="apply one merge program to a base model and its experts, print the verdict",
        description=f"Apply PROGRAM.py's `{SIGNATURE}` to the base model and its experts in "
        "a sandbox and write the merged model to --out.",
    )
    run.add_argument("program", type=Path, metavar="PROGRAM.py", help="merge program source")
    run.add_argument("--base", type=Path, required=True, help="base model dir")
    run.add_argument(
        "--expert",
        type=Path,
        action="append",
        required=True,
        dest="experts",
        help="expert model dir (repeat for each expert)",
    )
    run.add_argument("--out", type=Path, required=True, help="where to write the merged model")
    run.add_argument("--include", default=None, help="merge only tensors matching this regex")
    _runner_arguments(run)
    run.set_defaults(func=run_command)

    check = commands.add_parser(
        "check",
        help="score answers with task-checker code in the sandbox, print the verdict and scores",
        description="Run CHECKER.py's check(answer, instance) on every case of a JSONL file "
        '(one {"answer": str, "instance": {...}} object per line) in the sandbox.',
    )
    check.add_argument("checker", type=Path, metavar="CHECKER.py", help="checker source")
    check.add_argument("--cases", type=Path, required=True, help="JSONL file of cases")
    _runner_arguments(check)
    check.set_defaults(func=check_command)

    build = commands.add_parser(
        "build",
        help="build the sandbox Docker image",
        description="Build coevo-sandbox:<hash> from sandbox/Dockerfile. By default the base "
        "(python:3.11-slim, or a CUDA PyTorch image with --gpu) and the packages come from the "
        "registries; --offline uses no registry: a debootstrap base and a wheelhouse made on "
        "this machine, built with --network none.",
    )
    build.add_argument("--offline", action="store_true", help="build with no registry access")
    build.add_argument("--gpu", action="store_true", help="CUDA image (torch from the base)")
    build.add_argument("--base", default=None, help="base image to build FROM instead")
    build.set_defaults(func=build_command)

    info = commands.add_parser("info", help="which sandbox runners work on this machine")
    info.set_defaults(func=info_command)
    return sandbox


def _runner_arguments(parser: argparse.ArgumentParser) -> None:
    """What `run` and `check` share: output, limits, which runner."""
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument(
        "--timeout", type=float, default=SandboxLimits.timeout_s, help="wall-clock limit, s"
    )
    parser.add_argument(
        "--memory-mb", type=int, default=SandboxLimits.memory_mb, help="memory limit, MB"
    )
    parser.add_argument(
        "--runner",
        choices=("auto", "docker", "process"),
        default="auto",
        help="auto: Docker when a daemon is reachable, else the process sandbox",
    )
    parser.add_argument(
        "--pool-size", type=int, default=1, help="warm containers (0: a cold `docker run`)"
    )
    parser.add_argument(
        "--cpus",
        type=float,
        default=None,
        help=f"CPU quota and torch threads of the job (default: all cores, here {available_cpus()})",
    )
    parser.add_argument(
        "--gpus", default=None, help="'all' or a count: GPUs the job may use (the merge runs on CUDA)"
    )


def _limits(args: argparse.Namespace) -> SandboxLimits:
    cpus = float(available_cpus()) if args.cpus is None else args.cpus
    return SandboxLimits(timeout_s=args.timeout, memory_mb=args.memory_mb, cpus=cpus)


def _make(args: argparse.Namespace, limits: SandboxLimits) -> Runner | None:
    try:
        return make_runner(args.runner, limits, pool_size=max(args.pool_size, 0), gpus=args.gpus)
    except SandboxUnavailable as err:
        print(f"coevo sandbox: error: {err}", file=sys.stderr)
        return None


def run_command(args: argparse.Namespace) -> int:
    """Handle `coevo sandbox run`; returns the exit code."""
    problem = _check_args(args)
    if problem is not None:
        print(f"coevo sandbox run: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    limits = _limits(args)
    job = MergeJob(
        source=args.program.read_text(encoding="utf-8"),
        base_dir=args.base,
        expert_dirs=list(args.experts),
        out_dir=args.out,
        include=args.include,
    )
    runner = _make(args, limits)
    if runner is None:
        return EXIT_USAGE
    try:
        result = runner.run(job)
    finally:
        runner.close()
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(
            f"{result.verdict}: {result.reason} "
            f"({result.duration_s:.1f} s, {result.peak_memory_mb:.0f} MB, runner {result.runner})"
        )
    return 0


def _check_args(args: argparse.Namespace) -> str | None:
    """One line saying what is wrong with the arguments, or None."""
    if not args.program.is_file():
        return f"program file '{args.program}' does not exist"
    try:
        args.program.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return f"cannot read program file '{args.program}': {err}"
    if args.timeout <= 0:
        return f"--timeout must be positive, got {args.timeout:g}"
    if args.memory_mb <= 0:
        return f"--memory-mb must be positive, got {args.memory_mb}"
    if args.cpus is not None and not args.cpus > 0:
        return f"--cpus must be positive, got {args.cpus:g}"
    if args.gpus is not None and args.gpus != "all" and not (args.gpus.isdigit() and int(args.gpus) > 0):
        return f"--gpus must be 'all' or a positive count, got {args.gpus!r}"
    if args.include is not None:
        try:
            re.compile(args.include)
        except re.error as err:
            return f"--include {args.include!r} is not a valid regex: {err}"
    for model_dir in [args.base, *args.experts]:
        if not model_dir.is_dir():
            return f"model dir '{model_dir}' does not exist"
    if args.out.exists() and not args.out.is_dir():
        return f"--out '{args.out}' exists and is not a directory"
    # Imported here: merging pulls in torch, which `coevo --help` should not pay for.
    from merging.check import IncompatibleModels, check_compatible
    from merging.io import ModelDirError

    try:
        check_compatible(args.base, list(args.experts))
    except (IncompatibleModels, ModelDirError) as err:
        return str(err)
    return None


def check_command(args: argparse.Namespace) -> int:
    """Handle `coevo sandbox check`; returns the exit code."""
    problem, job = _read_check_args(args)
    if job is None:
        print(f"coevo sandbox check: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    runner = _make(args, _limits(args))
    if runner is None:
        return EXIT_USAGE
    try:
        result = runner.run_check(job)
    finally:
        runner.close()
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    scores = result.scores or []
    passed = f", {sum(scores):g}/{len(scores)} passed" if result.verdict == "ok" else ""
    print(
        f"{result.verdict}: {result.reason}{passed} "
        f"({result.duration_s:.1f} s, {result.peak_memory_mb:.0f} MB, runner {result.runner})"
    )
    for i, error in enumerate(result.errors or []):
        if error:
            print(f"  case {i}: {error}")
    return 0


def _read_check_args(args: argparse.Namespace) -> tuple[str, CheckJob | None]:
    if args.timeout <= 0 or args.memory_mb <= 0 or (args.cpus is not None and not args.cpus > 0):
        return "--timeout, --memory-mb and --cpus must be positive", None
    try:
        source = args.checker.read_text(encoding="utf-8")
        lines = args.cases.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        return f"cannot read {err.filename if isinstance(err, OSError) else 'input'}: {err}", None
    cases = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            cases.append(json.loads(line))
        except ValueError as err:
            return f"{args.cases}:{number}: not JSON: {err}", None
    job = CheckJob(source, cases)
    try:
        job.validate()
    except ValueError as err:
        return f"{args.cases}: {err}", None
    return "", job


def build_command(args: argparse.Namespace) -> int:
    """Handle `coevo sandbox build`; returns the exit code."""
    from sandbox.docker_pool import docker_client
    from sandbox.image import ImageError, build_image

    try:
        tag = build_image(
            docker_client(),
            offline=args.offline,
            gpu=args.gpu,
            base=args.base,
            log=lambda line: print(line, file=sys.stderr),
        )
    except (SandboxUnavailable, ImageError) as err:
        print(f"coevo sandbox build: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(tag)
    return 0


def info_command(args: argparse.Namespace) -> int:
    """Handle `coevo sandbox info`: the Docker daemon, the image, the process fallback."""
    from sandbox.docker_pool import docker_client
    from sandbox.image import image_exists, image_tag
    from sandbox.process_runner import ProcessRunner

    tag = image_tag()
    try:
        client = docker_client()
        version = client.version().get("Version", "?")
        runtimes = ", ".join(sorted(client.info().get("Runtimes", {})))
        state = "built" if image_exists(client, tag) else "not built (coevo sandbox build)"
        print(f"docker:  daemon {version} reachable; runtimes: {runtimes}")
        print(f"image:   {tag} {state}")
    except SandboxUnavailable as err:
        print(f"docker:  unavailable: {err}")
        print(f"image:   {tag}")
    print(f"process: {ProcessRunner.confinement()}")
    return 0
