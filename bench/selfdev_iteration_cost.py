"""Where a Self-Developing iteration's time goes, per candidate, on the quickstart.

Runs the quickstart session (README command 1: embedded zoo, default config, the sandbox
runner the machine has) in this process with timers around each graph step, and around the
judge inside the sandbox step (the dev judge scores each merged model while the sandbox merges
the next ones), then prints per iteration and phase the wall time and the time per candidate
(per generated program): sampling (`propose`), vetting, sandbox (merging; the `execute`
step's wall time less the judge's), judging, the DPO update of the generator (`improve`),
and what is left (baselines, report, checkpoints, archive writes). Also the sandbox jobs' own
median duration from the archive, against the wall time per merge the pool achieved.

    .venv/bin/python bench/selfdev_iteration_cost.py [--iterations 3] [--programs 64] [--runner docker]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents import selfdev  # noqa: E402
from archive_store import Archive  # noqa: E402
from coevo.config import Config, parse_config  # noqa: E402
from coevo.session import run_session  # noqa: E402

STEPS = ("baselines", "propose", "vet", "execute", "judge", "select", "improve", "report")
timings: dict[tuple[int, str], float] = defaultdict(float)


def timed(node: Any) -> Any:
    """The graph step `node` with its wall time added to `timings` (LangGraph reads the
    parameter names, so the wrapper keeps them)."""

    def step(state: Any, runtime: Any) -> Any:
        start = time.perf_counter()
        try:
            return node(state, runtime)
        finally:
            timings[state.get("iteration", 0), node.__name__] += time.perf_counter() - start

    step.__name__ = node.__name__
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--runner", default=None, help="sandbox runner (default: the config's, auto)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    for name in STEPS:
        setattr(selfdev, name, timed(getattr(selfdev, name)))
    score = selfdev.SelfdevContext.score
    executing: dict[str, int | None] = {"iteration": None}

    def timed_score(self: Any, model_dir: Path, tasks: list[Any]) -> Any:
        start = time.perf_counter()
        try:
            return score(self, model_dir, tasks)
        finally:
            if executing["iteration"] is not None:  # the dev judge inside the sandbox step
                timings[executing["iteration"], "judging"] += time.perf_counter() - start

    selfdev.SelfdevContext.score = timed_score  # type: ignore[method-assign]
    execute = selfdev.execute

    def execute_now(state: Any, runtime: Any) -> Any:
        executing["iteration"] = state["iteration"]
        try:
            return execute(state, runtime)
        finally:
            executing["iteration"] = None

    execute_now.__name__ = "execute"
    selfdev.execute = execute_now

    overrides = Config().model_dump()
    overrides["session"]["iterations"] = args.iterations
    overrides["generator"]["programs_per_iteration"] = args.programs
    if args.runner:
        overrides["sandbox"]["runner"] = args.runner
    config = parse_config(overrides, "bench")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="selfdev-cost-"))
    start = time.perf_counter()
    session_id = run_session(config, workdir)
    total = time.perf_counter() - start

    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        runs = archive.records(
            "select a.iteration, r.verdict, r.duration_s from sandbox_runs r "
            "join algorithms a using (algorithm_id) where a.session_id = ? order by 1",
            [session_id],
        )
    per_iteration: dict[int, list[float]] = defaultdict(list)
    for row in runs:
        per_iteration[row["iteration"]].append(row["duration_s"] or 0.0)

    phases = ("sampling", "vetting", "sandbox", "judging", "DPO update")
    print(f"\nquickstart, {args.iterations} iterations x {args.programs} programs, runner "
          f"{config.sandbox.runner}, {config.sandbox.workers} sandbox workers: {total:.0f} s in all\n")
    print("| iteration | " + " | ".join(f"{p} (s, s/candidate)" for p in phases)
          + " | sandbox runs | median job s | wall s per merge |")
    print("|---" * (len(phases) + 4) + "|")
    accounted = 0.0
    for it in range(args.iterations):
        judging = timings[it, "judging"] + timings[it, "judge"]
        sandbox = timings[it, "execute"] - timings[it, "judging"]
        walls = [timings[it, "propose"], timings[it, "vet"], sandbox, judging, timings[it, "improve"]]
        accounted += sum(walls) + timings[it, "select"]
        jobs = per_iteration.get(it, [])
        print(f"| {it} | " + " | ".join(f"{w:.1f}, {w / args.programs:.3f}" for w in walls)
              + f" | {len(jobs)} | {statistics.median(jobs) if jobs else float('nan'):.2f}"
              + f" | {sandbox / max(len(jobs), 1):.2f} |")
    print(f"\nbaselines {timings[0, 'baselines']:.1f} s, report {timings[args.iterations, 'report']:.1f} s, "
          f"the rest (session setup, checkpoints) {total - accounted - timings[0, 'baselines'] - timings[args.iterations, 'report']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
