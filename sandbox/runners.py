"""Choosing a sandbox runner, and running many jobs through one.

`make_runner(kind, limits, ...)` picks Docker (`sandbox.docker_runner`) or the process
fallback (`sandbox.process_runner`); `runner_from_config` does the same from a session's
`SandboxConfig`. `run_many` runs a batch of merge jobs a few at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

from sandbox.config import SandboxConfig
from sandbox.docker_runner import DockerRunner
from sandbox.jobs import MergeJob, Runner, SandboxLimits, SandboxResult, SandboxUnavailable
from sandbox.process_runner import ProcessRunner, warn_once


def make_runner(
    kind: str = "auto",
    limits: SandboxLimits | None = None,
    *,
    input_roots: Sequence[Path] = (),
    gpus: str | int | None = None,
    **docker_options: Any,
) -> Runner:
    """The runner for `kind`: "docker", "process", or "auto" (Docker when a daemon is
    reachable, else the process fallback, with a warning either way it falls back).

    `input_roots` are dirs that hold the models of many jobs (the zoo, a session's children):
    Docker mounts them read-only in one shared warm pool instead of a pool per set of models;
    the process runner needs nothing (under bubblewrap it sees the host read-only). `gpus`
    ("all" or a count) gives jobs GPUs, and merges run on CUDA. The other `docker_options` go
    to `DockerRunner` (pool_size, max_pools, runtime, scratch_dir, ...). "docker" raises
    SandboxUnavailable with a one-line reason when Docker cannot be used.
    """
    if kind not in ("auto", "docker", "process"):
        raise ValueError(f"unknown sandbox runner {kind!r}: use 'auto', 'process' or 'docker'")
    if kind == "process":
        return ProcessRunner(limits, gpus=gpus)
    try:
        return DockerRunner(limits, input_roots=input_roots, gpus=gpus, **docker_options)
    except SandboxUnavailable as err:
        if kind == "docker":
            raise
        warn_once("auto", f"Docker sandbox unavailable ({err}); falling back to the process sandbox")
        return ProcessRunner(limits, gpus=gpus)


def runner_from_config(
    config: SandboxConfig, *, scratch_dir: Path | None = None, input_roots: Sequence[Path] = ()
) -> Runner:
    """The runner a session's `[sandbox]` settings describe.

    `input_roots`: dirs under which every model a job reads lies (Docker mounts them
    read-only once, so one warm pool serves any parents drawn from them).
    """
    limits = SandboxLimits(timeout_s=config.timeout_s, memory_mb=config.memory_mb, cpus=config.job_cpus())
    return make_runner(
        config.runner,
        limits,
        pool_size=config.pool_size,
        jobs_per_container=config.jobs_per_container,
        scratch_mb=config.scratch_mb,
        runtime=config.docker_runtime or None,
        gpus=config.gpus or None,
        scratch_dir=scratch_dir,
        input_roots=input_roots,
    )


def run_many(
    runner: Runner,
    jobs: Sequence[MergeJob],
    workers: int = 2,
    on_result: Callable[[SandboxResult], None] | None = None,
    *,
    ahead: int | None = None,
) -> list[SandboxResult]:
    """Run jobs `workers` at a time (threads; each job is its own process), results in order;
    `on_result` sees each result as soon as it and the ones before it are in, in the calling
    thread. With `ahead`, at most that many jobs are started beyond the one `on_result` is
    consuming: outputs that must be consumed (judged, deleted) before more are made stay
    bounded."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if ahead is not None and ahead < 1:
        raise ValueError(f"ahead must be at least 1, got {ahead}")
    results = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        todo = iter(jobs)
        running = deque(pool.submit(runner.run, job) for job in islice(todo, ahead if ahead is not None else len(jobs)))
        while running:
            result = running.popleft().result()
            following = next(todo, None)
            if following is not None:
                running.append(pool.submit(runner.run, following))
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results
