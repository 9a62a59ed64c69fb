"""`coevo sandbox run PROGRAM.py --base DIR --expert DIR ... --out DIR`: one program, one verdict.

Once its arguments are valid the command always exits 0 and reports the verdict (the program
failing is a result, not an error of the command). Bad arguments (a missing file or model
dir, models that cannot be merged) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from sandbox.runner import MergeJob, SandboxLimits, make_runner

EXIT_USAGE = 2


def add_sandbox_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `sandbox` (with its `run` subcommand) on the main CLI's subparsers."""
    sandbox = subparsers.add_parser("sandbox", help="run generated merge programs in a sandbox")
    commands = sandbox.add_subparsers(dest="sandbox_command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="apply one merge program to a base model and its experts, print the verdict",
        description="Apply PROGRAM.py's merge(task_vectors, *, name, base) to the base model "
        "and its experts in a sandbox and write the merged model to --out.",
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
    run.add_argument("--json", action="store_true", help="print the result as one JSON object")
    run.add_argument(
        "--timeout", type=float, default=SandboxLimits.timeout_s, help="wall-clock limit, s"
    )
    run.add_argument(
        "--memory-mb", type=int, default=SandboxLimits.memory_mb, help="memory limit, MB"
    )
    run.add_argument("--include", default=None, help="merge only tensors matching this regex")
    run.set_defaults(func=run_command)
    return sandbox


def run_command(args: argparse.Namespace) -> int:
    """Handle `coevo sandbox run`; returns the exit code."""
    problem = _check_args(args)
    if problem is not None:
        print(f"coevo sandbox run: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    limits = SandboxLimits(timeout_s=args.timeout, memory_mb=args.memory_mb)
    job = MergeJob(
        source=args.program.read_text(encoding="utf-8"),
        base_dir=args.base,
        expert_dirs=list(args.experts),
        out_dir=args.out,
        include=args.include,
    )
    result = make_runner("process", limits).run(job)
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
    from merging import IncompatibleModels, ModelDirError, check_compatible

    try:
        check_compatible(args.base, list(args.experts))
    except (IncompatibleModels, ModelDirError) as err:
        return str(err)
    return None
