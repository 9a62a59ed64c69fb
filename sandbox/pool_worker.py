"""The main process of a warm sandbox container: `python -m sandbox.pool_worker`.

It imports torch, safetensors, RestrictedPython and the harness once, says `{"ready": true}`
and then serves jobs, one JSON line each on stdin: `{"id": ID, "job": JOB}` with JOB as for
`sandbox.harness` (container paths; `result_path` and `out_dir` inside the job's directory
under /out). Each job runs in a fresh child forked from this process, so the imports are
already done: the child redirects its stdout / stderr to `stdout.log` / `stderr.log` next to
`result_path`, confines itself with the job's rlimits (`harness.execute`) and exits. The
worker then SIGKILLs every other process in the container (anything the program left
behind), reaps them, and answers one line on stdout:
`{"id": ID, "status": EXIT_CODE_OR_MINUS_SIGNAL, "maxrss_mb": ..., "wall_s": ...}`.

The container, not this process, is the security boundary: the runner on the host enforces
the wall-clock limit by killing the container, and retires a container after N jobs or after
any job that did not end cleanly. The worker exits when stdin closes (the runner went away).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

# Everything a job needs is imported before the first fork (the point of a warm container).
import torch

import merging.apply  # noqa: F401
from merging import contract
from sandbox import harness
from sandbox.policy import check_program


def main() -> int:
    """Serve jobs until stdin closes."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    check_program(f"{contract.SIGNATURE}:\n    return base\n")  # warm caches
    # Replies go to a private copy of stdout; fd 1 points at /dev/null so stray writes
    # (warnings, a library printing) cannot corrupt the protocol.
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _send(reply, {"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        status, maxrss_mb, wall_s = _run_child(message["job"], reply.fileno())
        _send(
            reply,
            {"id": message["id"], "status": status, "maxrss_mb": maxrss_mb, "wall_s": wall_s},
        )
    return 0


def _run_child(job: dict[str, Any], reply_fd: int) -> tuple[int, float, float]:
    """Fork, run the job in the child, wait; the child's exit status, peak RSS and wall time."""
    job_dir = Path(job["result_path"]).parent
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(reply_fd)
            os.setpgid(0, 0)
            _redirect(0, os.devnull, os.O_RDONLY)
            _redirect(1, str(job_dir / "stdout.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            _redirect(2, str(job_dir / "stderr.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            harness.execute(job)
            code = 0
        except BaseException as err:  # noqa: BLE001 - reported through stderr.log and the status
            try:
                os.write(2, f"pool worker child failed: {type(err).__name__}: {err}\n".encode())
            except OSError:
                pass
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                pass
            os._exit(code)
    _, status, rusage = os.wait4(pid, 0)
    wall_s = time.perf_counter() - start
    _kill_leftovers()
    return os.waitstatus_to_exitcode(status), rusage.ru_maxrss / 1024, wall_s


def _redirect(fd: int, path: str, flags: int) -> None:
    target = os.open(path, flags, 0o644)
    os.dup2(target, fd)
    os.close(target)


def _kill_leftovers() -> None:
    """SIGKILL every process in the container but this one, and reap what was ours."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.001)


def _send(reply: Any, message: dict[str, Any]) -> None:
    reply.write(json.dumps(message) + "\n")
    reply.flush()


if __name__ == "__main__":
    sys.exit(main())
