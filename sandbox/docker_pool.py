"""Docker plumbing for `sandbox.docker_runner`: the daemon, warm containers and their pool,
and where a job's model dirs are mounted.

- `docker_client` / `docker_problem`: the local daemon, or why it cannot be used.
- `ContainerSpec`: everything that confines a sandbox container.
- `Channel`: line-oriented JSON over a container's attached stdin / stdout.
- `Pool`: K warm containers for one set of read-only mounts, refilled in the background; it
  starts and discards containers through the callables it is given, so it knows nothing of
  how they are confined.
- `InputRoots`: shared read-only input roots (the zoo, a session's children) and how a job's
  model dirs map into a container: under the roots, one pool serves every job; otherwise each
  job mounts exactly its own dirs.
"""

from __future__ import annotations

import json
import os
import queue
import select
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.jobs import (
    TORCH_ENV,
    MergeJob,
    SandboxLimits,
    SandboxUnavailable,
    available_cpus,
    thread_env,
)

START_TIMEOUT_S = 180.0
# The worker (python + torch imported) on top of the job's own memory limit.
WORKER_OVERHEAD_MB = 768
SANDBOX_UID = 10001
LABEL = "coevo.sandbox"

# Host dir -> container dir, each mounted read-only; also the key of a warm pool.
Mounts = tuple[tuple[Path, str], ...]


def docker_client() -> Any:
    """A client for the local Docker daemon, or SandboxUnavailable saying why not."""
    try:
        import docker
        import docker.errors
    except ImportError as err:  # pragma: no cover - docker is a dependency
        raise SandboxUnavailable(f"the docker Python package is missing: {err}") from err
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except docker.errors.DockerException as err:
        raise SandboxUnavailable(f"no Docker daemon reachable ({first_line(err)})") from err
    return client


def docker_problem(gpu: bool = False) -> str | None:
    """None when a daemon is reachable and the current sandbox image exists; else why not."""
    from sandbox.image import image_exists, image_tag

    try:
        client = docker_client()
    except SandboxUnavailable as err:
        return str(err)
    tag = image_tag(gpu)
    if not image_exists(client, tag):
        return f"sandbox image {tag} is not built (run `coevo sandbox build --offline`)"
    return None


