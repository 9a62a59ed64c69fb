"""Sandbox runners: run one generated merge program against real models, confined, and
return a verdict.

A `Runner` takes a `MergeJob` (program source + model dirs, all serialisable) and returns a
`SandboxResult`; it never raises for anything the program does. `ProcessRunner` is the
fallback that works everywhere: a fresh `python -m sandbox.harness` process per job, in its
own process group and (when the OS allows) its own network namespace, with a scrubbed
environment, rlimits (applied by the harness, see `sandbox.harness.apply_limits`), a wall-clock
kill and a memory watchdog enforced from outside. A Docker runner can slot in behind the same
protocol: it runs the same harness on the same job file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sandbox.policy import PolicyVerdict, check_checker, check_program

if TYPE_CHECKING:  # imported lazily: the harness module, run as __main__, must not be imported
    from sandbox.checker import CheckJob, CheckResult

log = logging.getLogger("coevo.sandbox")
_R = TypeVar("_R", "SandboxResult", "CheckResult")

VERDICTS = (
    "ok",
    "rejected_by_policy",
    "runtime_error",
    "timeout",
    "memory_exceeded",
    "output_invalid",
    "sandbox_error",
)

# The dir holding the `sandbox` and `merging` packages, put on the child's PYTHONPATH.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
POLL_S = 0.05
# Logs past this many times max_log_bytes mean something writes around the bounded print.
LOG_FLOOD_FACTOR = 100

_warned: set[str] = set()
_warn_lock = threading.Lock()


class SandboxUnavailable(RuntimeError):
    """The requested sandbox runner cannot be used on this machine."""


@dataclass
class SandboxLimits:
    """Resource limits for one sandboxed job."""

    timeout_s: float = 60.0
    memory_mb: int = 2048
    max_output_mb: int = 1024
    max_log_bytes: int = 64_000
    max_processes: int = 64

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """The limits as JSON-ready values."""
        return asdict(self)


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


@dataclass
class _Watch:
    """What the watchdog saw: why it killed the job (if it did) and the peak anonymous memory."""

    killed_for: str | None = None
    peak_mb: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class ProcessRunner:
    """One fresh harness process per job, confined by rlimits, a process group and unshare.

    Weaker than Docker: the file system is shared (the program only reaches it through
    RestrictedPython escapes the policy is there to prevent) and so is the kernel.
    """

    name = "process"

    def __init__(self, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        _warn_once(
            "process",
            "PROCESS SANDBOX: weaker isolation than Docker (shared kernel, no memory cgroup); "
            + (
                "confinement is bubblewrap (no network, own pid/ipc namespaces, read-only host "
                "view) + RestrictedPython + rlimits"
                if bubblewrap()
                else "confinement is RestrictedPython + rlimits + a process group"
                + (
                    " + a network namespace; the host file system is NOT read-only "
                    "(install bubblewrap)"
                    if network_prefix()
                    else "; network and file system NOT isolated (install bubblewrap)"
                )
            ),
        )

    def run(self, job: MergeJob) -> SandboxResult:
        """Check the policy, then run the job in a fresh harness process and judge it."""
        start = time.perf_counter()
        policy = check_program(job.source)
        if not policy.ok:
            return rejected(SandboxResult, policy, start, self.name)
        out_dir = Path(job.out_dir).resolve()
        control = Path(tempfile.mkdtemp(prefix="coevo-sandbox-"))
        staging: Path | None = None
        compute_s = 0.0
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            # Staged next to out_dir (same file system, so the final rename is atomic); a
            # failed or killed job leaves nothing at out_dir.
            staging = Path(tempfile.mkdtemp(prefix=f".sandbox-{out_dir.name}-", dir=out_dir.parent))
            payload = {**job.to_dict(), "out_dir": str(staging / "model")}
            verdict, reason, peak_mb, compute_s = self._run_harness(payload, control, staging)
            if verdict == "ok":
                problem = install_model(staging / "model", out_dir)
                if problem is not None:
                    verdict, reason = "sandbox_error", problem
            stdout = read_log(control / "stdout.log", self.limits.max_log_bytes)
            stderr = read_log(control / "stderr.log", self.limits.max_log_bytes)
        except OSError as err:
            verdict, reason, peak_mb, stdout, stderr = (
                "sandbox_error",
                f"sandbox setup failed: {err}",
                0.0,
                "",
                "",
            )
        finally:
            shutil.rmtree(control, ignore_errors=True)
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return SandboxResult(
            verdict,
            reason,
            time.perf_counter() - start,
            peak_mb,
            stdout,
            stderr,
            self.name,
            compute_s,
        )

    @property
    def description(self) -> str:
        """Which confinement this machine gives the process runner."""
        return f"process ({self.confinement()})"

    @staticmethod
    def confinement() -> str:
        """bubblewrap, a network namespace, or nothing beyond rlimits: what works here."""
        if bubblewrap():
            return "bubblewrap"
        return "network namespace" if network_prefix() else "NO isolation beyond rlimits"

    def close(self) -> None:
        """Nothing to release: each job's process is gone when `run` returns."""

    def run_check(self, job: CheckJob) -> CheckResult:
        """Score answers with task-checker code in a fresh harness process (no models)."""
        from sandbox.checker import CheckResult

        start = time.perf_counter()
        policy = check_checker(job.source)
        if not policy.ok:
            return rejected(CheckResult, policy, start, self.name)
        control = Path(tempfile.mkdtemp(prefix="coevo-check-"))
        try:
            (control / "out").mkdir()
            verdict, reason, peak_mb, _ = self._run_harness(job.to_dict(), control, control / "out")
            scores, errors = read_scores(control / "result.json") if verdict == "ok" else (None, None)
            return CheckResult(
                verdict,
                reason,
                time.perf_counter() - start,
                peak_mb,
                scores,
                errors,
                read_log(control / "stdout.log", self.limits.max_log_bytes),
                read_log(control / "stderr.log", self.limits.max_log_bytes),
                self.name,
            )
        finally:
            shutil.rmtree(control, ignore_errors=True)

    def _run_harness(
        self, payload: dict[str, Any], control: Path, staging: Path
    ) -> tuple[str, str, float, float]:
        """Run the harness on `payload` (a job dict); `staging` is its writable output dir."""
        limits = self.limits
        job_file = control / "job.json"
        result_file = control / "result.json"
        job_file.write_text(
            json.dumps({**payload, "result_path": str(result_file), "limits": limits.to_dict()})
        )
        for sub in ("home", "tmp"):
            (control / sub).mkdir()
        command = [
            *confinement_prefix(control, staging),
            sys.executable,
            "-s",
            "-B",
            "-X",
            "faulthandler",
            "-m",
            "sandbox.harness",
            str(job_file),
        ]
        with open(control / "stdout.log", "wb") as out, open(control / "stderr.log", "wb") as err:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=control,
                env=_child_env(control),
                start_new_session=True,
                close_fds=True,
            )
        watch = _Watch()
        watchdog = threading.Thread(
            target=_watchdog, args=(proc.pid, control, limits, watch), daemon=True
        )
        watchdog.start()
        # Wait without reaping, so the process group id cannot be reused before the group
        # (including anything the program spawned) is killed, then reap with rusage.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        _kill_group(proc.pid)
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        watch.done.set()
        watchdog.join()

        peak_mb = max(rusage.ru_maxrss / 1024, watch.peak_mb)
        if watch.killed_for == "timeout":
            return "timeout", f"exceeded the {limits.timeout_s:g} s wall-clock limit", peak_mb, 0.0
        if watch.killed_for == "memory":
            return (
                "memory_exceeded",
                f"used more than the {limits.memory_mb} MB memory limit",
                peak_mb,
                0.0,
            )
        if watch.killed_for == "logs":
            return (
                "runtime_error",
                f"wrote more than {LOG_FLOOD_FACTOR * limits.max_log_bytes} bytes of logs",
                peak_mb,
                0.0,
            )
        result = read_result(result_file)
        if result is not None:
            verdict, reason, result_peak, compute_s = result
            return verdict, reason, max(peak_mb, result_peak), compute_s
        stderr_tail = tail(control / "stderr.log")
        code = proc.returncode
        if code < 0:
            sig = signal.Signals(-code)
            if sig == signal.SIGXCPU:
                return "timeout", "exceeded the CPU-time limit", peak_mb, 0.0
            return "runtime_error", f"sandbox process killed by {sig.name}: {stderr_tail}", peak_mb, 0.0
        return (
            "sandbox_error",
            f"harness exited with code {code} and no result: {stderr_tail}",
            peak_mb,
            0.0,
        )


