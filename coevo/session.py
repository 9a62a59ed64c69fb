"""Launching and resuming discovery sessions, and the end-of-session report."""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import sqlite3
import time
from pathlib import Path

from langgraph.checkpoint.sqlite import SqliteSaver

from agents.backends import make_llm
from agents.graph import SessionContext, build_graph
from archive_store import Archive
from coevo.config import Config, ConfigError, parse_config
from coevo.prompts import load_prompt
from coevo.tasks import load_tasks
from coevo.ui import percent, say
from coevo.zoo.build import default_zoo_dir, ensure_zoo
from merging.check import check_compatible


class SessionError(ValueError):
    """A session cannot start or resume (nothing to resume, bad model dirs…)."""


def _resolve_models(config: Config, runner_kind: str) -> tuple[Path, list[Path], Path, Path | None, str]:
    """base dir, expert dirs, tasks dir, default generator dir, and a task-set id."""
    if config.models.base:
        base = Path(config.models.base)
        experts = [Path(e) for e in config.models.experts]
        tasks = Path(config.models.tasks)
        digest = hashlib.sha256(str(tasks.resolve()).encode()).hexdigest()[:8]
        return base, experts, tasks, None, f"tasks-{digest}"
    zoo = Path(config.zoo.dir) if config.zoo.dir else default_zoo_dir(config.zoo.seed)
    ensure_zoo(zoo, seed=config.zoo.seed, runner_kind=runner_kind)
    experts = sorted(p for p in (zoo / "experts").iterdir() if p.is_dir())
    return zoo / "base", experts, zoo / "tasks", zoo / "generator", f"zoo-s{config.zoo.seed}"


def _backend_factory(config: Config):
    g = config.generator
    if g.backend == "openai":
        if not g.base_url or not g.model:
            raise ConfigError("generator.backend = 'openai' needs generator.base_url and generator.model")
        return lambda path: make_llm("openai", g.model, base_url=g.base_url, api_key=g.api_key)
    # A local generator is loaded from its current version's dir (DPO writes new ones).
    return lambda path: make_llm(g.backend, str(path), device=g.device)


