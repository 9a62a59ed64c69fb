"""The code that runs inside a sandbox: `python -m sandbox.harness JOB.json`.

It confines itself with rlimits, re-checks the static policy, executes the program under
RestrictedPython with runtime guards, applies its `merge` to the job's models with
`merging.apply.merge_models`, and writes a result JSON to the job's `result_path`:
`{"verdict": ..., "reason": ..., "peak_memory_mb": ...}`.

Self-contained on purpose (stdlib, torch, safetensors, RestrictedPython, merging and the
in-container part of `sandbox`: policy, restricted, checker, jobs; no transformers, which is
slow to import): a Docker runner runs the same
module in a container with the same job file. The harness, not the runner, applies the
rlimits because `preexec_fn` is unsafe in a multi-threaded parent (`run_many` uses threads)
and a container entrypoint has no parent to set them.

Job JSON keys: `source`, `base_dir`, `expert_dirs`, `out_dir`, `include`, `result_path`,
`limits` (`SandboxLimits` as a dict), `device` ("cpu", or "cuda" when the runner gives the job
GPUs: the merge program then gets CUDA tensors). A checker job (`"kind": "check"`, see `sandbox.checker`)
has `source`, `cases`, `result_path` and `limits`, and its result adds `scores` and `errors`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merging import contract
from sandbox.checker import run_check_job
from sandbox.jobs import CHECK_KIND, threads_for, truncate
from sandbox.policy import check_program
from sandbox.restricted import (
    BoundedPrint,
    classify,
    describe,
    is_oom,
    load_function,
    restricted_globals,
)

MIB = 1024 * 1024

class _Compute:
    """Seconds spent inside the program's own `merge` calls (the rest is sandbox overhead)."""

    seconds = 0.0


COMPUTE = _Compute()


class ProgramError(Exception):
    """An exception raised by the generated program itself (kept as `__cause__`)."""


def main(argv: list[str]) -> int:
    """Run the job file `argv[0]`; exit 0 once a result file is written, 2 on a bad job file."""
    if len(argv) != 1:
        print("usage: python -m sandbox.harness JOB.json", file=sys.stderr)
        return 2
    execute(json.loads(Path(argv[0]).read_text()))
    return 0


def execute(job: dict[str, Any]) -> None:
    """Confine this process to the job's limits, run the job, write its result file.

    Used by `main` (one process per job) and by `sandbox.pool_worker` (in a child forked
    from a warm worker, with torch already imported).
    """
    result_path = Path(job["result_path"])
    tmp = result_path.with_suffix(".tmp")
    # Opened before the program runs: a program that exhausts file descriptors (or fills the
    # disk quota with nothing else) still gets its verdict written.
    result_file = open(tmp, "w")  # noqa: SIM115 - closed below, after the program ran
    cuda = job.get("device", "cpu") == "cuda"
    apply_limits(job["limits"], cuda=cuda)
    BoundedPrint.budget = int(job["limits"]["max_log_bytes"])
    start = time.perf_counter()
    result: dict[str, Any]
    if job.get("kind") == CHECK_KIND:  # task-checker code scoring answers (sandbox.checker)
        result = run_check_job(job)
        result["compute_s"] = time.perf_counter() - start
    else:
        verdict, reason = run_job(job)
        result = {"verdict": verdict, "reason": truncate(reason), "compute_s": COMPUTE.seconds}
    result["peak_memory_mb"] = peak_rss_mb()
    result["duration_s"] = time.perf_counter() - start
    with result_file:
        result_file.write(json.dumps(result))
    os.replace(tmp, result_path)


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB: `VmHWM`, the high-water mark of its own
    address space. Not `ru_maxrss`, which after an exec keeps the peak of the process it was
    forked from (the runner's, a whole coevo session's) when that one was larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def apply_limits(limits: dict[str, Any], *, cuda: bool = False) -> None:
    """Lower this process's rlimits to the job's limits (never raises an existing lower one).

    RLIMIT_DATA caps private writable memory, which makes torch raise a clean allocation error;
    RLIMIT_AS is not used because torch reserves large virtual ranges it never touches. A CUDA
    job gets no RLIMIT_DATA (the driver maps large private ranges of its own): its memory is
    capped from outside, by the container's cgroup or the process runner's watchdog.
    RLIMIT_FSIZE caps every file written (merged shards, logs), with SIGXFSZ ignored so an
    oversized write fails with an OSError instead of killing the process. RLIMIT_CPU is a
    backstop for a runner that dies before its wall-clock kill (CPU time of all the job's threads,
so it scales with `cpus`). RLIMIT_NPROC counts all
    processes of the user and is not enforced for root (of the initial user namespace), so it
    is set only for other users, on top of what the user already runs.
    """
    _lower(resource.RLIMIT_CORE, 0)
    if not cuda:
        _lower(resource.RLIMIT_DATA, int(limits["memory_mb"]) * MIB)
    _lower(resource.RLIMIT_FSIZE, int(limits["max_output_mb"]) * MIB)
    threads = threads_for(float(limits.get("cpus", 1.0)))
    _lower(resource.RLIMIT_CPU, (int(math.ceil(float(limits["timeout_s"]))) * 2 + 10) * threads)
    if os.geteuid() != 0 or _in_user_namespace():
        _lower(resource.RLIMIT_NPROC, _user_process_count() + int(limits["max_processes"]))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _lower(limit: int, value: int) -> None:
    for current in resource.getrlimit(limit):
        if current != resource.RLIM_INFINITY:
            value = min(value, current)
    resource.setrlimit(limit, (value, value))