def rejected(result: type[_R], policy: PolicyVerdict, start: float, runner: str) -> _R:
    """The result of a program the static policy refused (it never ran)."""
    return unrun(result, "rejected_by_policy", f"{policy.rule}: {policy.reason}", start, runner)


def unrun(result: type[_R], verdict: str, reason: str, start: float, runner: str) -> _R:
    """The result of a job that ended before its program ran (policy, models, the daemon)."""
    return result(verdict, reason, time.perf_counter() - start, 0.0, runner=runner)


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


def run_many(runner: Runner, jobs: Sequence[MergeJob], workers: int = 2) -> list[SandboxResult]:
    """Run jobs `workers` at a time (threads; each job is its own process), results in order."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(runner.run, jobs))


def make_runner(
    kind: str = "auto",
    limits: SandboxLimits | None = None,
    *,
    input_roots: Sequence[Path] = (),
    **docker_options: Any,
) -> Runner:
    """The runner for `kind`: "docker", "process", or "auto" (Docker when a daemon is
    reachable, else the process fallback, with a warning either way it falls back).

    `input_roots` are dirs that hold the models of many jobs (the zoo, a session's children):
    Docker mounts them read-only in one shared warm pool instead of a pool per set of models;
    the process runner needs nothing (under bubblewrap it sees the host read-only). The other
    `docker_options` go to `DockerRunner` (pool_size, max_pools, cpus, runtime, gpus,
    scratch_dir, ...). "docker" raises SandboxUnavailable with a one-line reason when Docker
    cannot be used.
    """
    if kind not in ("auto", "docker", "process"):
        raise ValueError(f"unknown sandbox runner {kind!r}: use 'auto', 'process' or 'docker'")
    if kind == "process":
        return ProcessRunner(limits)
    from sandbox.docker_runner import DockerRunner

    try:
        return DockerRunner(limits, input_roots=input_roots, **docker_options)
    except SandboxUnavailable as err:
        if kind == "docker":
            raise
        _warn_once("auto", f"Docker sandbox unavailable ({err}); falling back to the process sandbox")
        return ProcessRunner(limits)


def confinement_prefix(control: Path, staging: Path) -> list[str]:
    """The command prefix confining a harness process: bubblewrap if it works, else unshare.

    Under bubblewrap the child has its own network, pid, ipc and uts namespaces, a read-only
    view of the host (its TMPDIR is in the control dir), and exactly two writable dirs: its
    control dir (job file, logs, result) and the staging dir its model is written to.
    """
    if not bubblewrap():
        return list(network_prefix())
    binds = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in (control, staging):
        binds += ["--bind", str(path), str(path)]
    return [
        *bubblewrap(),
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
        *binds,
        "--chdir",
        str(control),
        "--",
    ]


@lru_cache(maxsize=1)
def bubblewrap() -> tuple[str, ...]:
    """`("bwrap",)` when bubblewrap is installed and can create its namespaces here, else ()."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return ()
    try:
        probe = subprocess.run(
            [bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--die-with-parent",
             "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--", "/bin/true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return (bwrap,) if probe.returncode == 0 else ()


@lru_cache(maxsize=1)
def network_prefix() -> tuple[str, ...]:
    """The command prefix that puts the child in an empty network namespace, if one works.

    Probed once: `unshare --net` as root, `unshare --net --map-current-user` or
    `unshare -rn` (a user namespace) otherwise. Without one the child keeps the host's
    network, and a warning says so.
    """
    unshare = shutil.which("unshare")
    candidates: list[tuple[str, ...]] = []
    if unshare:
        if os.geteuid() == 0:
            candidates.append((unshare, "--net"))
        candidates += [(unshare, "--net", "--map-current-user"), (unshare, "-rn")]
    for prefix in candidates:
        try:
            probe = subprocess.run(
                [*prefix, sys.executable, "-c", "import socket; socket.create_connection"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    _warn_once(
        "network",
        "process sandbox: cannot create a network namespace (unshare failed); "
        "sandboxed programs keep the host's network",
    )
    return ()


def _child_env(control: Path) -> dict[str, str]:
    # Built from nothing: no host secrets (tokens, keys, proxies) reach the program.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(SOURCE_ROOT),
        "HOME": str(control / "home"),
        "TMPDIR": str(control / "tmp"),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "PYTHONNOUSERSITE": "1",
        "PYTHONHASHSEED": "0",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }


def _watchdog(pid: int, control: Path, limits: SandboxLimits, watch: _Watch) -> None:
    """Kill the job's process group on a timeout, too much memory or a log flood."""
    deadline = time.monotonic() + limits.timeout_s
    log_cap = LOG_FLOOD_FACTOR * limits.max_log_bytes
    logs = [control / "stdout.log", control / "stderr.log"]
    while not watch.done.wait(POLL_S):
        anon_mb = _group_anon_memory_mb(pid)
        watch.peak_mb = max(watch.peak_mb, anon_mb)
        if time.monotonic() > deadline:
            watch.killed_for = "timeout"
        elif anon_mb > limits.memory_mb:
            watch.killed_for = "memory"
        elif any(_size(path) > log_cap for path in logs):
            watch.killed_for = "logs"
        if watch.killed_for:
            _kill_group(pid)
            return


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_anon_memory_mb(pgid: int) -> float:
    """Anonymous + shmem resident memory of every process in the group, from /proc.

    File-backed pages (the memory-mapped weights) are left out: the kernel can drop them.
    """
    total_kb = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields after the command: state, ppid, pgrp, ...
                continue
            with open(f"/proc/{entry.name}/status") as status:
                for line in status:
                    if line.startswith(("RssAnon:", "RssShmem:")):
                        total_kb += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total_kb / 1024


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_log(path: Path, max_bytes: int) -> str:
    """The log, or its head and tail around a marker when it is over `max_bytes`."""
    size = _size(path)
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


def _warn_once(key: str, message: str) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)
