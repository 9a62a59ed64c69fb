"""Launching and resuming discovery sessions.

`run_session` takes the workdir's lock (one running session per workdir), opens the archive,
picks the session (a new one, or an unfinished one to resume), resolves the models (yours,
or the embedded zoo), builds the sandbox runner and every role the mode needs with the
session's one prompts dir, archives the templates they read, runs the mode's graph
(`agents.selfdev` or `agents.population`) and prints the report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from agents import population, selfdev
from agents.answerer import Resident
from agents.backends import LLMBackend, VersionedBackend, make_generator_backend, make_llm
from agents.console import say
from agents.generator import Generator, GeneratorVersion
from agents.judge import BestOfNPicker, LLMJudge, make_gibberish_filter
from agents.loop import LoopContext, run_graph
from agents.novelty import make_novelty
from agents.prompts import DEFAULT_PROMPTS_DIR, WORKDIR_PROMPTS, Prompt, load_prompt
from agents.task_writer import LLMTaskWriter, TaskWriter
from agents.tasks import families_from_tasks, load_tasks
from archive_store import Archive, queries
from coevo.config import Config, ConfigError, parse_config
from coevo.report import format_report
from coevo.workdir import SessionError, workdir_lock, write_holder
from coevo.zoo.build import default_zoo_dir, ensure_zoo
from coevo.zoo.task_families import ProceduralTaskWriter
from merging.check import check_compatible
from sandbox.jobs import Runner
from sandbox.runners import runner_from_config


def run_session(
    config: Config | None, workdir: Path, *, resume: bool | str = False, config_notes: list[str] | None = None
) -> str:
    """Start a session (config) or resume one (`resume` True: the latest unfinished session,
    or a session id) in workdir, run it to its end and print its report; returns its id."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir) as lock, Archive.open(workdir / "archive.duckdb") as archive, \
            contextlib.ExitStack() as stack:
        if resume:
            row = _session_to_resume(archive, workdir, resume)
            session_id = row["session_id"]
            config = parse_config(json.loads(row["config_json"]), f"session {session_id} config")
            say(f"[session] resuming {session_id} ({row['status']})")
        else:
            config = config or Config()
            # The random suffix keeps ids unique when archives of several machines are merged.
            session_id = time.strftime("%Y%m%d-%H%M%S") + f"-s{config.seed}-{secrets.token_hex(2)}"
        write_holder(lock, session_id)
        for note in config_notes or []:
            say(f"[config] {note}")
        base, experts, tasks_dir, zoo_generator, task_set = _resolve_models(config)
        check_compatible(base, experts)
        # Population children live under models/; one warm container pool serves every
        # parent set drawn from there, the base and the experts.
        (workdir / "models").mkdir(exist_ok=True)
        runner, slots, judges = _runners(config, workdir, base, experts, stack)
        say(f"[session] sandbox runner: {runner.description}")
        shared = {"config": config, "session_id": session_id, "workdir": workdir, "archive": archive,
                  "runner": runner, "base_dir": base, "expert_dirs": experts, "sandbox_slots": slots,
                  "judge_factory": judges}
        if config.mode == "selfdev":
            ctx: LoopContext
            ctx, start, prompts = _selfdev(shared, tasks_dir, task_set, zoo_generator, resume=bool(resume))
            build = selfdev.build_graph
        else:
            ctx, start, prompts = _population(shared, archive, runner, resume=bool(resume))
            build = population.build_graph
        with archive.transaction():
            if resume:
                archive.resume_session(session_id)
            else:
                archive.add_session(session_id, config.mode, config.seed, config.model_dump())
            for role, prompt in prompts:  # exactly the templates this run's roles read
                archive.add_prompt(role, prompt.name, prompt.text)
            if not resume and isinstance(ctx, selfdev.SelfdevContext):
                archive.add_generator_version(
                    session_id, 0, start["generator_path"],
                    served_name=ctx.generator.served_name(ctx.generator_version(cast(selfdev.SessionState, start))),
                )
                archive.add_tasks([
                    {"task_id": ctx.task_id(t), "skill": t.skill, "split": t.split, "prompt": t.prompt,
                     "answer": t.answer, "origin": task_set}
                    for t in ctx.tasks
                ])
        ctx.record_reviews()  # verdicts given while no session ran
        archive.publish_snapshot()
        run_graph(build, ctx, start, resume=bool(resume))
        say("")
        say(format_report(archive, session_id, config.mode))
        return session_id


