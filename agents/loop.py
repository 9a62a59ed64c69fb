"""Machinery both discovery loops share (`agents.selfdev`, `agents.population`).

- `LoopContext`: the live objects a session's nodes work with (LangGraph's run-time context,
  never checkpointed): config, archive, sandbox runner, models, the resident answerer.
- Resume: a node commits its writes together with a step marker (`ctx.step`); a node whose
  marker exists (`ctx.done`) returns what it returned then, read back from the archive, and
  does no work twice. Random choices come from `ctx.rng(generation, node)`, so a replayed node
  makes the same ones.
- `run_merge_jobs`: a batch of merge programs through the sandbox, with a progress bar;
  `sandbox_run_row` / `algorithm_row`: their archive rows.
- `run_graph`: stream a compiled graph (checkpointed in `<workdir>/checkpoints.sqlite`),
  publishing the archive snapshot after every step; a node that raises stops the session
  with one line, the traceback in a log file, and `coevo launch --resume` continues there.
"""

from __future__ import annotations

import random
import sqlite3
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langgraph.checkpoint.sqlite import SqliteSaver

from agents.answerer import Resident
from agents.config import DiscoveryConfig
from agents.console import one_line, progress, say
from agents.residents import make_resident
from archive_store import Archive, prompt_hash
from archive_store.reviews import record_reviews
from sandbox.jobs import MergeJob, Runner, SandboxResult
from sandbox.policy import PolicyVerdict, code_hash
from sandbox.runners import run_many

RECURSION_LIMIT = 100_000


class SessionStopped(RuntimeError):
    """A node raised: the session is marked stopped and can be resumed; the message is one line."""


@dataclass(kw_only=True)
class LoopContext:
    """The live components of a session (LangGraph's run-time context, never checkpointed)."""

    config: DiscoveryConfig
    session_id: str
    workdir: Path
    archive: Archive
    runner: Runner
    base_dir: Path
    expert_dirs: list[Path]
    sandbox_slots: int = 0
    judge_factory: Callable[[], Resident] | None = None
    _answerer: Resident | None = field(default=None, repr=False)

    @property
    def answerer(self) -> Resident:
        """The resident model that answers tasks, hot-swapping each model's weights (on a
        cluster, a pool of judge actors that each hold one)."""
        if self._answerer is None:
            make = self.judge_factory or (lambda: make_resident(self.config, self.base_dir))
            self._answerer = make()
        return self._answerer

    @property
    def workers(self) -> int:
        """How many sandbox jobs run at once: the runner's slots on a cluster, else
        sandbox.workers."""
        return self.sandbox_slots or self.config.sandbox.workers

    def record_reviews(self) -> int:
        """Record the verdicts reviewers gave since (the workdir's inbox) in the archive."""
        added = record_reviews(self.archive, self.workdir)
        if added:
            say(f"  reviews: {added} new verdict{'s' if added > 1 else ''} recorded")
        return added

    def model_dir(self, model_id: str) -> Path:
        """Where the weights of a model the session makes are written."""
        return self.workdir / "models" / model_id.replace("/", "__")

    def rng(self, generation: int, node: str) -> random.Random:
        """The random choices of `node` in `generation`: the same on every replay."""
        return random.Random(f"{self.config.seed}:{generation}:{node}")

    def done(self, generation: int, step: str) -> bool:
        """Whether `step` of `generation` committed before (the session is being resumed)."""
        return self.archive.step_done(self.session_id, generation, step)

    @contextmanager
    def step(self, generation: int, step: str) -> Iterator[Archive]:
        """One transaction for a step's writes and its marker: all of it lands, or none."""
        with self.archive.transaction() as archive:
            yield archive
            archive.mark_step(self.session_id, generation, step)


