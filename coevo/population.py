"""Launching and resuming the population modes (acdc, cycleqd); see `agents.coevolution`."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from langgraph.checkpoint.sqlite import SqliteSaver

from agents.backends import make_llm
from agents.coevolution import (
    PopulationContext,
    build_population_graph,
    format_population_report,
    generated_algorithms,
)
from agents.task_writer import LLMTaskWriter, ProceduralTaskWriter, TaskWriter, families_from_tasks
from archive_store import Archive
from coevo.config import Config, ConfigError
from coevo.prompts import load_prompt
from coevo.tasks import load_tasks
from coevo.ui import say
from sandbox.runner import Runner


def make_writer(config: Config, session_id: str) -> TaskWriter:
    """The task writer the config asks for: procedural (embedded zoo) or an LLM, seeded with
    the user's task set (`models.tasks`, one family per skill) when there is one."""
    cfg = config.tasks
    prompts_dir = Path(cfg.prompts_dir) if cfg.prompts_dir else None
    if cfg.writer == "llm":
        backend = make_llm(cfg.backend, cfg.model, base_url=cfg.base_url, api_key=cfg.api_key, device=cfg.device)
        seeds = None
        if config.models.tasks:
            tasks = [t for t in load_tasks(Path(config.models.tasks)) if t.split == "dev"]
            seeds = families_from_tasks(tasks, prefix=f"{session_id}/tasks")
        return LLMTaskWriter(
            backend, prompts_dir=prompts_dir, n_instances=cfg.instances, temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens, seed_families=seeds,
        )
    if config.models.base:
        raise ConfigError(
            "tasks.writer = 'procedural' writes tasks in the embedded zoo's formats only: "
            "with your own models set tasks.writer = 'llm' (and tasks.model / tasks.base_url)"
        )
    return ProceduralTaskWriter(instances=cfg.instances)


def _algorithms(config: Config, archive: Archive) -> list[dict[str, Any]]:
    if config.population.crossover != "algorithm":
        return []
    source = config.population.algorithms_from
    if source:
        with Archive.open(Path(source), read_only=True) as other:
            found = generated_algorithms(other)
    else:
        found = generated_algorithms(archive)
    if not found:
        raise ConfigError(
            f"population.crossover = 'algorithm' but {source or 'this workdir archive'} holds no executed generated "
            "algorithm with a dev score: run a selfdev session there first (coevo launch --mode selfdev), "
            "or point population.algorithms_from at an archive that has one"
        )
    return found


def run_population(
    config: Config, workdir: Path, archive: Archive, runner: Runner, session_id: str,
    base: Path, experts: list[Path], *, resume: bool,
) -> None:
    """Run (or resume) an acdc / cycleqd session to the end and print its report."""
    writer = make_writer(config, session_id)
    algorithms = _algorithms(config, archive)
    judge_llm = None
    if config.judge.llm_model:
        j = config.judge
        judge_llm = lambda: make_llm(j.llm_backend, j.llm_model, base_url=j.llm_base_url, api_key=j.llm_api_key, device=j.device)  # noqa: E731
    if not resume:
        with archive.transaction():
            archive.add_session(session_id, config.mode, config.seed, config.model_dump())
            # The templates of every LLM role in use, by hash (families and scores refer to them).
            for prompt in getattr(writer, "prompts", {}).values():
                archive.add_prompt("task_writer", prompt.name, prompt.text)
            for role, used in (("judge", config.judge.llm), ("gibberish", config.population.gibberish == "llm"),
                               ("best_of_n", config.judge.best_of_n == "llm")):
                if used:
                    prompt = load_prompt(role)
                    archive.add_prompt("judge", prompt.name, prompt.text)
        p = config.population
        say(f"[session] {session_id}: {config.mode}, {p.generations} generations x {p.children} children, "
            f"archive of {p.size}, crossover {p.crossover}, mutation {p.mutation}, selection {p.selection}, "
            f"task writer {writer.name} ({'coevolving' if config.tasks.coevolve else 'static'} tasks)")
    ctx = PopulationContext(
        config=config, session_id=session_id, workdir=workdir, archive=archive, runner=runner, base_dir=base,
        expert_dirs=experts, writer=writer, make_judge_llm=judge_llm, algorithms=algorithms,
    )
    conn = sqlite3.connect(workdir / "checkpoints.sqlite", check_same_thread=False)
    try:
        graph = build_population_graph(ctx, SqliteSaver(conn))
        run_config = {"configurable": {"thread_id": session_id}, "recursion_limit": 100_000}
        start = None if resume else {"generation": 0, "finished": False}
        for _ in graph.stream(start, run_config, durability="sync"):
            archive.publish_snapshot()  # readers (coevo sql) see each step once it is whole
    finally:
        conn.close()
    say("")
    say(format_population_report(archive, session_id))
