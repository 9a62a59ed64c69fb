"""Judging on a Ray cluster: judge actors, each with a resident engine, fed as they free up.

`JudgePool` is a `Resident` (what the discovery loops ask for answers) whose answers come from
`JudgeActor`s: one per GPU of the cluster (or `[cluster] judges` of them, one CPU slot each,
for tiny models), each building the session's resident model on its node (the vLLM engine
with weight swapping where configured, else the transformers answerer) once, then swapping
each candidate's weights in. `answer_many` keeps every actor busy with one candidate and
hands the next candidate to the first actor that frees up; answers come back in order, and
the orchestrator scores and writes them as it does locally.

An actor that dies mid-candidate is replaced (bounded) and the candidate answered by another;
a candidate lost `max_retries + 1` times stops the session with one line (it resumes there).
Ray is imported only when a pool is made (through `sandbox.cluster.connect`).
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agents.answerer import Resident
from agents.config import DiscoveryConfig
from agents.console import say
from agents.tasks import Task
from sandbox.cluster import connect
from sandbox.jobs import one_line

# How long a pool with no actor left waits for a replacement to be placed and start.
ACTOR_START_S = 300.0


class JudgeActor:
    """A judge on one node (a Ray actor's body): the session's resident model, built once."""

    def __init__(self, config: dict[str, Any], base_dir: str, device: str | None) -> None:
        from agents.residents import make_resident

        self.resident = make_resident(DiscoveryConfig.model_validate(config), Path(base_dir), device=device)

    def describe(self) -> dict[str, Any]:
        """This actor's host and pid."""
        return {"host": socket.gethostname(), "pid": os.getpid()}

    def answer(self, model_dir: str, tasks: list[Task], max_new_tokens: int) -> list[str]:
        """The answers of the model in `model_dir` (swapped in) to `tasks`."""
        self.resident.max_new_tokens = max_new_tokens
        return self.resident.answer_tasks(Path(model_dir), tasks)


class LatencyJudge:
    """A stand-in judge actor whose cost is all waiting (`delay_s` per candidate, standing in
    for GPU time): it answers each task with "<model dir name>:<task id>". The cluster benchmark
    (`bench/cluster_throughput.py`) and the tests use it to measure the pool's plumbing."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def describe(self) -> dict[str, Any]:
        """This actor's host and pid."""
        return {"host": socket.gethostname(), "pid": os.getpid()}

    def answer(self, model_dir: str, tasks: list[Any], max_new_tokens: int) -> list[str]:
        """After `delay_s`, one answer per task naming the model and the task."""
        time.sleep(self.delay_s)
        return [f"{Path(model_dir).name}:{getattr(task, 'task_id', task)}" for task in tasks]


def discovery_fields(config: DiscoveryConfig) -> dict[str, Any]:
    """`config`'s values that a `DiscoveryConfig` holds (a front-door config adds more)."""
    dumped = config.model_dump()
    return {key: dumped[key] for key in DiscoveryConfig.model_fields}


class JudgePool(Resident):
    """Answers from judge actors spread over a Ray cluster (see the module's docstring).

    `actor_class` / `actor_args` replace the judge actor (a benchmark's stand-in); `gpus` is
    what each actor reserves (None: one GPU each when the cluster has GPUs, else none)."""

    def __init__(
        self,
        address: str,
        config: DiscoveryConfig,
        base_dir: Path,
        *,
        actors: int = 0,
        max_retries: int = 2,
        actor_class: type | None = None,
        actor_args: Sequence[Any] | None = None,
        gpus: float | None = None,
    ) -> None:
        self.ray = connect(address)
        cluster_gpus = int(self.ray.cluster_resources().get("GPU", 0))
        self.gpus = gpus if gpus is not None else (1.0 if cluster_gpus else 0.0)
        alive = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        self.size = actors or (cluster_gpus if self.gpus else max(1, alive))
        self.max_new_tokens = config.judge.max_new_tokens
        self.max_retries = max_retries
        device = "cuda" if self.gpus else None
        self._args = tuple(actor_args) if actor_args is not None else (discovery_fields(config), str(Path(base_dir).resolve()), device)
        self._class = self.ray.remote(actor_class or JudgeActor)
        self._replacements = max_retries * self.size
        self._starting: dict[Any, Any] = {}  # describe() ref -> a replacement actor not yet up
        self.actors: list[Any] = [self._start() for _ in range(self.size)]
        hosts = self.ray.get([a.describe.remote() for a in self.actors])
        spread = sorted({h["host"] for h in hosts})
        say(f"[judge] {self.size} judge actors on the cluster ({', '.join(spread)}), "
            f"{'one GPU each' if self.gpus else 'one CPU slot each'}")

    def _start(self) -> Any:
        return self._class.options(
            num_gpus=self.gpus, num_cpus=0 if self.gpus else 1, max_restarts=0, scheduling_strategy="SPREAD",
        ).remote(*self._args)

    def load(self, model_dir: Path) -> None:  # the actors load what they are asked about
        raise NotImplementedError("a judge pool answers through answer_tasks / answer_many")

    def replies(self, prompts: Sequence[str], *, max_new_tokens: int | None = None, stop: Sequence[str] = ()) -> list[str]:
        raise NotImplementedError("a judge pool answers through answer_tasks / answer_many")

    def answer_tasks(self, model_dir: Path, tasks: Sequence[Task]) -> list[str]:
        """The answers of the model in `model_dir` to `tasks`, from the first free actor."""
        return next(self.answer_many([(Path(model_dir), list(tasks))]))

    def answer_many(self, items: Sequence[tuple[Path, list[Task]]]) -> Iterator[list[str]]:
        """The answers of each (model dir, tasks), in order, each from the first free actor.

        A dead actor's candidate goes back to the queue for the others; its replacement joins
        once Ray has placed it and it has answered (the cluster may have no free slot for it
        until another actor's node returns)."""
        todo = deque(range(len(items)))
        attempts = [0] * len(items)
        done: dict[int, list[str]] = {}
        running: dict[Any, tuple[int, Any]] = {}  # object ref -> (item, actor)
        idle = [a for a in self.actors if a not in self._starting.values()]
        following = 0
        while True:
            while todo and idle:
                index, actor = todo.popleft(), idle.pop()
                model_dir, tasks = items[index]
                running[actor.answer.remote(str(model_dir), tasks, self.max_new_tokens)] = (index, actor)
            while following in done:
                yield done.pop(following)
                following += 1
            if following >= len(items):
                return
            waiting = [*running, *self._starting]
            if not waiting:
                raise RuntimeError(f"judging {items[following][0]}: no judge actor is left on the cluster")
            ready, _ = self.ray.wait(waiting, num_returns=1, timeout=None if running else ACTOR_START_S)
            if not ready:
                raise RuntimeError(
                    f"judging {items[following][0]}: no judge actor could start in {ACTOR_START_S:.0f}s "
                    f"(the cluster has no free {'GPU' if self.gpus else 'CPU'} slot for one)"
                )
            ref = ready[0]
            if ref in self._starting:  # a replacement is up (or failed to start)
                actor = self._starting.pop(ref)
                try:
                    self.ray.get(ref)
                    idle.append(actor)
                except Exception:  # noqa: BLE001 - its node went too
                    self.actors.remove(actor)
                continue
            index, actor = running.pop(ref)
            try:
                done[index] = self.ray.get(ref)
                idle.append(actor)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.NodeDiedError) as err:
                attempts[index] += 1
                if attempts[index] > self.max_retries:
                    raise RuntimeError(
                        f"judging {items[index][0]} lost {attempts[index]} judge actors "
                        f"(last: {one_line(type(err).__name__ + ': ' + str(err), 200)})"
                    ) from None
                self.actors.remove(actor)
                if self._replacements > 0:
                    self._replacements -= 1
                    replacement = self._start()
                    self.actors.append(replacement)
                    self._starting[replacement.describe.remote()] = replacement
                todo.appendleft(index)

    def close(self) -> None:
        """End the judge actors (their engines go with them)."""
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.actors = []
