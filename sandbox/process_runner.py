"""The process sandbox: a fresh confined `python -m sandbox.harness` process per job.

The fallback that works everywhere (`runner = "process"`, or "auto" without a Docker daemon):
the job runs in its own process group under bubblewrap when it is installed (no network, own
pid / ipc / uts namespaces, a read-only view of the host, two writable dirs), otherwise in a
network namespace (`unshare`) when the OS allows one; always with a scrubbed environment,
rlimits (applied by the harness, see `sandbox.harness.apply_limits`), a wall-clock kill and a
memory watchdog enforced from outside. It says loudly, once, what it lacks next to Docker.
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
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sandbox.jobs import (
    LOG_FLOOD_FACTOR,
    TORCH_ENV,
    CheckJob,
    CheckResult,
    MergeJob,
    SandboxLimits,
    SandboxResult,
    check_result,
    file_size,
    merge_result,
    read_result,
    rejected,
    tail,
    thread_env,
    unrun,
)
from sandbox.policy import check_checker, check_program

log = logging.getLogger("coevo.sandbox")

# The dir holding the `sandbox` and `merging` packages, put on the child's PYTHONPATH.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.05

_warned: set[str] = set()
_warn_lock = threading.Lock()


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

    def __init__(self, limits: SandboxLimits | None = None, *, gpus: str | int | None = None) -> None:
        self.limits = limits or SandboxLimits()
        # Which host GPUs a job sees: all of them, or the first `gpus` (merges then run on CUDA).
        self.gpus = None if gpus in (None, "") else str(gpus)
        warn_once(
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
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            # Staged next to out_dir (same file system, so the final rename is atomic); a
            # failed or killed job leaves nothing at out_dir.
            staging = Path(tempfile.mkdtemp(prefix=f".sandbox-{out_dir.name}-", dir=out_dir.parent))
            payload = {**job.to_dict(), "out_dir": str(staging / "model")}
            verdict, reason, peak_mb, compute_s = self._run_harness(payload, control, staging)
            return merge_result(
                verdict, reason, start=start, peak_mb=peak_mb, compute_s=compute_s, model=staging / "model",
                out_dir=out_dir, logs=control, runner=self.name, max_log_bytes=self.limits.max_log_bytes,
            )
        except OSError as err:
            return unrun(SandboxResult, "sandbox_error", f"sandbox setup failed: {err}", start, self.name)
        finally:
            shutil.rmtree(control, ignore_errors=True)
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

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
        start = time.perf_counter()
        policy = check_checker(job.source)
        if not policy.ok:
            return rejected(CheckResult, policy, start, self.name)
        control = Path(tempfile.mkdtemp(prefix="coevo-check-"))
        try:
            (control / "out").mkdir()
            verdict, reason, peak_mb, _ = self._run_harness(job.to_dict(), control, control / "out")
            return check_result(
                verdict, reason, start=start, peak_mb=peak_mb, logs=control, runner=self.name,
                max_log_bytes=self.limits.max_log_bytes,
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
            json.dumps({
                **payload,
                "result_path": str(result_file),
                "limits": limits.to_dict(),
                "device": "cpu" if self.gpus is None else "cuda",
            })
        )
        for sub in ("home", "tmp"):
            (control / sub).mkdir()
        command = [
            *confinement_prefix(control, staging, gpus=self.gpus is not None),
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
                env=_child_env(control, limits.threads, self.gpus),
                start_new_session=True,
                close_fds=True,
            )
        watch = _Watch()
        watchdog = threading.Thread(
            target=_watchdog, args=(proc.pid, control, limits, watch), daemon=True
        )
        watchdog.start()
        # Wait without reaping, so the process group id cannot be reused before the group
        # (including anything the program spawned) is killed, then reap it.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        _kill_group(proc.pid)
        _, status, _ = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        watch.done.set()
        watchdog.join()

        # Not rusage.ru_maxrss: a child exec'd from this process starts from this process's peak
        # (see harness.peak_rss_mb); the watchdog's samples and the harness's own figure do not.
        peak_mb = watch.peak_mb
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


def confinement_prefix(control: Path, staging: Path, *, gpus: bool = False) -> list[str]:
    """The command prefix confining a harness process: bubblewrap if it works, else unshare.

    Under bubblewrap the child has its own network, pid, ipc and uts namespaces, a read-only
    view of the host (its TMPDIR is in the control dir), and exactly two writable dirs: its
    control dir (job file, logs, result) and the staging dir its model is written to. With
    `gpus`, the NVIDIA device nodes are bound into its otherwise minimal /dev.
    """
    if not bubblewrap():
        return list(network_prefix())
    binds = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    if gpus:
        for device in sorted(Path("/dev").glob("nvidia*")):
            binds += ["--dev-bind", str(device), str(device)]
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
    warn_once(
        "network",
        "process sandbox: cannot create a network namespace (unshare failed); "
        "sandboxed programs keep the host's network",
    )
    return ()


def _child_env(control: Path, threads: int, gpus: str | None) -> dict[str, str]:
    # Built from nothing: no host secrets (tokens, keys, proxies) reach the program.
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(SOURCE_ROOT),
        "HOME": str(control / "home"),
        "TMPDIR": str(control / "tmp"),
        "LANG": "C.UTF-8",
        **thread_env(threads),
        **TORCH_ENV,
        "PYTHONNOUSERSITE": "1",
        "PYTHONHASHSEED": "0",
        "HF_HUB_OFFLINE": "1",
    }
    visible = _visible_gpus(gpus)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return env


def _visible_gpus(gpus: str | None) -> str | None:
    """CUDA_VISIBLE_DEVICES for a job ("" = none; None = leave it unset, all GPUs): without
    `gpus` none, with "all" the host's own setting, with a count the first that many of the
    devices the host sees."""
    host = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus is None:
        return ""
    if gpus == "all":
        return host
    devices = host.split(",") if host else [str(i) for i in range(int(gpus))]
    return ",".join(devices[: int(gpus)])


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
        elif any(file_size(path) > log_cap for path in logs):
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


def warn_once(key: str, message: str) -> None:
    """Log `message` as a warning the first time `key` is seen in this process."""
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)
