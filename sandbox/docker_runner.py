"""The Docker sandbox runner: every job in a hardened container of the coevo sandbox image.

Each container has no network, a read-only root, a small size-capped tmpfs at /tmp, a
non-root user, all capabilities dropped, no-new-privileges, Docker's default seccomp
profile, a pids limit, a memory limit equal to its memory+swap limit and a CPU quota. The
model dirs are mounted read-only at /in/0, /in/1, ...; exactly one host dir is writable, at
/out, and the runner kills the container when it grows past the output cap. Nothing else
from the host reaches it: no Docker socket, no other path, a scrubbed environment. gVisor
(`runtime="runsc"`) and GPUs (`gpus=...`) are options.

Shared input roots (`input_roots=[zoo, workdir / "models"]`): a job whose model dirs all lie
under the roots runs in containers that mount each root read-only at /roots/0, /roots/1, ...
and gets its paths translated (`<root 1>/gen3/child7` -> `/roots/1/gen3/child7`), so jobs
over ever-new pairs of models (children of earlier generations) share one warm pool. A bind
mount shows what is written under the root later, so new children need no new container.
Other jobs mount exactly their own dirs at /in/N, as above.

Two modes behind the same `run`:

- warm pool (`pool_size >= 1`, the default): K containers per set of mounts (the shared
  roots, or one job's model dirs) run `sandbox.pool_worker` with torch already imported; each
  job is a fresh child process forked in one of them, under rlimits. A container is retired
  (killed, removed, replaced in the background) after `jobs_per_container` jobs or after any
  job that did not end `ok` or `output_invalid`. The wall-clock limit is enforced from the
  host by killing the container. At most `max_pools` pools live: a new one closes the least
  recently used pool with no job in flight.
- cold (`pool_size = 0`): one `docker run` of `sandbox.harness` per job, removed afterwards.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sandbox.runner import (
    LOG_FLOOD_FACTOR,
    MergeJob,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    install_model,
    read_log,
    read_result,
    read_scores,
    rejected,
    tail,
    unrun,
)

if TYPE_CHECKING:
    from sandbox.checker import CheckJob, CheckResult

log = logging.getLogger("coevo.sandbox")

POLL_S = 0.05
START_TIMEOUT_S = 180.0
# The worker (python + torch imported) on top of the job's own memory limit.
WORKER_OVERHEAD_MB = 768
SANDBOX_UID = 10001
LABEL = "coevo.sandbox"
# Verdicts after which a warm container is trusted with the next job.
CLEAN_VERDICTS = ("ok", "output_invalid")

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
        raise SandboxUnavailable(f"no Docker daemon reachable ({_first_line(err)})") from err
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


class _Channel:
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
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass
class _Outcome:
    """How a containerised job ended, before its result object is built."""

    verdict: str
    reason: str
    peak_mb: float = 0.0
    compute_s: float = 0.0


_R = TypeVar("_R")


@dataclass
class _Worker:
    """One warm container: its attached channel and its host-side /out dir."""

    container: Any
    channel: _Channel
    out_dir: Path
    jobs: int = 0


@dataclass
class _Pool:
    """Warm containers for one set of read-only mounts, refilled in the background."""

    runner: DockerRunner
    mounts: Mounts
    size: int
    ready: queue.Queue[_Worker | BaseException] = field(default_factory=queue.Queue)
    live: int = 0
    busy: int = 0  # jobs holding this pool; guarded by the runner's lock, not `lock`
    all_workers: dict[int, _Worker] = field(default_factory=dict)
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
            worker = self.runner._start_worker(self.mounts)
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
            self.runner._discard(worker)
        else:
            self.ready.put(worker)

    def acquire(self) -> _Worker:
        """A ready container (waiting for one to start if needed)."""
        self.fill()
        item = self.ready.get(timeout=START_TIMEOUT_S + 30)
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, worker: _Worker, retire: bool) -> None:
        """Back to the pool, or retired (and replaced) after a violation or N jobs."""
        if not retire and worker.jobs < self.runner.jobs_per_container and not self.closed:
            self.ready.put(worker)
            return
        with self.lock:
            self.all_workers.pop(id(worker), None)
            self.live -= 1
        threading.Thread(target=self.runner._discard, args=(worker,), daemon=True).start()
        self.fill()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            workers = list(self.all_workers.values())
            self.all_workers.clear()
        for worker in workers:
            self.runner._discard(worker)


class DockerRunner:
    """Runs merge jobs in hardened containers of the coevo sandbox image (see module doc)."""

    name = "docker"

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        pool_size: int = 2,
        jobs_per_container: int = 50,
        cpus: float = 1.0,
        scratch_mb: int = 64,
        runtime: str | None = None,
        gpus: str | int | None = None,
        image: str | None = None,
        scratch_dir: Path | None = None,
        input_roots: Sequence[Path] = (),
        max_pools: int = 4,
        client: Any = None,
    ) -> None:
        if pool_size < 0 or jobs_per_container < 1 or cpus <= 0 or scratch_mb < 1 or max_pools < 1:
            raise ValueError(
                "pool_size >= 0, jobs_per_container >= 1, cpus > 0, scratch_mb >= 1, max_pools >= 1"
            )
        from sandbox.image import ImageError, ensure_image, image_exists

        roots = tuple(dict.fromkeys(Path(root).resolve() for root in input_roots))
        for root in roots:
            problem = _root_problem(root)
            if problem is not None:
                raise ValueError(problem)

        self.limits = limits or SandboxLimits()
        self.pool_size = pool_size
        self.jobs_per_container = jobs_per_container
        self.cpus = cpus
        self.scratch_mb = scratch_mb
        self.gpus = gpus
        self.client = client or docker_client()
        try:
            if image is None:
                image = ensure_image(self.client, gpu=gpus is not None, log=log.info)
            elif not image_exists(self.client, image):
                raise SandboxUnavailable(f"sandbox image {image} not found")
        except ImageError as err:
            raise SandboxUnavailable(str(err)) from err
        self.image = image
        if runtime is not None:
            runtimes = self.client.info().get("Runtimes", {})
            if runtime not in runtimes:
                raise SandboxUnavailable(
                    f"Docker runtime {runtime!r} is not installed (daemon has: "
                    f"{', '.join(sorted(runtimes)) or 'none'}); gVisor is 'runsc'"
                )
        self.runtime = runtime
        # Files the container writes must be the host user's to move and delete; as root on the
        # host, the container still runs as an unprivileged uid.
        uid, gid = os.getuid(), os.getgid()
        self.uid, self.gid = (uid, gid) if uid != 0 else (SANDBOX_UID, SANDBOX_UID)
        self._own_scratch = scratch_dir is None
        self.scratch = Path(scratch_dir or tempfile.mkdtemp(prefix="coevo-docker-")).resolve()
        self.scratch.mkdir(parents=True, exist_ok=True)
        for root in roots:
            if root.is_relative_to(self.scratch) or self.scratch.is_relative_to(root):
                if self._own_scratch:
                    shutil.rmtree(self.scratch, ignore_errors=True)
                raise ValueError(
                    f"input root '{root}' overlaps the sandbox scratch dir '{self.scratch}', "
                    "where every job's output is written: pass a root that holds only models"
                )
        self.input_roots = roots
        self.max_pools = max_pools
        self._pools: OrderedDict[Mounts, _Pool] = OrderedDict()  # least recently used first
        self._readable: set[Path] = set()
        self._lock = threading.Lock()
        self._closed = False
        _remove_stale_containers(self.client)
        atexit.register(self.close)

    @property
    def description(self) -> str:
        """The image and the mode, for logs."""
        mode = f"warm pool of {self.pool_size}" if self.pool_size else "cold container per job"
        runtime = f", runtime {self.runtime}" if self.runtime else ""
        roots = f", {len(self.input_roots)} shared input roots" if self.input_roots else ""
        return f"docker ({self.image}, {mode}{runtime}{roots})"

    # -- jobs -------------------------------------------------------------------------------

    def run(self, job: MergeJob) -> SandboxResult:
        """Check the policy, run the job in a container and judge it; never raises."""
        from sandbox.policy import check_program

        start = time.perf_counter()
        policy = check_program(job.source)
        if not policy.ok:
            return rejected(SandboxResult, policy, start, self.name)
        inputs = _inputs(job)
        problem = self._input_problem(inputs)
        if problem is not None:
            return unrun(SandboxResult, "sandbox_error", problem, start, self.name)
        mounts, paths = self._place(inputs)

        def payload(root: str) -> dict[str, Any]:
            return {
                "source": job.source,
                "base_dir": paths[0],
                "expert_dirs": list(paths[1:]),
                "out_dir": f"{root}/model",
                "include": job.include,
            }

        def finish(job_dir: Path, outcome: _Outcome) -> SandboxResult:
            verdict, reason = outcome.verdict, outcome.reason
            if verdict == "ok":
                problem = install_model(job_dir / "model", Path(job.out_dir).resolve())
                if problem is not None:
                    verdict, reason = "sandbox_error", problem
            return SandboxResult(
                verdict,
                reason,
                time.perf_counter() - start,
                outcome.peak_mb,
                read_log(job_dir / "stdout.log", self.limits.max_log_bytes),
                read_log(job_dir / "stderr.log", self.limits.max_log_bytes),
                self.name,
                outcome.compute_s,
            )

        try:
            return self._dispatch(mounts, payload, finish)
        except Exception as err:  # the daemon failed us, not the program
            return unrun(SandboxResult, "sandbox_error", f"docker: {_first_line(err)}", start, self.name)

    def run_check(self, job: CheckJob) -> CheckResult:
        """Score answers with task-checker code in a container with no models mounted."""
        from sandbox.checker import CheckResult
        from sandbox.policy import check_checker

        start = time.perf_counter()
        policy = check_checker(job.source)
        if not policy.ok:
            return rejected(CheckResult, policy, start, self.name)

        def finish(job_dir: Path, outcome: _Outcome) -> CheckResult:
            ok = outcome.verdict == "ok"
            scores, errors = read_scores(job_dir / "result.json") if ok else (None, None)
            return CheckResult(
                outcome.verdict,
                outcome.reason,
                time.perf_counter() - start,
                outcome.peak_mb,
                scores,
                errors,
                read_log(job_dir / "stdout.log", self.limits.max_log_bytes),
                read_log(job_dir / "stderr.log", self.limits.max_log_bytes),
                self.name,
            )

        try:
            return self._dispatch((), lambda root: job.to_dict(), finish)
        except Exception as err:  # the daemon failed us, not the program
            return unrun(CheckResult, "sandbox_error", f"docker: {_first_line(err)}", start, self.name)

    def _dispatch(
        self,
        mounts: Mounts,
        payload: Callable[[str], dict[str, Any]],
        finish: Callable[[Path, _Outcome], _R],
    ) -> _R:
        """Run `payload(container_job_dir)` in a warm or cold container, then `finish` it while
        its job dir (model, logs, result) still exists."""
        if self.pool_size == 0:
            return self._run_cold(mounts, payload, finish)
        return self._run_warm(mounts, payload, finish)

    def _job(self, payload: Callable[[str], dict[str, Any]], root: str) -> dict[str, Any]:
        return {**payload(root), "result_path": f"{root}/result.json", "limits": self.limits.to_dict()}

    def _run_warm(
        self,
        mounts: Mounts,
        payload: Callable[[str], dict[str, Any]],
        finish: Callable[[Path, _Outcome], _R],
    ) -> _R:
        pool = self._pool(mounts)
        try:
            worker = pool.acquire()
            job_dir = worker.out_dir / uuid.uuid4().hex[:12]
            retire = True
            try:
                self._make_dir(job_dir)
                worker.jobs += 1
                job = self._job(payload, f"/out/{job_dir.name}")
                worker.channel.send({"id": job_dir.name, "job": job})
                outcome = self._wait_warm(worker, job_dir)
                retire = outcome.verdict not in CLEAN_VERDICTS
                return finish(job_dir, outcome)
            finally:
                shutil.rmtree(job_dir, ignore_errors=True)
                pool.release(worker, retire)
        finally:
            self._unhold(pool)

    def _wait_warm(self, worker: _Worker, job_dir: Path) -> _Outcome:
        deadline = time.monotonic() + self.limits.timeout_s
        while True:
            try:
                line = worker.channel.read_line(POLL_S)
            except (EOFError, OSError):
                return self._container_died(worker.container)
            if line is not None:
                reply = json.loads(line)
                break
            killed = self._over_limits(job_dir, deadline)
            if killed is not None:
                _kill(worker.container)
                return _Outcome(*killed)
        peak_mb = float(reply.get("maxrss_mb", 0.0))
        result = read_result(job_dir / "result.json")
        if result is not None:
            verdict, reason, result_peak, compute_s = result
            return _Outcome(verdict, reason, max(peak_mb, result_peak), compute_s)
        return _Outcome(*self._exit_verdict(int(reply["status"]), job_dir / "stderr.log"), peak_mb)

    def _run_cold(
        self,
        mounts: Mounts,
        payload: Callable[[str], dict[str, Any]],
        finish: Callable[[Path, _Outcome], _R],
    ) -> _R:
        name = f"coevo-sandbox-{uuid.uuid4().hex[:12]}"
        job_dir = self.scratch / name
        self._make_dir(job_dir)
        container = None
        try:
            (job_dir / "job.json").write_text(json.dumps(self._job(payload, "/out")))
            command = ["python3", "-m", "sandbox.harness", "/out/job.json"]
            container = self.client.containers.create(
                **self._container_kwargs(mounts, job_dir, command, name)
            )
            container.start()
            deadline = time.monotonic() + self.limits.timeout_s
            status: int | None = None
            killed: tuple[str, str] | None = None
            while status is None:
                try:
                    status = int(container.wait(timeout=POLL_S)["StatusCode"])
                except Exception:  # noqa: BLE001 - requests' read timeout: still running
                    killed = self._over_limits(job_dir, deadline)
                    if killed is not None:
                        _kill(container)
                        break
            (job_dir / "stdout.log").write_bytes(_logs(container, stdout=True))
            (job_dir / "stderr.log").write_bytes(_logs(container, stdout=False))
            if killed is not None:
                outcome = _Outcome(*killed)
            elif (result := read_result(job_dir / "result.json")) is not None:
                outcome = _Outcome(*result)
            else:
                container.reload()
                assert status is not None
                if container.attrs["State"].get("OOMKilled"):
                    outcome = _Outcome(*_memory_verdict(self.limits))
                else:
                    code = -(status - 128) if status > 128 else status
                    outcome = _Outcome(*self._exit_verdict(code, job_dir / "stderr.log"))
            return finish(job_dir, outcome)
        finally:
            if container is not None:
                _remove(container)
            shutil.rmtree(job_dir, ignore_errors=True)

    def _over_limits(self, job_dir: Path, deadline: float) -> tuple[str, str] | None:
        """Why the running job must be killed now (wall clock, logs, output size), or None."""
        limits = self.limits
        if time.monotonic() > deadline:
            return "timeout", f"exceeded the {limits.timeout_s:g} s wall-clock limit"
        sizes = _tree_sizes(job_dir)
        log_cap = LOG_FLOOD_FACTOR * limits.max_log_bytes
        if max(sizes.get("stdout.log", 0), sizes.get("stderr.log", 0)) > log_cap:
            return "runtime_error", f"wrote more than {log_cap} bytes of logs"
        if sum(sizes.values()) > limits.max_output_mb * 1024 * 1024:
            return "output_invalid", f"wrote more than the {limits.max_output_mb} MB output cap"
        return None

    def _exit_verdict(self, code: int, stderr_log: Path) -> tuple[str, str]:
        """The verdict of a job process that ended without a result file."""
        import signal

        if code < 0:
            sig = signal.Signals(-code)
            if sig == signal.SIGKILL:  # nothing in the container sends it but the OOM killer
                return _memory_verdict(self.limits)
            if sig == signal.SIGXCPU:
                return "timeout", "exceeded the CPU-time limit"
            return "runtime_error", f"sandbox process killed by {sig.name}: {tail(stderr_log)}"
        return "sandbox_error", f"harness exited with code {code} and no result: {tail(stderr_log)}"

    def _container_died(self, container: Any) -> _Outcome:
        try:
            container.reload()
            state = container.attrs["State"]
        except Exception:  # noqa: BLE001 - already removed
            state = {}
        if state.get("OOMKilled"):
            return _Outcome(*_memory_verdict(self.limits))
        logs = _logs(container, stdout=False).decode("utf-8", "replace").strip().splitlines()
        return _Outcome(
            "sandbox_error",
            f"sandbox container died (exit {state.get('ExitCode', '?')}): "
            + (" | ".join(logs[-3:]) or "no output"),
        )

    # -- containers -------------------------------------------------------------------------

    def _container_kwargs(
        self, mounts: Mounts, out_dir: Path, command: list[str], name: str
    ) -> dict[str, Any]:
        """Everything that confines a container; the only host paths are `mounts` (read-only)
        and `out_dir` (at /out)."""
        from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

        memory = f"{self.limits.memory_mb + WORKER_OVERHEAD_MB}m"
        threads = str(max(1, int(self.cpus)))
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
            "nano_cpus": int(self.cpus * 1e9),
            "ulimits": [Ulimit(name="core", soft=0, hard=0)],
            "mounts": binds,
            "environment": {
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "OPENBLAS_NUM_THREADS": threads,
                "PYTHONHASHSEED": "0",
                "CUDA_VISIBLE_DEVICES": "" if self.gpus is None else os.environ.get(
                    "CUDA_VISIBLE_DEVICES", "all"
                ),
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

    def _start_worker(self, mounts: Mounts) -> _Worker:
        name = f"coevo-sandbox-{uuid.uuid4().hex[:12]}"
        out_dir = self.scratch / name
        self._make_dir(out_dir)
        container = self.client.containers.create(
            **self._container_kwargs(mounts, out_dir, ["python3", "-m", "sandbox.pool_worker"], name)
        )
        try:
            channel = _Channel(
                container.attach_socket(params={"stdin": 1, "stdout": 1, "stream": 1})
            )
            container.start()
            try:
                line = channel.read_line(START_TIMEOUT_S)
            except (EOFError, OSError):
                line = None
            if line is None or not json.loads(line).get("ready"):
                logs = _logs(container, stdout=False).decode("utf-8", "replace").strip()
                raise SandboxUnavailable(
                    f"sandbox container did not start: {' | '.join(logs.splitlines()[-3:]) or 'no output'}"
                )
        except BaseException:
            _remove(container)
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
        return _Worker(container, channel, out_dir)

    def _discard(self, worker: _Worker) -> None:
        worker.channel.close()
        _remove(worker.container)
        shutil.rmtree(worker.out_dir, ignore_errors=True)

    def _place(self, inputs: tuple[Path, ...]) -> tuple[Mounts, tuple[str, ...]]:
        """The mounts a job's containers need and its model dirs' paths inside them.

        All dirs under the input roots: the roots (shared by every such job). Otherwise, or for
        a job with no models (checkers): exactly its own dirs, at /in/0, /in/1, ...
        """
        under_roots = [self._root_path(path) for path in inputs]
        paths = tuple(path for path in under_roots if path is not None)
        if inputs and len(paths) == len(inputs):
            return tuple((root, f"/roots/{i}") for i, root in enumerate(self.input_roots)), paths
        own = tuple((path, f"/in/{i}") for i, path in enumerate(inputs))
        return own, tuple(target for _, target in own)

    def _root_of(self, path: Path) -> Path | None:
        """The innermost input root holding `path` (resolved), or None."""
        holding = [root for root in self.input_roots if path.is_relative_to(root)]
        return max(holding, key=lambda root: len(root.parts)) if holding else None

    def _root_path(self, path: Path) -> str | None:
        """Where `path` is in a shared-roots container, or None when no root holds it."""
        root = self._root_of(path)
        if root is None:
            return None
        mounted = f"/roots/{self.input_roots.index(root)}"
        return mounted if path == root else f"{mounted}/{path.relative_to(root).as_posix()}"

    def _pool(self, mounts: Mounts) -> _Pool:
        """The warm pool for these mounts, held for one job until `_unhold`; making a new one
        closes the least recently used idle pools past `max_pools`."""
        with self._lock:
            if self._closed:
                raise SandboxUnavailable("the docker runner is closed")
            pool = self._pools.get(mounts)
            if pool is None:
                pool = self._pools[mounts] = _Pool(self, mounts, self.pool_size)
            self._pools.move_to_end(mounts)
            pool.busy += 1
            evicted = self._evict()
        for old in evicted:
            old.close()
        return pool

    def _unhold(self, pool: _Pool) -> None:
        with self._lock:
            pool.busy -= 1
            evicted = self._evict()
        for old in evicted:
            old.close()

    def _evict(self) -> list[_Pool]:
        """Take the least recently used idle pools out while more than `max_pools` live (a
        pool with a job in flight stays; the bound is met again when it goes idle)."""
        evicted: list[_Pool] = []
        idle = [pool for pool in self._pools.values() if pool.busy == 0]
        while len(self._pools) > self.max_pools and idle:
            pool = idle.pop(0)
            del self._pools[pool.mounts]
            evicted.append(pool)
        return evicted

    def prewarm(self, base_dir: Path, expert_dirs: list[Path]) -> None:
        """Start the warm containers for these models now, instead of on the first job."""
        if self.pool_size > 0:
            mounts, _ = self._place(_inputs(MergeJob("", base_dir, expert_dirs, Path("."))))
            pool = self._pool(mounts)
            pool.fill()
            self._unhold(pool)

    def _input_problem(self, inputs: tuple[Path, ...]) -> str | None:
        """Why the container user cannot read the model dirs, or None (each dir checked once).

        Under an input root the dirs between the root and the model dir must be searchable
        too; the roots themselves were checked when the runner was made.
        """
        for model_dir in inputs:
            if model_dir in self._readable:
                continue
            if not model_dir.is_dir():
                return f"model dir '{model_dir}' does not exist"
            if os.getuid() == 0:  # else the container runs as this user: it reads what we read
                problem = _unreadable(model_dir, self._root_of(model_dir))
                if problem is not None:
                    return problem
            self._readable.add(model_dir)
        return None

    def _make_dir(self, path: Path) -> None:
        path.mkdir(parents=True)
        if os.getuid() == 0:
            os.chown(path, self.uid, self.gid)

    def close(self) -> None:
        """Kill and remove every container this runner started."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pools = list(self._pools.values())
        for pool in pools:
            pool.close()
        if self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> DockerRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _inputs(job: MergeJob) -> tuple[Path, ...]:
    return tuple(Path(d).resolve() for d in [job.base_dir, *job.expert_dirs])


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


