"""Sandbox jobs on a Ray cluster: one actor per node keeps that node's warm sandbox pool.

`RayRunner` is a `Runner` (the interface the discovery loops already use): it starts a
`NodeSandbox` actor on every alive node, each holding that node's own runner
(`sandbox.runners.runner_from_config`: Docker where the node has a daemon, else the process
fallback with its warning), and sends each job to the node with the fewest jobs in flight. The
jobs, limits, verdicts and hostile-code guarantees are the local runner's, unchanged: the
actor only calls it. Results come back to the caller; nothing here writes the archive.

Faults: a job whose actor or node dies is sent to another node, at most `max_retries` times,
then answered with a `sandbox_error` verdict naming the nodes it was lost on. Actors belong to
the driver, so Ray ends them when the orchestrator ends, however it ends; each actor's Docker
containers are then removed by the runner's reaper (`sandbox.reaper`).

Ray is imported only when a `RayRunner` is made: a session without `[cluster]` never imports it.
Model dirs must lie on storage every node sees at the same path; `check_paths` says which node
cannot read which path.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sandbox.config import SandboxConfig
from sandbox.jobs import (
    CheckJob,
    CheckResult,
    MergeJob,
    SandboxResult,
    SandboxUnavailable,
    one_line,
    unrun,
)

_R = TypeVar("_R", SandboxResult, CheckResult)

# How long past a job's own timeout the driver waits for its actor before counting the actor
# as hung (it is then killed and the job retried): the job's container start and its output's
# install, on a loaded node.
ACTOR_GRACE_S = 120.0
# How long a node's actor may take to start its runner (a Docker client, the image check).
START_TIMEOUT_S = 60.0
# How long the head's port may take to answer before the cluster counts as unreachable.
CONNECT_TIMEOUT_S = 10.0


def connect(address: str) -> Any:
    """Connect this process to the Ray cluster at `address` ("auto", "ray://host:10001", or a
    GCS address) unless it is connected; returns the `ray` module.

    Raises SandboxUnavailable with one line when Ray is missing or the cluster unreachable."""
    try:
        import ray
    except ImportError:
        raise SandboxUnavailable(
            "[cluster] address is set but Ray is not installed: pip install 'coevo[cluster]'"
        ) from None
    if not ray.is_initialized():
        problem = unreachable(address)
        if problem is not None:
            raise SandboxUnavailable(f"cannot connect to the Ray cluster at {address!r}: {problem}")
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        except Exception as err:  # noqa: BLE001 - ConnectionError, RuntimeError, ... from Ray
            raise SandboxUnavailable(f"cannot connect to the Ray cluster at {address!r}: {one_line(str(err), 300)}") from None
    return ray


def unreachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why nothing listens at `address`'s host and port (None: something does, or the address
    is "auto", which Ray resolves itself). Ray's own connect retries for minutes on a dead
    address; this answers in seconds."""
    if address == "auto":
        return None
    hostport = address.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return f"not host:port ({hostport!r})"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as err:
        return f"nothing answers at {host}:{port} ({err.strerror or err})"


def alive_nodes(ray: Any) -> list[dict[str, Any]]:
    """The cluster's alive nodes that have CPUs (Ray's node records)."""
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


