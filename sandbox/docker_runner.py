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
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sandbox.docker_pool import (
    SANDBOX_UID,
    START_TIMEOUT_S,
    Channel,
    ContainerSpec,
    InputRoots,
    Mounts,
    Pool,
    Pools,
    Worker,
    container_logs,
    docker_client,
    first_line,
    job_inputs,
    kill,
    remove,
    remove_stale_containers,
    root_problem,
)
from sandbox.jobs import (
    LOG_FLOOD_FACTOR,
    CheckJob,
    CheckResult,
    MergeJob,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    check_result,
    merge_result,
    read_result,
    rejected,
    tail,
    unrun,
)
from sandbox.policy import check_checker, check_program
from sandbox.reaper import start_reaper

log = logging.getLogger("coevo.sandbox")

POLL_S = 0.05
# Verdicts after which a warm container is trusted with the next job.
CLEAN_VERDICTS = ("ok", "output_invalid")
_R = TypeVar("_R")


@dataclass
class _Outcome:
    """How a containerised job ended, before its result object is built."""

    verdict: str
    reason: str
    peak_mb: float = 0.0
    compute_s: float = 0.0


class DockerRunner:
    """Runs merge jobs in hardened containers of the coevo sandbox image (see module doc)."""

    name = "docker"

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        pool_size: int = 2,
        jobs_per_container: int = 50,
        scratch_mb: int = 64,
        runtime: str | None = None,
        gpus: str | int | None = None,
        image: str | None = None,
        scratch_dir: Path | None = None,
        input_roots: Sequence[Path] = (),
        max_pools: int = 4,
        client: Any = None,
    ) -> None:
        if pool_size < 0 or jobs_per_container < 1 or scratch_mb < 1 or max_pools < 1:
            raise ValueError(
                "pool_size >= 0, jobs_per_container >= 1, scratch_mb >= 1, max_pools >= 1"
            )
        from sandbox.image import ImageError, ensure_image, image_exists

        roots = tuple(dict.fromkeys(Path(root).resolve() for root in input_roots))
        for root in roots:
            problem = root_problem(root)
            if problem is not None:
                raise ValueError(problem)

        self.limits = limits or SandboxLimits()
        self.pool_size = pool_size
        self.jobs_per_container = jobs_per_container
        self.client = client or docker_client()
        try:
            if image is None:
                image = ensure_image(self.client, gpu=gpus is not None, log=log.info)
            elif not image_exists(self.client, image):
                raise SandboxUnavailable(f"sandbox image {image} not found")
        except ImageError as err:
            raise SandboxUnavailable(str(err)) from err
        if runtime is not None:
            runtimes = self.client.info().get("Runtimes", {})
            if runtime not in runtimes:
                raise SandboxUnavailable(
                    f"Docker runtime {runtime!r} is not installed (daemon has: "
                    f"{', '.join(sorted(runtimes)) or 'none'}); gVisor is 'runsc'"
                )
        # Files the container writes must be the host user's to move and delete; as root on the
        # host, the container still runs as an unprivileged uid.
        uid, gid = os.getuid(), os.getgid()
        uid, gid = (uid, gid) if uid != 0 else (SANDBOX_UID, SANDBOX_UID)
        self.spec = ContainerSpec(image, uid, gid, self.limits, scratch_mb, runtime, gpus)
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
        self._inputs = InputRoots(roots)
        self._pools = Pools(max_pools, self._new_pool)
        remove_stale_containers(self.client)
        atexit.register(self.close)
        start_reaper()  # removes this process's containers if it dies without closing them

    @property
    def image(self) -> str:
        """The sandbox image the containers run."""
        return self.spec.image

    @property
    def description(self) -> str:
        """The image and the mode, for logs."""
        mode = f"warm pool of {self.pool_size}" if self.pool_size else "cold container per job"
        runtime = f", runtime {self.spec.runtime}" if self.spec.runtime else ""
        roots = f", {len(self.input_roots)} shared input roots" if self.input_roots else ""
        return f"docker ({self.image}, {mode}{runtime}{roots})"

    # -- jobs -------------------------------------------------------------------------------

    def run(self, job: MergeJob) -> SandboxResult:
        """Check the policy, run the job in a container and judge it; never raises."""
        start = time.perf_counter()
        policy = check_program(job.source)
        if not policy.ok:
            return rejected(SandboxResult, policy, start, self.name)
        inputs = job_inputs(job)
        problem = self._inputs.problem(inputs)
        if problem is not None:
            return unrun(SandboxResult, "sandbox_error", problem, start, self.name)
        mounts, paths = self._inputs.place(inputs)

        def payload(root: str) -> dict[str, Any]:
            return {
                "source": job.source,
                "base_dir": paths[0],
                "expert_dirs": list(paths[1:]),
                "out_dir": f"{root}/model",
                "include": job.include,
            }

        def finish(job_dir: Path, outcome: _Outcome) -> SandboxResult:
            return merge_result(
                outcome.verdict, outcome.reason, start=start, peak_mb=outcome.peak_mb, compute_s=outcome.compute_s,
                model=job_dir / "model", out_dir=Path(job.out_dir).resolve(), logs=job_dir, runner=self.name,
                max_log_bytes=self.limits.max_log_bytes,
            )

        try:
            return self._dispatch(mounts, payload, finish)
        except Exception as err:  # the daemon failed us, not the program
            return unrun(SandboxResult, "sandbox_error", f"docker: {first_line(err)}", start, self.name)

    def run_check(self, job: CheckJob) -> CheckResult:
        """Score answers with task-checker code in a container with no models mounted."""
        start = time.perf_counter()
        policy = check_checker(job.source)
        if not policy.ok:
            return rejected(CheckResult, policy, start, self.name)

        def finish(job_dir: Path, outcome: _Outcome) -> CheckResult:
            return check_result(
                outcome.verdict, outcome.reason, start=start, peak_mb=outcome.peak_mb, logs=job_dir,
                runner=self.name, max_log_bytes=self.limits.max_log_bytes,
            )

        try:
            return self._dispatch((), lambda root: job.to_dict(), finish)
        except Exception as err:  # the daemon failed us, not the program
            return unrun(CheckResult, "sandbox_error", f"docker: {first_line(err)}", start, self.name)

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
        return {
            **payload(root),
            "result_path": f"{root}/result.json",
            "limits": self.limits.to_dict(),
            "device": "cpu" if self.spec.gpus is None else "cuda",
        }

    def _run_warm(
        self,
        mounts: Mounts,
        payload: Callable[[str], dict[str, Any]],
        finish: Callable[[Path, _Outcome], _R],
    ) -> _R:
        pool = self._pools.hold(mounts)
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
            self._pools.unhold(pool)

    def _wait_warm(self, worker: Worker, job_dir: Path) -> _Outcome:
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
                kill(worker.container)
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
                        kill(container)
                        break
            (job_dir / "stdout.log").write_bytes(container_logs(container, stdout=True))
            (job_dir / "stderr.log").write_bytes(container_logs(container, stdout=False))
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
                remove(container)
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
        logs = container_logs(container, stdout=False).decode("utf-8", "replace").strip().splitlines()
        return _Outcome(
            "sandbox_error",
            f"sandbox container died (exit {state.get('ExitCode', '?')}): "
            + (" | ".join(logs[-3:]) or "no output"),
        )

    # -- containers -------------------------------------------------------------------------

    def _container_kwargs(
        self, mounts: Mounts, out_dir: Path, command: list[str], name: str
    ) -> dict[str, Any]:
        return self.spec.kwargs(mounts, out_dir, command, name)

    def _start_worker(self, mounts: Mounts) -> Worker:
        name = f"coevo-sandbox-{uuid.uuid4().hex[:12]}"
        out_dir = self.scratch / name
        self._make_dir(out_dir)
        container = self.client.containers.create(
            **self._container_kwargs(mounts, out_dir, ["python3", "-m", "sandbox.pool_worker"], name)
        )
        try:
            channel = Channel(
                container.attach_socket(params={"stdin": 1, "stdout": 1, "stream": 1})
            )
            container.start()
            try:
                line = channel.read_line(START_TIMEOUT_S)
            except (EOFError, OSError):
                line = None
            if line is None or not json.loads(line).get("ready"):
                logs = container_logs(container, stdout=False).decode("utf-8", "replace").strip()
                raise SandboxUnavailable(
                    f"sandbox container did not start: {' | '.join(logs.splitlines()[-3:]) or 'no output'}"
                )
        except BaseException:
            remove(container)
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
        return Worker(container, channel, out_dir)

    def _new_pool(self, mounts: Mounts) -> Pool:
        return Pool(mounts, self.pool_size, self._start_worker, self._discard, self.jobs_per_container)

    def _discard(self, worker: Worker) -> None:
        worker.channel.close()
        remove(worker.container)
        shutil.rmtree(worker.out_dir, ignore_errors=True)

    def prewarm(self, base_dir: Path, expert_dirs: list[Path]) -> None:
        """Start the warm containers for these models now, instead of on the first job."""
        if self.pool_size > 0:
            mounts, _ = self._inputs.place(job_inputs(MergeJob("", base_dir, expert_dirs, Path("."))))
            pool = self._pools.hold(mounts)
            pool.fill()
            self._pools.unhold(pool)

    def _make_dir(self, path: Path) -> None:
        path.mkdir(parents=True)
        if os.getuid() == 0:
            os.chown(path, self.spec.uid, self.spec.gid)

    def close(self) -> None:
        """Kill and remove every container this runner started."""
        if self._pools.close() and self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> DockerRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


