"""A workdir's lock: one session (or one archive writer) at a time, named when it is busy.

Kept apart from `coevo.session` so light commands (`coevo review approve`, `coevo serve`) can
take it without importing the session's machinery (torch, LangGraph)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

LOCK_FILE = "session.lock"


class SessionError(ValueError):
    """A session cannot start or resume (nothing to resume, a busy workdir, bad model dirs…)."""


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[IO[str]]:
    """Hold the workdir's lock while a session runs: a second launch fails at once, naming the
    running session and its pid (`write_holder` on the yielded file records them). The lock is
    the kernel's (flock): it dies with its process, so a killed session never leaves a stale one."""
    path = workdir / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 - held until the session ends
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except ValueError:
                holder = {}
            raise SessionError(
                f"workdir {workdir} is in use by session {holder.get('session_id') or '(starting)'} "
                f"(pid {holder.get('pid', '?')}): wait for it to finish or stop it, then "
                "`coevo launch --resume`"
            ) from None
        write_holder(handle, None)
        yield handle
    finally:
        handle.close()


def write_holder(handle: IO[str], session_id: str | None) -> None:
    """Record this process and its session in the held lock file, for a second launch to name."""
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "session_id": session_id}))
    handle.flush()