class Channel:
    """Line-oriented JSON messages over a container's attached stdin / stdout.

    Without a TTY, Docker multiplexes the attached output in frames: an 8-byte header
    (stream, 0, 0, 0, big-endian length) and the payload. Only stdout frames carry replies.
    """

    def __init__(self, sock: Any) -> None:
        self.sock: socket.socket = getattr(sock, "_sock", sock)
        self._raw = sock  # keeps the HTTP response (and the connection) alive
        self._buffer = b""
        self._pending = b""
        self._lines: deque[str] = deque()

    def send(self, message: dict[str, Any]) -> None:
        """Write one JSON line to the container's stdin."""
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def read_line(self, timeout: float) -> str | None:
        """The next line, None after `timeout` seconds; EOFError when the container is gone."""
        end = time.monotonic() + timeout
        while not self._lines:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if not ready:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("container output closed")
            self._feed(chunk)
        return self._lines.popleft()

    def _feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        while len(self._buffer) >= 8:
            (size,) = struct.unpack(">I", self._buffer[4:8])
            if len(self._buffer) < 8 + size:
                break
            stream, payload = self._buffer[0], self._buffer[8 : 8 + size]
            self._buffer = self._buffer[8 + size :]
            if stream == 1:
                self._pending += payload
        *complete, self._pending = self._pending.split(b"\n")
        self._lines.extend(line.decode("utf-8", "replace") for line in complete if line.strip())

    def close(self) -> None:
        """Close the socket (the container keeps running until it is removed)."""
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass(frozen=True)
class ContainerSpec:
    """How every container of a runner is confined: its image, user, limits and devices."""

    image: str
    uid: int
    gid: int
    limits: SandboxLimits
    scratch_mb: int
    runtime: str | None
    gpus: str | int | None

    def kwargs(self, mounts: Mounts, out_dir: Path, command: list[str], name: str) -> dict[str, Any]:
        """Everything that confines a container; the only host paths are `mounts` (read-only)
        and `out_dir` (at /out)."""
        from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

        memory = f"{self.limits.memory_mb + WORKER_OVERHEAD_MB}m"
        # Mount objects, not `volumes`: the same dir may be mounted twice (base == expert), and
        # a missing source is an error rather than an empty root-owned dir the daemon creates.
        binds = [
            Mount(target, str(source), type="bind", read_only=True) for source, target in mounts
        ]
        binds.append(Mount("/out", str(out_dir), type="bind", read_only=False))
        kwargs: dict[str, Any] = {
            "image": self.image,
            "command": command,
            "name": name,
            "user": f"{self.uid}:{self.gid}",
            "network_mode": "none",
            "read_only": True,
            "tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={self.scratch_mb}m,mode=1777"},
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],  # Docker's default seccomp stays on
            "pids_limit": self.limits.max_processes + 16,
            "mem_limit": memory,
            "memswap_limit": memory,
            # The daemon refuses a quota above the machine's cores; threads may still exceed it.
            "nano_cpus": int(min(self.limits.cpus, available_cpus()) * 1e9),
            "ulimits": [Ulimit(name="core", soft=0, hard=0)],
            "mounts": binds,
            "environment": {
                **thread_env(self.limits.threads),
                **TORCH_ENV,
                "PYTHONHASHSEED": "0",
                # With GPUs, the device request decides which the container sees (numbered from
                # 0 inside it): the host's own CUDA_VISIBLE_DEVICES would not name them.
                **({"CUDA_VISIBLE_DEVICES": ""} if self.gpus is None else {}),
            },
            "working_dir": "/tmp",
            "hostname": "sandbox",
            "ipc_mode": "none",
            "log_config": LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
            "labels": {LABEL: "1", f"{LABEL}.host": socket.gethostname(), f"{LABEL}.pid": str(os.getpid())},
            "stdin_open": True,
            "detach": True,
        }
        if self.runtime:
            kwargs["runtime"] = self.runtime
        if self.gpus is not None:
            count = -1 if self.gpus == "all" else int(self.gpus)
            kwargs["device_requests"] = [DeviceRequest(count=count, capabilities=[["gpu"]])]
        return kwargs


@dataclass
class Worker:
    """One warm container: its attached channel and its host-side /out dir."""

    container: Any
    channel: Channel
    out_dir: Path
    jobs: int = 0


@dataclass
class Pool:
    """Warm containers for one set of read-only mounts, refilled in the background.

    `start(mounts)` makes a ready container and `discard(worker)` removes one; a container
    goes back to the pool after a job unless it must retire (a job that did not end cleanly,
    or `jobs_per_container` jobs done).
    """

    mounts: Mounts
    size: int
    start: Callable[[Mounts], Worker]
    discard: Callable[[Worker], None]
    jobs_per_container: int
    ready: queue.Queue[Worker | BaseException] = field(default_factory=queue.Queue)
    live: int = 0
    busy: int = 0  # jobs holding this pool; guarded by the runner's lock, not `lock`
    all_workers: dict[int, Worker] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def fill(self) -> None:
        """Start containers until `size` exist or are starting."""
        with self.lock:
            missing = 0 if self.closed else self.size - self.live
            self.live += max(missing, 0)
        for _ in range(missing):
            threading.Thread(target=self._start_one, daemon=True, name="sandbox-warm").start()

    def _start_one(self) -> None:
        try:
            worker = self.start(self.mounts)
        except BaseException as err:  # handed to the job waiting for a container
            with self.lock:
                self.live -= 1
            self.ready.put(err)
            return
        with self.lock:
            closed = self.closed
            if not closed:
                self.all_workers[id(worker)] = worker
        if closed:
            self.discard(worker)
        else:
            self.ready.put(worker)

    def acquire(self) -> Worker:
        """A ready container (waiting for one to start if needed)."""
        self.fill()
        item = self.ready.get(timeout=START_TIMEOUT_S + 30)
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, worker: Worker, retire: bool) -> None:
        """Back to the pool, or retired (and replaced) after a violation or N jobs."""
        if not retire and worker.jobs < self.jobs_per_container and not self.closed:
            self.ready.put(worker)
            return
        with self.lock:
            self.all_workers.pop(id(worker), None)
            self.live -= 1
        threading.Thread(target=self.discard, args=(worker,), daemon=True).start()
        self.fill()

    def close(self) -> None:
        """Remove every container of the pool; none starts after this."""
        with self.lock:
            self.closed = True
            workers = list(self.all_workers.values())
            self.all_workers.clear()
        for worker in workers:
            self.discard(worker)


