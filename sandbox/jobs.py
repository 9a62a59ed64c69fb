"""What a sandbox runs and what it answers: jobs, results, verdicts and the `Runner` protocol.

A `Runner` takes a `MergeJob` (program source + model dirs, all serialisable) or a `CheckJob`
(checker source + answers to score) and returns a `SandboxResult` / `CheckResult`; it never
raises for anything the program does. Two runners implement it: `sandbox.process_runner`
(a fresh confined process per job, the fallback that works everywhere) and
`sandbox.docker_runner` (hardened containers, a warm pool); `sandbox.runners.make_runner` picks
one from a `SandboxConfig`. Both run the same harness (`sandbox.harness`) on the same job file
and read its result file with the helpers below.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sandbox.policy import PolicyVerdict

VERDICTS = (
    "ok",
    "rejected_by_policy",
    "runtime_error",
    "timeout",
    "memory_exceeded",
    "output_invalid",
    "sandbox_error",
)
MAX_REASON_CHARS = 500
# Logs past this many times max_log_bytes mean something writes around the bounded print.
LOG_FLOOD_FACTOR = 100


class SandboxUnavailable(RuntimeError):
    """The requested sandbox runner cannot be used on this machine."""


@dataclass
class SandboxLimits:
    """Resource limits for one sandboxed job. `cpus` is its CPU quota (Docker) and the number
    of threads torch may use in it (the whole part, at least 1)."""

    timeout_s: float = 60.0
    memory_mb: int = 2048
    max_output_mb: int = 1024
    max_log_bytes: int = 64_000
    max_processes: int = 64
    cpus: float = 1.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {value}")

    @property
    def threads(self) -> int:
        """The threads a job may run: the whole part of `cpus`, at least 1."""
        return threads_for(self.cpus)

    def to_dict(self) -> dict[str, Any]:
        """The limits as JSON-ready values."""
        return asdict(self)


def threads_for(cpus: float) -> int:
    """The threads a CPU quota of `cpus` pays for: its whole part, at least 1."""
    return max(1, int(cpus))


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask, which a container's cpuset
    narrows), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# Set in every sandbox process: torch backs its large CPU tensors with transparent huge pages,
# so a fresh parameter-sized temporary costs 512x fewer page faults (about half the time of
# allocating and first writing it on the development machine).
TORCH_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that size the thread pools of torch's backends."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


@dataclass
class MergeJob:
    """One program to apply to a base model and its experts, writing `out_dir`."""

    source: str
    base_dir: Path
    expert_dirs: list[Path]
    out_dir: Path
    include: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready values (absolute paths)."""
        return {
            "source": self.source,
            "base_dir": str(Path(self.base_dir).resolve()),
            "expert_dirs": [str(Path(d).resolve()) for d in self.expert_dirs],
            "out_dir": str(Path(self.out_dir).resolve()),
            "include": self.include,
        }


@dataclass
class SandboxResult:
    """What happened to one job: a verdict from `VERDICTS`, why, and what it cost."""

    verdict: str
    reason: str
    duration_s: float
    peak_memory_mb: float
    stdout: str = ""
    stderr: str = ""
    runner: str = ""
    compute_s: float = 0.0  # time inside the program's own merge calls

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return asdict(self)


CHECK_KIND = "check"