def _runners(
    config: Config, workdir: Path, base: Path, experts: list[Path], stack: contextlib.ExitStack
) -> tuple[Runner, int, Callable[[], Resident] | None]:
    """The session's sandbox runner, how many jobs it runs at once (0: sandbox.workers), and
    what makes its judge (None: the resident model in this process).

    With [cluster] address, jobs and judges run on the Ray cluster's nodes; every node must
    read the models and write the workdir's models/ (checked here, one line if not)."""
    inputs = [workdir / "models", base, *experts]
    cluster = config.cluster
    if not cluster.address:
        runner = runner_from_config(config.sandbox, scratch_dir=workdir / ".sandbox", input_roots=inputs)
        stack.callback(runner.close)
        return runner, 0, None
    from agents.cluster import JudgePool
    from sandbox.cluster import RayRunner

    ray_runner = RayRunner(
        cluster.address, config.sandbox, workers_per_node=cluster.workers_per_node, max_retries=cluster.max_retries,
        scratch_dir=workdir / ".sandbox", input_roots=inputs,
    )
    stack.callback(ray_runner.close)
    ray_runner.check_paths([base, *experts], [workdir / "models"])
    for node in ray_runner.nodes:
        say(f"[cluster] node {node['host']} ({node['node_id'][:8]}): {node['description']}")
    pools: list[JudgePool] = []

    def judges() -> Resident:
        pool = JudgePool(cluster.address, config, base, actors=cluster.judges, max_retries=cluster.max_retries)
        pools.append(pool)
        return pool

    def close_judges() -> None:
        for pool in pools:
            pool.close()

    stack.callback(close_judges)
    return ray_runner, ray_runner.slots, judges


def _session_to_resume(archive: Archive, workdir: Path, which: bool | str) -> dict[str, Any]:
    if which is True:
        row = queries.latest_unfinished_session(archive)
        if row is None:
            raise SessionError(f"nothing to resume in {workdir}: no unfinished session (start one with `coevo launch`)")
        return row
    row = queries.session(archive, str(which))
    if row is None:
        raise SessionError(f"no session {which!r} in {workdir} (see `coevo sql -c \"select * from sessions\"`)")
    if row["status"] == "finished":
        raise SessionError(f"session {which} already finished: nothing to resume")
    return row


def _resolve_models(config: Config) -> tuple[Path, list[Path], Path, Path | None, str]:
    """base dir, expert dirs, tasks dir, default generator dir, and a task-set id."""
    if config.models.base:
        base = Path(config.models.base)
        experts = [Path(e) for e in config.models.experts]
        tasks = Path(config.models.tasks)
        digest = hashlib.sha256(str(tasks.resolve()).encode()).hexdigest()[:8]
        return base, experts, tasks, None, f"tasks-{digest}"
    zoo = Path(config.zoo.dir) if config.zoo.dir else default_zoo_dir(config.zoo.seed)
    ensure_zoo(zoo, seed=config.zoo.seed, runner_kind=config.sandbox.runner)
    experts = sorted(p for p in (zoo / "experts").iterdir() if p.is_dir())
    return zoo / "base", experts, zoo / "tasks", zoo / "generator", f"zoo-s{config.zoo.seed}"


def _prompts_dir(config: Config, workdir: Path) -> list[Path]:
    """Templates in the workdir's prompts/ (edits from `coevo serve`) first, then the config's
    dir (or the shipped ones)."""
    return [workdir / WORKDIR_PROMPTS, Path(config.prompts_dir) if config.prompts_dir else DEFAULT_PROMPTS_DIR]


# ----------------------------------------------------------------------------- Self-Developing


def _selfdev(
    shared: dict[str, Any], tasks_dir: Path, task_set: str, zoo_generator: Path | None, *, resume: bool
) -> tuple[selfdev.SelfdevContext, dict[str, Any], list[tuple[str, Prompt]]]:
    config: Config = shared["config"]
    g = config.generator
    if g.backend == "openai":
        if not (g.base_url and g.model):
            raise ConfigError("generator.backend = 'openai' needs generator.base_url and generator.model (the served name)")
        # What the server serves, and what DPO trains adapters over.
        weights = Path(g.weights) if g.weights else zoo_generator
    else:
        weights = Path(g.model) if g.model else zoo_generator
    if weights is None:
        raise ConfigError("generator.model is required when models.base is set (a model dir or served name)")
    if config.dpo.enabled and not (weights / "config.json").is_file():
        key = "generator.weights" if g.backend == "openai" else "generator.model"
        raise ConfigError(f"{key}: {weights} is not a Hugging Face model dir (no config.json): DPO trains it")
    lora_rank = config.dpo.lora_rank if config.dpo.enabled else 0

    def make_backend(path: Path) -> VersionedBackend:
        # A local generator is loaded from its current version's dir (DPO writes new ones);
        # a served one is reached at base_url and new versions are hot-loaded into it.
        return make_generator_backend(g, path, lora_rank=lora_rank, workdir=shared["workdir"])

    prompt_dirs = _prompts_dir(config, shared["workdir"])
    prompt = load_prompt("generator", prompt_dirs)
    if prompt.path.parent == prompt_dirs[0]:
        say(f"[session] generator template {prompt.hash} (edited: {prompt.path})")
    generator = Generator(g, prompt, make_backend, n_experts=len(shared["expert_dirs"]),
                          iterations=config.session.iterations, prompt_dirs=prompt_dirs)
    tasks = load_tasks(tasks_dir)
    ctx = selfdev.SelfdevContext(**shared, tasks=tasks, task_prefix=task_set, generator=generator)
    current = queries.current_generator_version(shared["archive"], ctx.session_id) if resume else None
    if current is not None and current["adapter_path"] and g.backend == "openai":
        # The server may have restarted since: put the session's current adapter back now.
        version = GeneratorVersion(current["version"], Path(current["weights"]), Path(current["adapter_path"]),
                                   current["served_name"])
        generator.backend(version)
        say(f"[session] generator v{version.number}: adapter {version.served_name} served at {g.base_url} again")
    start = {"iteration": 0, "generator_version": 0, "generator_path": str(weights), "generator_adapter": "",
             "finished": False}
    if not resume:
        say(f"[session] {ctx.session_id}: {config.session.iterations} iterations x {g.programs_per_iteration} "
            f"programs, {len(ctx.expert_dirs)} experts, {len(ctx.split('dev'))} dev / {len(ctx.split('test'))} test tasks")
    return ctx, start, [("generator-template", prompt)]