def _in_user_namespace() -> bool:
    # The initial namespace maps all uids 1:1; `unshare -r` maps only the caller's uid to 0.
    try:
        return Path("/proc/self/uid_map").read_text().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                continue
    return count


def run_job(job: dict[str, Any]) -> tuple[str, str]:
    """Policy, compile, merge: the `(verdict, reason)` of one job."""
    verdict = check_program(job["source"])
    if not verdict.ok:
        return "rejected_by_policy", f"{verdict.rule}: {verdict.reason}"
    try:
        merge = load_program(job["source"])
    except BaseException as err:  # the program's top level ran and failed, SystemExit included
        return classify(err)

    # Imported here, not at the top: checker jobs never pay for torch.
    import torch

    from merging.apply import MergeOutputInvalid, merge_models
    from merging.check import IncompatibleModels
    from merging.io import ModelDirError

    torch.set_num_threads(threads_for(float(job["limits"].get("cpus", 1.0))))
    device = job.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return "sandbox_error", (
            "the job was given GPUs but CUDA is not available in the sandbox "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}; "
            "a CUDA image: coevo sandbox build --gpu)"
        )

    # On a GPU, tensors the program makes without saying where (`torch.zeros(shape)`) are made
    # there too, like its inputs.
    where: contextlib.AbstractContextManager[Any] = (
        torch.device(device) if device != "cpu" else contextlib.nullcontext()
    )

    def guarded_merge(task_vectors: list[Any], *, name: str, base: Any) -> Any:
        start = time.perf_counter()
        try:
            with where:
                return merge(task_vectors, name=name, base=base)
        except BaseException as err:  # SystemExit, KeyboardInterrupt too: all are the program's
            raise ProgramError(name) from err
        finally:
            COMPUTE.seconds += time.perf_counter() - start

    try:
        merge_models(
            guarded_merge,
            Path(job["base_dir"]),
            [Path(d) for d in job["expert_dirs"]],
            Path(job["out_dir"]),
            include=job.get("include"),
            device=device,
        )
    except ProgramError as err:
        assert err.__cause__ is not None
        verdict_name, reason = classify(err.__cause__)
        return verdict_name, f"in merge(name={err.args[0]!r}): {reason}"
    except MergeOutputInvalid as err:
        return "output_invalid", str(err)
    except (IncompatibleModels, ModelDirError) as err:
        return "sandbox_error", f"bad models: {err}"
    except MemoryError:
        return "memory_exceeded", "MemoryError while merging"
    except OSError as err:
        return "sandbox_error", f"writing the merged model failed: {err}"
    except Exception as err:
        if is_oom(err):
            return "memory_exceeded", describe(err)
        return "sandbox_error", f"merge engine failed: {describe(err)}"
    return "ok", "ok"


def load_program(source: str) -> Callable[..., Any]:
    """Execute the program's top level under RestrictedPython and return its `merge`."""
    return load_function(source, restricted_globals(), contract.FUNCTION, "program")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
