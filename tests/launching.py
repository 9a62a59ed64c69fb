"""Driving `coevo launch` from tests as a user would: a child process in its own process group
(so a test can SIGKILL the session with everything it started), its output read line by line."""

from __future__ import annotations

import subprocess
import sys
import time


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`coevo launch ARGS` running, stdout and stderr together."""
    return subprocess.Popen(
        [sys.executable, "-m", "coevo", "launch", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=env,
    )


def read_until(proc: subprocess.Popen[str], marker: str, seen: list[str], timeout: float = 900) -> str:
    """Lines of a running launch until one containing `marker` (returned)."""
    assert proc.stdout is not None
    deadline = time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return line
        assert time.time() < deadline, "".join(seen)
    raise AssertionError(f"{marker!r} never printed:\n{''.join(seen)}")