def run_merge_jobs(
    runner: Runner, jobs: list[MergeJob], *, workers: int, label: str,
    consume: Callable[[int, SandboxResult], str] | None = None,
) -> list[SandboxResult]:
    """Run merge jobs `workers` at a time in the sandbox, results in order, with a progress bar.

    With `consume(index, result)`, each result is consumed (e.g. its model judged) in this
    thread while the sandbox merges the next ones, and no more than `workers` merges run ahead
    of it; what it returns is shown on the bar."""
    if not jobs:
        return []
    ok = done = 0
    with progress(label, len(jobs)) as advance:

        def count(result: SandboxResult) -> None:
            nonlocal ok, done
            index, done = done, done + 1
            ok += result.verdict == "ok"
            shown = consume(index, result) if consume is not None else ""
            advance(info=f"{ok} ok" + (f", {shown}" if shown else ""))

        return run_many(runner, jobs, workers=workers, on_result=count, ahead=workers if consume is not None else None)


def sandbox_run_row(algorithm_id: str, result: SandboxResult, runner: Runner) -> dict[str, Any]:
    """The archive row of an algorithm's sandbox run (`<algorithm_id>/run`)."""
    return {
        "run_id": f"{algorithm_id}/run", "algorithm_id": algorithm_id, "runner": result.runner or runner.name,
        "verdict": result.verdict, "reason": result.reason, "duration_s": result.duration_s,
        "peak_memory_mb": result.peak_memory_mb, "stdout": result.stdout, "stderr": result.stderr,
    }


def algorithm_row(
    session_id: str, algorithm_id: str, code: str, verdict: PolicyVerdict, *, iteration: int, sample_index: int,
    prompt_text: str, generator_version: int = 0, temperature: float = 0.0, exemplar_ids: list[str] | None = None,
    duplicate_of: str | None = None, normalized_hash: str | None = None, template_hash: str | None = None,
) -> dict[str, Any]:
    """The archive row of a merge program (generated, or a population child's operators)."""
    return {
        "algorithm_id": algorithm_id, "session_id": session_id, "iteration": iteration, "sample_index": sample_index,
        "generator_version": generator_version, "prompt_hash": prompt_hash(prompt_text), "temperature": temperature,
        "code": code, "code_hash": prompt_hash(code), "normalized_hash": normalized_hash or code_hash(code),
        "duplicate_of": duplicate_of, "policy_ok": verdict.ok, "policy_rule": verdict.rule,
        "policy_reason": verdict.reason, "exemplar_ids": exemplar_ids or [], "template_hash": template_hash,
    }


def run_graph(build: Callable[[Any], Any], ctx: LoopContext, start: dict[str, Any], *, resume: bool) -> None:
    """Run a session's graph from its `start` state, or resume it from its last checkpoint, to
    its end.

    `build(checkpointer)` compiles the graph. After every step the archive's snapshot is
    published, so readers (`coevo sql`) see each step once it is whole. A session killed before
    its first checkpoint starts over (its nodes skip what the archive already holds).
    """
    archive, sid = ctx.archive, ctx.session_id
    conn = sqlite3.connect(ctx.workdir / "checkpoints.sqlite", check_same_thread=False)
    run_config: Any = {"configurable": {"thread_id": sid}, "recursion_limit": RECURSION_LIMIT}
    try:
        graph = build(SqliteSaver(conn))
        first = None if resume and graph.get_state(run_config).values else start
        try:
            for _ in graph.stream(first, run_config, context=ctx, durability="sync"):
                archive.publish_snapshot()
        except KeyboardInterrupt:
            _mark_stopped(archive, sid)
            raise
        except Exception as err:
            node = ", ".join(graph.get_state(run_config).next) or "?"
            log = ctx.workdir / "logs" / f"{sid}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as out:
                out.write(f"session {sid}: node '{node}' failed\n{traceback.format_exc()}\n")
            _mark_stopped(archive, sid)
            raise SessionStopped(
                f"session {sid} stopped in node '{node}': {one_line(f'{type(err).__name__}: {err}', 300)} "
                f"(traceback in {log}); fix the cause, then `coevo launch --resume {sid}`"
            ) from err
    finally:
        conn.close()


def _mark_stopped(archive: Archive, session_id: str) -> None:
    archive.finish_session(session_id, "stopped")
    archive.publish_snapshot()