class Pools:
    """The warm pools of a runner, one per set of mounts, at most `max_pools` alive: making a
    new one closes the least recently used pools with no job in flight."""

    def __init__(self, max_pools: int, make: Callable[[Mounts], Pool]) -> None:
        self.max_pools = max_pools
        self._make = make
        self._pools: OrderedDict[Mounts, Pool] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._closed = False

    def hold(self, mounts: Mounts) -> Pool:
        """The pool for these mounts, held for one job until `unhold`."""
        with self._lock:
            if self._closed:
                raise SandboxUnavailable("the docker runner is closed")
            pool = self._pools.get(mounts)
            if pool is None:
                pool = self._pools[mounts] = self._make(mounts)
            self._pools.move_to_end(mounts)
            pool.busy += 1
            evicted = self._evict()
        for old in evicted:
            old.close()
        return pool

    def unhold(self, pool: Pool) -> None:
        """The job that held `pool` is done with it."""
        with self._lock:
            pool.busy -= 1
            evicted = self._evict()
        for old in evicted:
            old.close()

    def _evict(self) -> list[Pool]:
        """Take the least recently used idle pools out while more than `max_pools` live (a
        pool with a job in flight stays; the bound is met again when it goes idle)."""
        evicted: list[Pool] = []
        idle = [pool for pool in self._pools.values() if pool.busy == 0]
        while len(self._pools) > self.max_pools and idle:
            pool = idle.pop(0)
            del self._pools[pool.mounts]
            evicted.append(pool)
        return evicted

    def close(self) -> bool:
        """Close every pool; False when they were closed already."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            pools = list(self._pools.values())
        for pool in pools:
            pool.close()
        return True


class InputRoots:
    """Shared read-only input roots and where a job's model dirs are inside its container."""

    def __init__(self, roots: tuple[Path, ...]) -> None:
        self.roots = roots
        self._readable: set[Path] = set()

    def place(self, inputs: tuple[Path, ...]) -> tuple[Mounts, tuple[str, ...]]:
        """The mounts a job's containers need and its model dirs' paths inside them.

        All dirs under the input roots: the roots (shared by every such job). Otherwise, or for
        a job with no models (checkers): exactly its own dirs, at /in/0, /in/1, ...
        """
        under_roots = [self._root_path(path) for path in inputs]
        paths = tuple(path for path in under_roots if path is not None)
        if inputs and len(paths) == len(inputs):
            return tuple((root, f"/roots/{i}") for i, root in enumerate(self.roots)), paths
        own = tuple((path, f"/in/{i}") for i, path in enumerate(inputs))
        return own, tuple(target for _, target in own)

    def root_of(self, path: Path) -> Path | None:
        """The innermost input root holding `path` (resolved), or None."""
        holding = [root for root in self.roots if path.is_relative_to(root)]
        return max(holding, key=lambda root: len(root.parts)) if holding else None

    def _root_path(self, path: Path) -> str | None:
        """Where `path` is in a shared-roots container, or None when no root holds it."""
        root = self.root_of(path)
        if root is None:
            return None
        mounted = f"/roots/{self.roots.index(root)}"
        return mounted if path == root else f"{mounted}/{path.relative_to(root).as_posix()}"

    def problem(self, inputs: tuple[Path, ...]) -> str | None:
        """Why the container user cannot read the model dirs, or None (each dir checked once).

        Under an input root the dirs between the root and the model dir must be searchable
        too; the roots themselves were checked when the runner was made (`root_problem`).
        """
        for model_dir in inputs:
            if model_dir in self._readable:
                continue
            if not model_dir.is_dir():
                return f"model dir '{model_dir}' does not exist"
            if os.getuid() == 0:  # else the container runs as this user: it reads what we read
                problem = _unreadable(model_dir, self.root_of(model_dir))
                if problem is not None:
                    return problem
            self._readable.add(model_dir)
        return None


