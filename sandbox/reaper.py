"""Removes a process's sandbox containers once the process is gone, however it ended.

`DockerRunner` starts one reaper per process (`start_reaper`): a small detached process that
polls whether its owner lives and, once it does not (SIGKILL, a crash, Ray ending an actor),
removes the containers labelled with the owner's host and pid. A clean exit removes them
itself (`DockerRunner.close`, at exit); the reaper covers every other ending, so a killed
orchestrator or cluster node actor leaves no container running.

    python -m sandbox.reaper <pid>
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from sandbox.docker_pool import LABEL, docker_client, remove, remove_stale_containers

POLL_S = 1.0
_started: set[int] = set()
_lock = threading.Lock()


def alive(pid: int) -> bool:
    """Whether process `pid` exists (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def start_reaper() -> None:
    """Start this process's reaper, once (a no-op when it runs already)."""
    pid = os.getpid()
    with _lock:
        if pid in _started:
            return
        _started.add(pid)
        subprocess.Popen(  # noqa: S603 - our own module, with our pid
            [sys.executable, "-m", "sandbox.reaper", str(pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )


def reap(pid: int) -> int:
    """Remove the containers of the (gone) process `pid` on this host; how many."""
    client = docker_client()
    import socket

    host = socket.gethostname()
    removed = 0
    for container in client.containers.list(all=True, filters={"label": f"{LABEL}.pid={pid}"}, ignore_removed=True):
        if (container.labels or {}).get(f"{LABEL}.host") == host:
            remove(container)
            removed += 1
    remove_stale_containers(client)
    return removed


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m sandbox.reaper <pid>", file=sys.stderr)
        return 2
    pid = int(argv[0])
    while alive(pid):
        time.sleep(POLL_S)
    try:
        reap(pid)
    except Exception as err:  # noqa: BLE001 - the daemon is gone too: nothing left to remove
        print(f"reaper: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