# ----------------------------------------------------------------------------- population modes


def make_writer(config: Config, session_id: str, workdir: Path) -> TaskWriter:
    """The task writer the config asks for: procedural (embedded zoo) or an LLM, seeded with
    the user's task set (`models.tasks`, one family per skill) when there is one."""
    cfg = config.tasks
    if cfg.writer == "llm":
        seeds = None
        if config.models.tasks:
            tasks = [t for t in load_tasks(Path(config.models.tasks)) if t.split == "dev"]
            seeds = families_from_tasks(tasks, prefix=f"{session_id}/tasks")
        return LLMTaskWriter(
            make_llm(cfg.llm), prompts_dir=_prompts_dir(config, workdir), n_instances=cfg.instances,
            temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed_families=seeds,
        )
    if config.models.base:
        raise ConfigError(
            "tasks.writer = 'procedural' writes tasks in the embedded zoo's formats only: "
            "with your own models set tasks.writer = 'llm' (and tasks.llm.model / tasks.llm.base_url)"
        )
    return ProceduralTaskWriter(instances=cfg.instances)


def _generated_algorithms(config: Config, archive: Archive) -> list[dict[str, Any]]:
    """The generated algorithms a crossover = 'algorithm' session draws from."""
    if config.population.crossover != "algorithm":
        return []
    source = config.population.algorithms_from
    if source:
        with Archive.open(Path(source), read_only=True) as other:
            found = queries.generated_algorithms(other)
    else:
        found = queries.generated_algorithms(archive)
    if not found:
        raise ConfigError(
            f"population.crossover = 'algorithm' but {source or 'this workdir archive'} holds no executed generated "
            "algorithm with a dev score: run a selfdev session there first (coevo launch --mode selfdev), "
            "or point population.algorithms_from at an archive that has one"
        )
    return found


def _population(
    shared: dict[str, Any], archive: Archive, runner: Runner, *, resume: bool
) -> tuple[population.PopulationContext, dict[str, Any], list[tuple[str, Prompt]]]:
    config: Config = shared["config"]
    sid, prompts_dir = shared["session_id"], _prompts_dir(config, shared["workdir"])
    writer = make_writer(config, sid, shared["workdir"])
    judge_llm = make_llm(config.judge.llm) if config.judge.llm.model else None
    tasks = config.tasks
    novelty = make_novelty(
        tasks.novelty, threshold=tasks.novelty_threshold, embedding_model=tasks.embedding_model,
        judge_backend=getattr(writer, "backend", None) if tasks.llm_novelty_judge else None,
        prompts_dir=prompts_dir, device=tasks.llm.device,
    )
    ctx = population.PopulationContext(
        **shared, writer=writer, novelty=novelty,
        llm_judge=LLMJudge(_need(judge_llm), prompts_dir=prompts_dir) if config.judge.scoring == "llm" else None,
        gibberish=make_gibberish_filter(config.population.gibberish, judge_llm, prompts_dir=prompts_dir),
        best_of_n=BestOfNPicker(_need(judge_llm), prompts_dir=prompts_dir) if config.judge.best_of_n == "llm" else None,
        algorithms=_generated_algorithms(config, archive), prompt_dirs=prompts_dir,
    )
    used = ctx.role_prompts()
    for _, prompt in used:
        if prompt.path.parent == prompts_dir[0]:
            say(f"[session] {prompt.name} template {prompt.hash} (edited: {prompt.path})")
    if not resume:
        p = config.population
        say(f"[session] {sid}: {config.mode}, {p.generations} generations x {p.children} children, "
            f"archive of {p.size}, crossover {p.crossover}, mutation {p.mutation}, selection {p.selection}, "
            f"task writer {writer.name} ({'coevolving' if tasks.coevolve else 'static'} tasks)")
    return ctx, {"generation": 0, "finished": False}, used


def _need(backend: LLMBackend | None) -> LLMBackend:
    if backend is None:  # the config's validation asks for judge.llm.model first
        raise ConfigError("this judge setting needs judge.llm.model")
    return backend