@dataclass
class CheckJob:
    """A checker (`def check(answer, instance)`, see `sandbox.checker`) and the (answer,
    instance) cases to score with it."""

    source: str
    cases: list[dict[str, Any]]

    def validate(self) -> None:
        """Raise `ValueError` (one-line message) unless every case is a str answer and a dict
        instance of JSON values that survives a JSON round trip unchanged (no tuples, no
        non-str keys, no NaN / infinity)."""
        if not isinstance(self.source, str):
            raise ValueError(f"source must be a str, got {type(self.source).__name__}")
        if not isinstance(self.cases, list):
            raise ValueError(f"cases must be a list, got {type(self.cases).__name__}")
        for index, case in enumerate(self.cases):
            if not isinstance(case, dict):
                raise ValueError(f"case {index}: must be a dict, got {type(case).__name__}")
            missing = sorted({"answer", "instance"} - case.keys())
            if missing:
                raise ValueError(f"case {index}: missing {', '.join(missing)}")
            answer, instance = case["answer"], case["instance"]
            if not isinstance(answer, str):
                raise ValueError(f"case {index}: answer must be a str, got {type(answer).__name__}")
            if not isinstance(instance, dict):
                raise ValueError(
                    f"case {index}: instance must be a dict, got {type(instance).__name__}"
                )
            try:
                encoded = json.dumps(instance, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as err:
                raise ValueError(
                    f"case {index}: instance is not JSON-serialisable: {one_line(str(err))}"
                ) from None
            if json.loads(encoded) != instance:
                raise ValueError(
                    f"case {index}: instance changes in a JSON round trip "
                    "(tuples, non-str keys?); use plain JSON values"
                )

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready values, without `limits` (the runner adds them)."""
        return {
            "kind": CHECK_KIND,
            "source": self.source,
            "cases": [
                {"answer": case["answer"], "instance": case["instance"]} for case in self.cases
            ],
        }


@dataclass
class CheckResult:
    """What happened to one check job: a verdict from `VERDICTS`, why, the per-case scores and
    error messages (both None unless the verdict is `ok`), and the cost."""

    verdict: str
    reason: str
    duration_s: float
    peak_memory_mb: float
    scores: list[float] | None = None
    errors: list[str | None] | None = None
    stdout: str = ""
    stderr: str = ""
    runner: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return asdict(self)


class Runner(Protocol):
    """Runs merge jobs in some sandbox; `run` returns a verdict, never raises for the program."""

    name: str

    @property
    def description(self) -> str:
        """What confines the jobs, for logs ("docker (image, warm pool of 2)")."""
        ...

    def run(self, job: MergeJob) -> SandboxResult:
        """Run one job to completion (or to its limits)."""
        ...

    def run_check(self, job: CheckJob) -> CheckResult:
        """Score answers with task-checker code (no weights mounted); never raises for it."""
        ...

    def close(self) -> None:
        """Release what the runner holds (containers, scratch space)."""
        ...


_R = TypeVar("_R", SandboxResult, CheckResult)


def rejected(result: type[_R], policy: PolicyVerdict, start: float, runner: str) -> _R:
    """The result of a program the static policy refused (it never ran)."""
    return unrun(result, "rejected_by_policy", f"{policy.rule}: {policy.reason}", start, runner)


def unrun(result: type[_R], verdict: str, reason: str, start: float, runner: str) -> _R:
    """The result of a job that ended before its program ran (policy, models, the daemon)."""
    return result(verdict, reason, time.perf_counter() - start, 0.0, runner=runner)


def merge_result(
    verdict: str, reason: str, *, start: float, peak_mb: float, compute_s: float, model: Path, out_dir: Path,
    logs: Path, runner: str, max_log_bytes: int,
) -> SandboxResult:
    """A finished merge job's result: an `ok` job's `model` is installed at `out_dir` (a
    failure to do so is a `sandbox_error`); its logs are read from `logs`."""
    if verdict == "ok":
        problem = install_model(model, out_dir)
        if problem is not None:
            verdict, reason = "sandbox_error", problem
    return SandboxResult(
        verdict, reason, time.perf_counter() - start, peak_mb, read_log(logs / "stdout.log", max_log_bytes),
        read_log(logs / "stderr.log", max_log_bytes), runner, compute_s,
    )


def check_result(
    verdict: str, reason: str, *, start: float, peak_mb: float, logs: Path, runner: str, max_log_bytes: int
) -> CheckResult:
    """A finished check job's result: its scores (when `ok`) and logs, read from `logs`."""
    scores, errors = read_scores(logs / "result.json") if verdict == "ok" else (None, None)
    return CheckResult(
        verdict, reason, time.perf_counter() - start, peak_mb, scores, errors,
        read_log(logs / "stdout.log", max_log_bytes), read_log(logs / "stderr.log", max_log_bytes), runner,
    )


def read_result(result_file: Path) -> tuple[str, str, float, float] | None:
    """`(verdict, reason, peak_memory_mb, compute_s)` from a harness result file; None if absent.

    An unreadable file or an unknown verdict is a `sandbox_error`.
    """
    if not result_file.is_file():
        return None
    try:
        result = json.loads(result_file.read_text())
        verdict, reason = str(result["verdict"]), str(result["reason"])
        peak_mb = float(result.get("peak_memory_mb", 0.0))
        compute_s = float(result.get("compute_s", 0.0))
    except (OSError, ValueError, KeyError, TypeError) as bad:
        return "sandbox_error", f"unreadable harness result: {bad}", 0.0, 0.0
    if verdict not in VERDICTS:
        return "sandbox_error", f"harness returned unknown verdict {verdict!r}", peak_mb, 0.0
    return verdict, reason, peak_mb, compute_s


def read_scores(result_file: Path) -> tuple[list[float] | None, list[str | None] | None]:
    """The per-case `scores` and `errors` of a checker job's result file."""
    try:
        result = json.loads(result_file.read_text())
        return result.get("scores"), result.get("errors")
    except (OSError, ValueError, AttributeError):
        return None, None


def file_size(path: Path) -> int:
    """The size of `path` in bytes, 0 when it does not exist."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_log(path: Path, max_bytes: int) -> str:
    """The log, or its head and tail around a marker when it is over `max_bytes`."""
    size = file_size(path)
    with open(path, "rb") as f:
        if size <= max_bytes:
            return f.read().decode("utf-8", errors="replace")
        half = max_bytes // 2
        head = f.read(half)
        f.seek(size - half)
        tail = f.read(half)
    marker = f"\n... [{size - 2 * half} bytes truncated] ...\n".encode()
    return (head + marker + tail).decode("utf-8", errors="replace")


def tail(path: Path, max_chars: int = 500) -> str:
    """The last lines of a log as one line, for a reason string."""
    text = read_log(path, 4 * max_chars).strip() if path.is_file() else ""
    text = " | ".join(line for line in text.splitlines() if line.strip())
    return text[-max_chars:] if text else "(no stderr)"


def install_model(model_dir: Path, out_dir: Path) -> str | None:
    """Move a finished model to out_dir atomically (replacing an old one); None, or the problem.

    From another file system the model is first copied next to out_dir, so the final step is
    always a rename: out_dir holds either the old model or the complete new one.
    """
    if not model_dir.is_dir() or not any(model_dir.glob("*.safetensors")):
        return f"harness reported ok but wrote no model to {model_dir}"
    if out_dir.exists() and not out_dir.is_dir():
        return f"output path '{out_dir}' exists and is not a directory"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".sandbox-{out_dir.name}-", dir=out_dir.parent))
    try:
        if model_dir.stat().st_dev != staging.stat().st_dev:
            shutil.copytree(model_dir, staging / "model")
            model_dir = staging / "model"
        if out_dir.exists():
            os.replace(out_dir, staging / "previous")
        os.replace(model_dir, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return None


def truncate(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` (multi-line text folded to one line) cut to `limit` characters with a marker."""
    text = " ".join(text.split()) if "\n" in text else text
    return text if len(text) <= limit else text[: limit - 15] + "... [truncated]"


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` on one line (all whitespace runs, `\\r` and `\\u2028` too, become one space),
    at most `limit` characters."""
    line = " ".join(text[: limit * 4].split())  # bounded work for an enormous message
    if len(text) > limit * 4 and len(line) <= limit:
        return line[: limit - 15] + "... [truncated]"
    return truncate(line, limit)