def run_session(config: Config | None, workdir: Path, *, resume: bool = False) -> str:
    """Start (or resume the latest unfinished) session in workdir; returns its session id."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    archive = Archive.open(workdir / "archive.duckdb")
    stack = contextlib.ExitStack()
    try:
        if resume:
            latest = archive.latest_session()
            if latest is None or latest["status"] == "finished":
                raise SessionError(f"nothing to resume in {workdir}: no unfinished session (start one with `coevo launch`)")
            session_id = latest["session_id"]
            config = parse_config(json.loads(latest["config_json"]), f"session {session_id} config")
            say(f"[session] resuming {session_id}")
        else:
            config = config or Config()
            # The random suffix keeps ids unique when archives of several machines are merged.
            session_id = time.strftime("%Y%m%d-%H%M%S") + f"-s{config.seed}-{secrets.token_hex(2)}"
        base, experts, tasks_dir, zoo_generator, task_set = _resolve_models(config, config.sandbox.runner)
        check_compatible(base, experts)
        # Population children live under models/; one warm container pool serves every
        # parent set drawn from there, the base and the experts.
        (workdir / "models").mkdir(exist_ok=True)
        runner = config.sandbox.make_runner(
            scratch_dir=workdir / ".sandbox", input_roots=[workdir / "models", base, *experts]
        )
        stack.callback(runner.close)
        say(f"[session] sandbox runner: {runner.description}")
        if config.mode != "selfdev":
            from coevo.population import run_population

            run_population(config, workdir, archive, runner, session_id, base, experts, resume=resume)
            return session_id
        tasks = load_tasks(tasks_dir)
        generator_dir = Path(config.generator.model) if config.generator.model else zoo_generator
        if generator_dir is None:
            raise ConfigError("generator.model is required when models.base is set (a model dir or served name)")
        prompt = load_prompt("generator", Path(config.generator.prompts_dir) if config.generator.prompts_dir else None)
        if not resume:
            with archive.transaction():
                archive.add_session(session_id, config.mode, config.seed, config.model_dump())
                archive.add_prompt("generator-template", prompt.name, prompt.text)
                archive.add_generator_version(session_id, 0, str(generator_dir))
                archive.add_tasks([
                    {"task_id": f"{task_set}/{t.task_id}", "skill": t.skill, "split": t.split,
                     "prompt": t.prompt, "answer": t.answer, "origin": task_set}
                    for t in tasks
                ])
            say(f"[session] {session_id}: {config.session.iterations} iterations x "
                f"{config.generator.programs_per_iteration} programs, {len(experts)} experts, "
                f"{sum(t.split == 'dev' for t in tasks)} dev / {sum(t.split == 'test' for t in tasks)} test tasks")
        ctx = SessionContext(
            config=config, session_id=session_id, workdir=workdir, archive=archive, runner=runner,
            base_dir=base, expert_dirs=experts, tasks=tasks, task_prefix=task_set, prompt=prompt,
            make_backend=_backend_factory(config),
        )
        conn = sqlite3.connect(workdir / "checkpoints.sqlite", check_same_thread=False)
        try:
            graph = build_graph(ctx, SqliteSaver(conn))
            run_config = {"configurable": {"thread_id": session_id}, "recursion_limit": 10_000}
            start = None if resume else {
                "iteration": 0, "generator_version": 0, "generator_path": str(generator_dir), "finished": False,
            }
            for _ in graph.stream(start, run_config, durability="sync"):
                archive.publish_snapshot()  # readers (coevo sql) see each step once it is whole
        finally:
            conn.close()
        say("")
        say(format_report(archive, session_id))
        return session_id
    finally:
        stack.close()
        archive.close()


def format_report(archive: Archive, session_id: str) -> str:
    """Leaderboard (best algorithms vs baselines, dev and test) and per-iteration statistics."""
    lines = [f"Session {session_id}", "", "Leaderboard (exact match, %):"]
    rows = archive.query(
        """
        with scores as (
          select m.model_id, m.kind, m.name, m.algorithm_id, t.split, avg(e.score) as score
          from models m join evaluations e using (model_id) join tasks t using (task_id)
          where m.session_id = ? group by all
        )
        select coalesce(algorithm_id, kind || ':' || name) as name, kind,
               max(score) filter (where split = 'dev') as dev, max(score) filter (where split = 'test') as test
        from scores group by all
        having kind != 'merged' or max(score) filter (where split = 'test') is not null
        order by test desc nulls last, dev desc
        """,
        [session_id],
    )[1]
    lines.append(f"  {'model':42} {'kind':9} {'dev':>7} {'test':>7}")
    for name, kind, dev, test in rows:
        lines.append(f"  {name:42} {kind:9} {percent(dev):>7} {percent(test):>7}")
    lines += ["", "Per iteration (dev scores of executable programs):"]
    lines.append(f"  {'iter':>4} {'gen':>3} {'programs':>8} {'executable':>10} {'rate':>6} {'mean':>6} {'median':>6} {'top-3':>17}")
    for row in archive.records(
        "select * from iteration_stats where session_id = ? order by iteration", [session_id]
    ):
        top3 = archive.query(
            "select dev_score from algorithm_scores where session_id = ? and iteration = ? and dev_score is not null "
            "order by dev_score desc limit 3", [session_id, row["iteration"]],
        )[1]
        lines.append(
            f"  {row['iteration']:>4} {row['generator_version']:>3} {row['n_programs']:>8} {row['n_executable']:>10} "
            f"{100 * row['executable_rate']:>5.0f}% {percent(row['mean_dev']):>6} {percent(row['median_dev']):>6} "
            f"{', '.join(percent(s) for (s,) in top3):>17}"
        )
    lines += ["", "Inspect: coevo review; coevo sql -c \"select * from leaderboard limit 10\""]
    return "\n".join(lines)