class NodeSandbox:
    """One node's sandbox (a Ray actor's body): the node's own runner, its limits and pool.

    Every method takes and returns plain values (dicts), so nothing of Ray's serialisation
    depends on these classes' pickles."""

    def __init__(self, config: dict[str, Any], scratch_dir: str | None, input_roots: list[str]) -> None:
        from sandbox.runners import runner_from_config

        self.node = socket.gethostname()
        self.runner = runner_from_config(
            SandboxConfig(**config),
            scratch_dir=Path(scratch_dir) / f"{self.node}-{os.getpid()}" if scratch_dir else None,
            input_roots=[Path(p) for p in input_roots],
        )

    def describe(self) -> dict[str, Any]:
        """This node's host name, pid and runner."""
        return {"host": self.node, "pid": os.getpid(), "runner": self.runner.name, "description": self.runner.description}

    def check_paths(self, readable: list[str], writable: list[str]) -> list[str]:
        """One line for each path this node cannot read (a dir of safetensors) or write."""
        problems = []
        for path in readable:
            p = Path(path)
            try:
                files = list(p.glob("*.safetensors")) if p.is_dir() else []
                if not files:
                    problems.append(f"cannot read '{path}' (no such dir of safetensors here)")
                    continue
                with open(files[0], "rb") as f:
                    f.read(8)
            except OSError as err:
                problems.append(f"cannot read '{path}': {err.strerror or err}")
        for path in writable:
            probe = Path(path) / f".coevo-probe-{self.node}-{os.getpid()}"
            try:
                Path(path).mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as err:
                problems.append(f"cannot write '{path}': {err.strerror or err}")
        return problems

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run a merge job in this node's sandbox."""
        merge = MergeJob(
            job["source"], Path(job["base_dir"]), [Path(d) for d in job["expert_dirs"]], Path(job["out_dir"]),
            job.get("include"),
        )
        return self.runner.run(merge).to_dict()

    def run_check(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run a checker job in this node's sandbox."""
        return self.runner.run_check(CheckJob(job["source"], job["cases"])).to_dict()

    def close(self) -> None:
        """Release the node's containers and scratch."""
        self.runner.close()


@dataclass
class _Node:
    node_id: str
    actor: Any
    host: str = "?"
    description: str = ""
    in_flight: int = 0
    alive: bool = True
    jobs: int = 0
    lost: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.host} ({self.node_id[:8]})"