def _root_problem(root: Path) -> str | None:
    """Why `root` cannot be a shared input root, or None."""
    if not root.is_dir():
        return f"input root '{root}' is not a directory: create it before making the runner"
    if os.getuid() == 0 and not root.stat().st_mode & 0o001:
        return (
            f"input root '{root}' is not searchable by the sandbox user (uid {SANDBOX_UID}): "
            f"run `chmod o+x {root}`"
        )
    return None


def _memory_verdict(limits: SandboxLimits) -> tuple[str, str]:
    return "memory_exceeded", f"killed by the kernel at the {limits.memory_mb} MB memory limit"


def _tree_sizes(root: Path) -> dict[str, int]:
    """Apparent size of every file under root, by file name (later names overwrite)."""
    sizes: dict[str, int] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                size = os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
            sizes[name] = sizes.get(name, 0) + size
    return sizes


def _logs(container: Any, *, stdout: bool) -> bytes:
    try:
        data: bytes = container.logs(stdout=stdout, stderr=not stdout)
        return data
    except Exception:  # noqa: BLE001 - the container is gone
        return b""


def _kill(container: Any) -> None:
    try:
        container.kill()
    except Exception:  # noqa: BLE001 - already dead
        pass


def _remove(container: Any) -> None:
    try:
        container.remove(force=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _remove_stale_containers(client: Any) -> None:
    """Remove sandbox containers left by coevo processes on this host that no longer exist."""
    host = socket.gethostname()
    try:
        containers = client.containers.list(all=True, filters={"label": LABEL})
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
        _remove(container)


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "explanation", None) or err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