def job_inputs(job: MergeJob) -> tuple[Path, ...]:
    """The model dirs a merge job reads, resolved: base first, then the experts."""
    return tuple(Path(d).resolve() for d in [job.base_dir, *job.expert_dirs])


def root_problem(root: Path) -> str | None:
    """Why `root` cannot be a shared input root, or None."""
    if not root.is_dir():
        return f"input root '{root}' is not a directory: create it before making the runner"
    if os.getuid() == 0 and not root.stat().st_mode & 0o001:
        return (
            f"input root '{root}' is not searchable by the sandbox user (uid {SANDBOX_UID}): "
            f"run `chmod o+x {root}`"
        )
    return None


def _unreadable(model_dir: Path, root: Path | None) -> str | None:
    """Why the sandbox user cannot read `model_dir`, or reach it from its input `root`."""
    between = [parent for parent in model_dir.parents if root and parent.is_relative_to(root)]
    for parent in between:
        if not parent.stat().st_mode & 0o001:
            return (
                f"'{parent}' is not searchable by the sandbox user (uid {SANDBOX_UID}): "
                f"run `chmod o+x {parent}`"
            )
    for path in [model_dir, *model_dir.rglob("*")]:
        mode = path.stat().st_mode
        if not mode & 0o004 or (path.is_dir() and not mode & 0o001):
            return (
                f"'{path}' is not readable by the sandbox user (uid {SANDBOX_UID}): "
                f"run `chmod -R a+rX {model_dir}`"
            )
    return None


def container_logs(container: Any, *, stdout: bool) -> bytes:
    """A container's stdout or stderr; empty when the container is gone."""
    try:
        data: bytes = container.logs(stdout=stdout, stderr=not stdout)
        return data
    except Exception:  # noqa: BLE001 - the container is gone
        return b""


def kill(container: Any) -> None:
    """SIGKILL a container (nothing when it is already dead)."""
    try:
        container.kill()
    except Exception:  # noqa: BLE001 - already dead
        pass


def remove(container: Any) -> None:
    """Remove a container, killing it first if it runs (nothing when it is gone)."""
    try:
        container.remove(force=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


def remove_stale_containers(client: Any) -> None:
    """Remove sandbox containers left by coevo processes on this host that no longer exist."""
    host = socket.gethostname()
    try:
        containers = client.containers.list(all=True, filters={"label": LABEL}, ignore_removed=True)
    except Exception:  # noqa: BLE001
        return
    for container in containers:
        labels = container.labels or {}
        if labels.get(f"{LABEL}.host") != host:
            continue
        try:
            os.kill(int(labels.get(f"{LABEL}.pid", "0")), 0)
            continue  # its owner is alive
        except (ProcessLookupError, ValueError):
            pass
        except PermissionError:
            continue
        remove(container)


def first_line(err: BaseException) -> str:
    """The first line of a Docker error's explanation (or of the error), at most 300 chars."""
    text = str(getattr(err, "explanation", None) or err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