class RayRunner:
    """A `Runner` whose jobs run on a Ray cluster's nodes, each node's jobs in its own sandbox.

    `slots` is the number of jobs that may run at once: `workers_per_node` on each node."""

    name = "ray"

    def __init__(
        self,
        address: str,
        config: SandboxConfig,
        *,
        workers_per_node: int = 0,
        max_retries: int = 2,
        scratch_dir: Path | None = None,
        input_roots: Sequence[Path] = (),
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be at least 0, got {max_retries}")
        self.ray = connect(address)
        self.config = config
        self.workers_per_node = workers_per_node or config.workers
        self.max_retries = max_retries
        self.timeout_s = config.timeout_s + ACTOR_GRACE_S
        self._args = (
            config.model_dump(), str(scratch_dir) if scratch_dir else None, [str(Path(p).resolve()) for p in input_roots],
        )
        self._actor_class = self.ray.remote(NodeSandbox)
        self._lock = threading.Condition()
        self._nodes: dict[str, _Node] = {}
        self._closed = False
        self.retried = 0  # jobs sent to another node after losing theirs
        self._refresh()
        if not self._nodes:
            raise SandboxUnavailable(f"the Ray cluster at {address!r} has no alive node with CPUs")

    # -- nodes --------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Start an actor on every alive node that has none (nodes join at any time)."""
        known = set(self._nodes)
        started = []
        for record in alive_nodes(self.ray):
            node_id = record["NodeID"]
            if node_id in known and self._nodes[node_id].alive:
                continue
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            actor = self._actor_class.options(
                num_cpus=0, max_concurrency=self.workers_per_node + 2, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(*self._args)
            started.append(_Node(node_id, actor))
        for node in started:
            try:
                info = self.ray.get(node.actor.describe.remote(), timeout=START_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - the node died or its runner could not start
                self._kill(node.actor)
                node.alive = False
                node.lost.append(one_line(str(err), 200))
                continue
            node.host, node.description = info["host"], info["description"]
            self._nodes[node.node_id] = node

    @property
    def slots(self) -> int:
        """How many jobs may run at once on the alive nodes."""
        return max(1, self.workers_per_node * sum(n.alive for n in self._nodes.values()))

    @property
    def nodes(self) -> list[dict[str, Any]]:
        """Each node's host, id, runner, jobs done and whether it is alive."""
        return [
            {"host": n.host, "node_id": n.node_id, "description": n.description, "jobs": n.jobs, "alive": n.alive}
            for n in self._nodes.values()
        ]

    @property
    def description(self) -> str:
        """The cluster's nodes and each one's sandbox, for logs."""
        alive = [n for n in self._nodes.values() if n.alive]
        kinds = sorted({n.description for n in alive})
        return f"ray cluster ({len(alive)} nodes x {self.workers_per_node} jobs): " + "; ".join(kinds)

    def check_paths(self, readable: Sequence[Path], writable: Sequence[Path] = ()) -> None:
        """Raise SandboxUnavailable (one line, naming the node and path) unless every alive node
        can read each of `readable` (model dirs) and write each of `writable`."""
        nodes = [n for n in self._nodes.values() if n.alive]
        args = ([str(Path(p).resolve()) for p in readable], [str(Path(p).resolve()) for p in writable])
        answers = self.ray.get([n.actor.check_paths.remote(*args) for n in nodes], timeout=self.timeout_s)
        for node, problems in zip(nodes, answers, strict=True):
            if problems:
                raise SandboxUnavailable(
                    f"node {node.label} {problems[0]}: model dirs and the workdir must be on storage every node sees "
                    "at the same path"
                )

    def _take(self, avoid: set[str]) -> _Node | None:
        """The alive node with the fewest jobs in flight (not one of `avoid` if another is
        alive), counted as busy; None when no node is alive."""
        with self._lock:
            alive = [n for n in self._nodes.values() if n.alive]
            if not alive:
                self._refresh()
                alive = [n for n in self._nodes.values() if n.alive]
            fresh = [n for n in alive if n.node_id not in avoid] or alive
            if not fresh:
                return None
            node = min(fresh, key=lambda n: n.in_flight)
            node.in_flight += 1
            return node

    def _lose(self, node: _Node, why: str) -> None:
        """`node`'s actor is gone or hung: stop sending it jobs, and look for new nodes."""
        with self._lock:
            node.in_flight -= 1
            if node.alive:
                node.alive = False
                node.lost.append(why)
                self._kill(node.actor)
            try:
                self._refresh()
            except Exception:  # noqa: BLE001 - the cluster itself is going away; the retry says so
                pass

    def _kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass

    # -- jobs ---------------------------------------------------------------------------------

    def _dispatch(self, method: str, payload: dict[str, Any]) -> tuple[dict[str, Any] | None, str, list[str]]:
        """Run `method` on some node, retrying on other nodes when one dies; (the result's
        dict or None, the node that ran it, why each attempt was lost)."""
        lost: list[str] = []
        tried: set[str] = set()
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.retried += 1
            node = self._take(tried)
            if node is None:
                lost.append("no alive node")
                break
            tried.add(node.node_id)
            try:
                answer = self.ray.get(getattr(node.actor, method).remote(payload), timeout=self.timeout_s)
            except self.ray.exceptions.GetTimeoutError:
                lost.append(f"{node.label} hung past {self.timeout_s:.0f}s")
                self._lose(node, lost[-1])
                continue
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.NodeDiedError,
                    self.ray.exceptions.ObjectLostError) as err:
                lost.append(f"{node.label} died ({type(err).__name__})")
                self._lose(node, lost[-1])
                continue
            with self._lock:
                node.in_flight -= 1
                node.jobs += 1
            return answer, node.host, lost
        return None, "", lost

    def _result(self, result: type[_R], method: str, payload: dict[str, Any]) -> _R:
        """`method`'s result from the least busy node, its runner named with the node's host;
        a `sandbox_error` naming the lost nodes when every attempt's node died."""
        start = time.perf_counter()
        answer, host, lost = self._dispatch(method, payload)
        if answer is None:
            return unrun(result, "sandbox_error", one_line(f"lost on {len(lost)} node(s): {'; '.join(lost)}"),
                         start, self.name)
        done = result(**answer)
        done.runner = f"{done.runner}@{host}"
        return done

    def run(self, job: MergeJob) -> SandboxResult:
        """Run one merge job on the least busy node; never raises for the program or a node."""
        return self._result(SandboxResult, "run", job.to_dict())

    def run_check(self, job: CheckJob) -> CheckResult:
        """Score answers with checker code on the least busy node; never raises for it."""
        return self._result(CheckResult, "run_check", job.to_dict())

    def close(self) -> None:
        """Close every node's sandbox (its containers, its scratch) and end the actors."""
        if self._closed:
            return
        self._closed = True
        alive = [n for n in self._nodes.values() if n.alive]
        try:
            self.ray.get([n.actor.close.remote() for n in alive], timeout=60)
        except Exception:  # noqa: BLE001 - a node already gone: its reaper removes its containers
            pass
        for node in alive:
            self._kill(node.actor)
