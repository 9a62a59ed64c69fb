"""The population modes (AC/DC and CycleQD), declared in one place.

    seed -> measure --+--> write_tasks -> breed -> evaluate -> select -> measure --+--> report -> END
                      ^                                                         |
                      +------------------------ next generation ----------------+

- **seed**: the task writer's seed families (validated in the sandbox) and the first
  population (base and experts), scored on every task.
- **write_tasks** (AC/DC, every `tasks.adapt_every` generations): pass rate 0 -> remove,
  > harder_above -> a harder child, else a novel one; novelty filter; validation in the sandbox.
- **breed**: children from parents' task vectors: the papers' crossover or a generated merge
  algorithm, then SVD (or Gaussian) mutation; each child is one merge program run in the sandbox.
- **evaluate**: each child answers the active tasks; the gibberish filter discards broken
  children; checker code (in the sandbox) or an LLM judge scores the answers.
- **select**: Dominated Novelty Search over skill vectors (AC/DC), or per-skill MAP-Elites grids
  with a rotating quality axis (CycleQD); the archive after each generation is stored.
- **measure**: coverage of the archive, the greedy team of N and its coverage, best-of-N.

Nodes are functions of (state, ctx) like the Self-Developing graph (`agents.graph`). Each
node's writes commit in one transaction together with a `graph_steps` marker, and a node
whose marker exists does nothing, so a session killed anywhere resumes with nothing lost or
done twice. Random choices come from generators seeded by (seed, generation, node), so a
replayed node makes the same choices.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph

from agents.graph import sandbox_run_row
from agents.judge import Judge
from agents.judging import (
    HeuristicGibberishFilter,
    LLMGibberishFilter,
    LLMJudge,
    pick_best_of_n,
    score_with_checker,
)
from agents.metrics import best_of_n, coverage, coverage_curve, greedy_team
from agents.novelty import NoveltyFilter, make_novelty
from agents.operators import Mutation, child_program, crossover_program, crossover_weights
from agents.selection import (
    MapElites,
    cycleqd_quality,
    dns_scores,
    dns_select,
    insert_everywhere,
    make_grids,
    random_select,
    task_weights,
)
from agents.task_writer import AdaptResult, Rejection, TaskFamily, TaskWriter, adapt, seed_pool
from archive_store import Archive, prompt_hash
from coevo.config import Config
from coevo.ui import percent, progress, say
from sandbox.policy import check_program, code_hash
from sandbox.runner import MergeJob, Runner, run_many

POPULATION_GRID = "population"
# Answers a child gives to this many different tasks go to the gibberish filter (AC/DC: 3).
GIBBERISH_SAMPLES = 3
# CycleQD picks generated algorithms "by score": softmax over dev scores (in [0, 1]) at this
# temperature, so a 10-point better algorithm is drawn e times more often.
ALGORITHM_SAMPLING_TEMPERATURE = 0.1


class PopulationError(RuntimeError):
    """A population session cannot go on (e.g. no seed task passed validation); one line."""


class PopulationState(TypedDict, total=False):
    generation: int
    finished: bool


@dataclass
class PopulationContext:
    """The live components of a population session (never checkpointed)."""

    config: Config
    session_id: str
    workdir: Path
    archive: Archive
    runner: Runner
    base_dir: Path
    expert_dirs: list[Path]
    writer: TaskWriter
    make_judge_llm: Callable[[], Any] | None = None  # an LLMBackend for judge / gibberish / best-of-N
    algorithms: list[dict[str, Any]] = field(default_factory=list)  # generated crossovers to draw from
    _judge: Judge | None = field(default=None, repr=False)
    _judge_llm: Any = field(default=None, repr=False)
    _families: dict[str, TaskFamily] | None = field(default=None, repr=False)

    @property
    def judge(self) -> Judge:
        """The resident model that answers tasks, hot-swapping each model's weights."""
        if self._judge is None:
            cfg = self.config.judge
            self._judge = Judge(self.base_dir, device=cfg.device, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
        return self._judge

    @property
    def judge_llm(self) -> Any:
        if self._judge_llm is None:
            if self.make_judge_llm is None:
                raise RuntimeError("no judge LLM configured (judge.llm_model)")
            self._judge_llm = self.make_judge_llm()
        return self._judge_llm

    def rng(self, generation: int, node: str) -> random.Random:
        return random.Random(f"{self.config.seed}:{generation}:{node}")

    def model_dir(self, model_id: str) -> Path:
        return self.workdir / "models" / model_id.replace("/", "__")

    def novelty(self) -> NoveltyFilter:
        cfg = self.config.tasks
        return make_novelty(
            cfg.novelty, threshold=cfg.novelty_threshold, embedding_model=cfg.embedding_model,
            judge_backend=getattr(self.writer, "backend", None) if cfg.llm_novelty_judge else None,
            prompts_dir=Path(cfg.prompts_dir) if cfg.prompts_dir else None, device=cfg.device,
        )

    def answers(self, model_dir: Path, tasks: list) -> list[str]:
        """A model's answers to `tasks`, long enough for the longest reference solution."""
        longest = max((len(str(instance.get("solution", ""))) for _, _, _, instance in tasks), default=0)
        self.judge.max_new_tokens = max(self.config.judge.max_new_tokens, longest + 2)
        self.judge.load(model_dir)
        return self.judge.answers([prompt for _, prompt, _, _ in tasks])

    # ------------------------------------------------------------- task pool

    def families(self) -> dict[str, TaskFamily]:
        """The active task families, read from the archive once and kept up to date after."""
        if self._families is None:
            self._families = load_active_families(self.archive, self.session_id)
        return self._families

    def active_tasks(self) -> list[tuple[str, str, TaskFamily, dict]]:
        """(task_id, prompt, family, instance) of every active instance, in a stable order."""
        out = []
        for family_id in sorted(self.families()):
            family = self.families()[family_id]
            for task_id, prompt, instance in family.questions():
                out.append((task_id, prompt, family, instance))
        return out


# ----------------------------------------------------------------------------- nodes


def seed(state: PopulationState, ctx: PopulationContext) -> PopulationState:
    """The seed task families and the first population (base and experts), all scored."""
    sid = ctx.session_id
    if ctx.archive.step_done(sid, 0, "seed"):
        return {"generation": 0}
    say(f"  task writer ({ctx.writer.name}): writing and validating the seed task families in the sandbox")
    seeded = seed_pool(ctx.writer, runner=ctx.runner, novelty=ctx.novelty(), prefix=f"{sid}/tasks",
                       rng=ctx.rng(0, "seed"), solver=getattr(ctx.writer, "solver", None))
    accepted, rejected = seeded.added, seeded.rejected
    if not accepted:
        reason = rejected[0].reason if rejected else "it wrote none"
        raise PopulationError(f"no seed task family passed validation ({reason}); see `coevo sql -c \"select * from task_rejections\"`")
    ctx._families = {f.family_id: f for f in accepted}
    models = [(f"{sid}/base", "base", "base", ctx.base_dir)]
    models += [(f"{sid}/expert/{p.name}", "expert", p.name, p) for p in ctx.expert_dirs]
    model_rows = [
        {"model_id": m, "session_id": sid, "kind": kind, "name": name, "path": str(path), "parent_ids": [], "generation": 0}
        for m, kind, name, path in models
    ]
    evaluation_rows = _evaluate(ctx, [(m, path) for m, _, _, path in models], ctx.active_tasks(), label="judge (seed population)")
    with ctx.archive.transaction():
        _add_families(ctx, accepted, 0)
        _add_rejections(ctx, rejected, 0)
        ctx.archive.add_models(model_rows)
        ctx.archive.add_evaluations(evaluation_rows)
        _select_and_snapshot(ctx, 0, [m for m, *_ in models])
        ctx.archive.mark_step(sid, 0, "seed")
    say(f"  {len(accepted)} seed task families ({len(ctx.active_tasks())} tasks), {len(rejected)} rejected; "
        f"first population: base and {len(ctx.expert_dirs)} experts")
    return {"generation": 0}


def write_tasks(state: PopulationState, ctx: PopulationContext) -> PopulationState:
    """Adapt the task pool to the population (AC/DC): remove, make harder, make novel."""
    g, sid, cfg = state["generation"], ctx.session_id, ctx.config.tasks
    if not cfg.coevolve or g % cfg.adapt_every != 0 or ctx.archive.step_done(sid, g, "write_tasks"):
        return {}
    members = population(ctx, g - 1)
    pass_rates = family_pass_rates(ctx, members)
    # Sorted by id, as a resumed session reads them back: the writer's draws depend on the order.
    active = sorted(ctx.families().values(), key=lambda f: f.family_id)
    result: AdaptResult = adapt(
        ctx.writer, active, pass_rates, runner=ctx.runner,
        novelty=ctx.novelty(),
        generation=g, prefix=f"{sid}/tasks", rng=ctx.rng(g, "write_tasks"), n_new=cfg.new_per_round,
        max_active=cfg.max_active, reflection_rounds=cfg.reflection_rounds, harder_above=cfg.harder_above,
        solver=getattr(ctx.writer, "solver", None),
    )
    families = ctx.families()
    for family_id, _ in result.removed:
        families.pop(family_id, None)
    for family in result.added:
        families[family.family_id] = family
    new_tasks = [t for t in ctx.active_tasks() if t[2].family_id in {f.family_id for f in result.added}]
    paths = ctx.archive.model_paths(members)
    evaluation_rows = _evaluate(ctx, [(m, Path(paths[m])) for m in members], new_tasks, label="judge (new tasks)")
    with ctx.archive.transaction():
        _add_families(ctx, result.added, g)
        ctx.archive.remove_task_families(result.removed, g)
        _add_rejections(ctx, result.rejected, g)
        ctx.archive.add_evaluations(evaluation_rows)
        ctx.archive.mark_step(sid, g, "write_tasks")
    say(f"  tasks: +{len(result.added)} families, -{len(result.removed)} removed, {len(result.rejected)} rejected "
        f"({len(families)} active)")
    for family_id, reason in result.removed[:3]:
        say(f"    removed {family_id.rsplit('/', 1)[-1]}: {reason}")
    for rejection in result.rejected[:3]:
        say(f"    rejected ({rejection.stage}): {rejection.reason}")
    return {}


def breed(state: PopulationState, ctx: PopulationContext) -> PopulationState:
    """Children from parents' task vectors (crossover + mutation), each run in the sandbox."""
    g, sid, cfg = state["generation"], ctx.session_id, ctx.config.population
    if ctx.archive.step_done(sid, g, "breed"):
        return {}
    rng = ctx.rng(g, "breed")
    members = population(ctx, g - 1)
    grids = _grids(ctx, g - 1) if ctx.config.mode == "cycleqd" else {}
    quality = cycleqd_quality(g, _skills(ctx), cfg.cyclic) if grids else None
    paths = ctx.archive.model_paths(members)
    children: list[dict[str, Any]] = []
    for index in range(cfg.children):
        if grids:
            parents = grids[quality].sample_parents(cfg.parents, rng, elite_sampling=cfg.elite_sampling)  # type: ignore[index]
        else:
            parents = rng.sample(members, min(cfg.parents, len(members)))
        if cfg.crossover == "algorithm":
            source_algorithm = _pick_algorithm(ctx, rng)
            crossover_source, operator, weights = source_algorithm["code"], f"algorithm:{source_algorithm['algorithm_id']}", None
        else:
            weights = crossover_weights(len(parents), rng, mu=cfg.crossover_mu, sigma=cfg.crossover_sigma)
            crossover_source, operator, source_algorithm = crossover_program(weights), "crossover", None
        mutation = Mutation(cfg.mutation or "none", seed=rng.randrange(2**31), top_k=cfg.svd_top_k, sigma=cfg.svd_sigma,
                            w_max=cfg.w_max, gauss_sigma=cfg.gauss_sigma)
        children.append({
            "algorithm_id": f"{sid}/g{g}/c{index:02d}", "index": index, "parents": parents, "operator": operator,
            "weights": weights, "mutation": mutation, "code": child_program(crossover_source, mutation),
            "exemplar_ids": [source_algorithm["algorithm_id"]] if source_algorithm else [],
        })
    operator_text = _operator_description(ctx.config)
    algorithm_rows, runs, models = [], [], []
    jobs, runnable = [], []
    for child in children:
        verdict = check_program(child["code"], max_bytes=32_000)
        algorithm_rows.append({
            "algorithm_id": child["algorithm_id"], "session_id": sid, "iteration": g, "sample_index": child["index"],
            "generator_version": 0, "prompt_hash": prompt_hash(operator_text), "temperature": 0.0, "code": child["code"],
            "code_hash": prompt_hash(child["code"]), "normalized_hash": code_hash(child["code"]), "policy_ok": verdict.ok,
            "policy_rule": verdict.rule, "policy_reason": verdict.reason, "exemplar_ids": child["exemplar_ids"],
        })
        if verdict.ok:
            runnable.append(child)
            jobs.append(MergeJob(source=child["code"], base_dir=ctx.base_dir, expert_dirs=[Path(paths[p]) for p in child["parents"]],
                                 out_dir=ctx.model_dir(f"{child['algorithm_id']}/model"), include=ctx.config.models.include or None))
    with progress(f"breed (sandbox: {ctx.runner.name})", len(jobs)) as advance:
        results = []
        for start in range(0, len(jobs), 4 * ctx.config.sandbox.workers):
            chunk = jobs[start : start + 4 * ctx.config.sandbox.workers]
            results += run_many(ctx.runner, chunk, workers=ctx.config.sandbox.workers)
            advance(len(chunk), info=f"{sum(r.verdict == 'ok' for r in results)} ok")
    for child, job, result in zip(runnable, jobs, results, strict=True):
        runs.append(sandbox_run_row(child["algorithm_id"], result, ctx.runner))
        if result.verdict == "ok":
            models.append({
                "model_id": f"{child['algorithm_id']}/model", "session_id": sid, "kind": "merged",
                "name": f"g{g}/c{child['index']:02d}", "algorithm_id": child["algorithm_id"], "path": str(job.out_dir),
                "parent_ids": child["parents"], "generation": g, "operator": child["operator"],
                "crossover_weights": child["weights"], "mutation": _mutation_text(child["mutation"]),
            })
        else:
            say(f"  child {child['index']}: {result.verdict}: {result.reason}")
    with ctx.archive.transaction():
        ctx.archive.add_prompt("operator", f"{ctx.config.mode}-operators", operator_text)
        ctx.archive.add_algorithms(algorithm_rows)
        ctx.archive.add_sandbox_runs(runs)
        ctx.archive.add_models(models)
        ctx.archive.mark_step(sid, g, "breed")
    return {}


def evaluate(state: PopulationState, ctx: PopulationContext) -> PopulationState:
    """Children answer the active tasks; broken ones are discarded; answers are scored."""
    g, sid = state["generation"], ctx.session_id
    if ctx.archive.step_done(sid, g, "evaluate"):
        return {}
    children = ctx.archive.query(
        "select model_id, path from models where session_id = ? and generation = ? and kind = 'merged' order by model_id", [sid, g]
    )[1]
    tasks = ctx.active_tasks()
    gibberish = _gibberish_filter(ctx)
    discards: list[tuple[str, str]] = []
    answers: dict[str, list[str]] = {}  # of the children kept
    with progress("children answer", len(children)) as advance:
        for model_id, path in children:
            model_answers = ctx.answers(Path(path), tasks)
            verdict = gibberish.check(_gibberish_sample(tasks, model_answers)) if gibberish else None
            if verdict is not None and verdict.broken:
                discards.append((model_id, f"gibberish ({gibberish.name}): {verdict.reason}"))  # type: ignore[union-attr]
            else:
                answers[model_id] = model_answers
            advance(info=f"{len(discards)} discarded")
    evaluation_rows = _score(ctx, answers, tasks)
    with ctx.archive.transaction():
        ctx.archive.discard_models(discards)
        ctx.archive.add_evaluations(evaluation_rows)
        ctx.archive.mark_step(sid, g, "evaluate")
    return {}


def select(state: PopulationState, ctx: PopulationContext) -> PopulationState:
    """Update the archive of models: DNS / random survivors (AC/DC) or MAP-Elites grids (CycleQD)."""
    g, sid = state["generation"], ctx.session_id
    if ctx.archive.step_done(sid, g, "select"):
        return {}
    children = [r[0] for r in ctx.archive.query(
        "select model_id from models where session_id = ? and generation = ? and kind = 'merged' "
        "and discarded_reason is null and model_id in (select model_id from evaluations) order by model_id", [sid, g],
    )[1]]
    with ctx.archive.transaction():
        _select_and_snapshot(ctx, g, population(ctx, g - 1) + children)
        ctx.archive.mark_step(sid, g, "select")
    return {}


def measure(state: PopulationState, ctx: PopulationContext) -> PopulationState:
    """Coverage, the greedy team and best-of-N for this generation; then the next one."""
    g, sid = state["generation"], ctx.session_id
    if not ctx.archive.scalar("select count(*) from generation_metrics where session_id = ? and generation = ?", [sid, g]):
        counts = ctx.archive.records(
            """select count(*) as children,
                      count(*) filter (where r.verdict = 'ok') as ok,
                      count(*) filter (where m.discarded_reason is not null) as discarded
               from algorithms a left join latest_runs r using (algorithm_id) left join models m using (algorithm_id)
               where a.session_id = ? and a.iteration = ?""", [sid, g],
        )[0]
        tasks_log = ctx.archive.records(
            """select (select count(*) from task_families where session_id = ?1 and generation = ?2) as added,
                      (select count(*) from task_families where session_id = ?1 and removed_generation = ?2) as removed,
                      (select count(*) from task_rejections where session_id = ?1 and generation = ?2) as rejected""",
            [sid, g],
        )[0]
        _measure(ctx, g, children=counts["children"], children_ok=counts["ok"], discarded=counts["discarded"],
                 added=tasks_log["added"], removed=tasks_log["removed"], n_rejected=tasks_log["rejected"])
    return {"generation": g + 1}


def report(state: PopulationState, ctx: PopulationContext) -> PopulationState:
    """The final team and its coverage (CycleQD: also the elites merged into one model)."""
    sid = ctx.session_id
    if ctx.config.mode == "cycleqd" and not ctx.archive.step_done(sid, state["generation"], "report"):
        _merge_elites(ctx, state["generation"])
    with ctx.archive.transaction():
        ctx.archive.finish_session(sid, "finished")
    return {"finished": True}


# ----------------------------------------------------------------------------- wiring


def _after_measure(state: PopulationState, ctx: PopulationContext) -> str:
    return "write_tasks" if state["generation"] <= ctx.config.population.generations else "report"


def build_population_graph(ctx: PopulationContext, checkpointer: Any) -> Any:
    graph = StateGraph(PopulationState)
    for node in (seed, write_tasks, breed, evaluate, select, measure, report):
        graph.add_node(node.__name__, functools.partial(node, ctx=ctx))
    graph.add_edge(START, "seed")
    graph.add_edge("seed", "measure")
    graph.add_edge("write_tasks", "breed")
    graph.add_edge("breed", "evaluate")
    graph.add_edge("evaluate", "select")
    graph.add_edge("select", "measure")
    graph.add_conditional_edges("measure", functools.partial(_after_measure, ctx=ctx), ["write_tasks", "report"])
    graph.add_edge("report", END)
    return graph.compile(checkpointer=checkpointer)


# ----------------------------------------------------------------------------- helpers


def load_active_families(archive: Archive, session_id: str) -> dict[str, TaskFamily]:
    """The session's active task families, rebuilt from the archive (on resume)."""
    families = {}
    for row in archive.records(
        "select * from task_families where session_id = ? and status = 'active' order by family_id", [session_id]
    ):
        instances = [json.loads(i) for (i,) in archive.query(
            "select instance from tasks where family_id = ? order by task_id", [row["family_id"]]
        )[1]]
        families[row["family_id"]] = TaskFamily(
            family_id=row["family_id"], name=row["name"], instructions=row["instructions"], instances=instances,
            checker=row["checker"], params=json.loads(row["params"]), parent_id=row["parent_id"], action=row["action"],
            generation=row["generation"], origin=row["origin"],
        )
    return families


def population(ctx: PopulationContext, generation: int) -> list[str]:
    """The model ids in the archive after `generation` (CycleQD: every grid's elites)."""
    return [r[0] for r in ctx.archive.query(
        "select model_id from population_snapshots where session_id = ? and generation = ? "
        "group by model_id order by min(grid), min(slot), model_id", [ctx.session_id, generation],
    )[1]]


def family_pass_rates(ctx: PopulationContext, members: list[str]) -> dict[str, float]:
    """Each active family's mean score over the members' answers to its instances."""
    rows = ctx.archive.query(
        "select t.family_id, avg(e.score) from evaluations e join tasks t using (task_id) "
        "where e.model_id in (select unnest(?)) and t.family_id in (select unnest(?)) group by 1",
        [members, list(ctx.families())],
    )[1]
    rates = {f: 0.0 for f in ctx.families()}
    rates.update({f: float(r) for f, r in rows})
    return rates


def _skills(ctx: PopulationContext) -> list[str]:
    """CycleQD's tasks (one grid each): the skills of the active families."""
    return sorted({skill_of(f) for f in ctx.families().values()})


def skill_of(family: TaskFamily) -> str:
    op = family.params.get("op")
    if isinstance(op, str):
        return op
    ops = family.params.get("ops")
    if isinstance(ops, list) and ops:
        return "+".join(map(str, ops))
    return family.name


def _scores(ctx: PopulationContext, model_ids: list[str]) -> dict[str, dict[str, float]]:
    """model -> task id -> score over the active tasks (0 where a model was not judged)."""
    task_ids = [t for t, *_ in ctx.active_tasks()]
    scores: dict[str, dict[str, float]] = {m: dict.fromkeys(task_ids, 0.0) for m in model_ids}
    rows = ctx.archive.query(
        "select model_id, task_id, max(score) from evaluations where model_id in (select unnest(?)) "
        "and task_id in (select unnest(?)) group by 1, 2", [model_ids, task_ids],
    )[1]
    for model_id, task_id, score in rows:
        scores[model_id][task_id] = float(score)
    return scores


def _family_vector(ctx: PopulationContext, task_scores: dict[str, float], key: Callable[[TaskFamily], str]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for task_id, _, family, _ in ctx.active_tasks():
        totals.setdefault(key(family), []).append(task_scores.get(task_id, 0.0))
    return {k: sum(v) / len(v) for k, v in sorted(totals.items())}


def _grids(ctx: PopulationContext, generation: int) -> dict[str, MapElites]:
    """The MAP-Elites grids after `generation`, rebuilt by offering its elites to fresh grids
    with their skill scores on today's tasks (the same grids when the task set is static; a
    coevolving task set re-bins them)."""
    cfg = ctx.config.population
    grids = make_grids(_skills(ctx), cfg.bins, cfg.cyclic)
    if generation < 0:
        return grids
    members = sorted(population(ctx, generation))
    scores = _scores(ctx, members)
    for model_id in members:
        insert_everywhere(grids, model_id, _family_vector(ctx, scores[model_id], skill_of))
    return grids


def _select_and_snapshot(ctx: PopulationContext, generation: int, candidates: list[str]) -> None:
    """Run this mode's selection over `candidates` and store the resulting archive."""
    cfg = ctx.config.population
    candidates = list(dict.fromkeys(candidates))
    scores = _scores(ctx, candidates)
    task_ids = [t for t, *_ in ctx.active_tasks()]
    rows = []
    if ctx.config.mode == "cycleqd":
        grids = _grids(ctx, generation - 1)
        for model_id in candidates:  # CycleQD offers every child to every grid
            insert_everywhere(grids, model_id, _family_vector(ctx, scores[model_id], skill_of))
        for name, grid in grids.items():
            for cell in grid.to_rows():
                rows.append({
                    "session_id": ctx.session_id, "generation": generation, "grid": name,
                    "slot": ",".join(map(str, cell["cell"])), "model_id": cell["model_id"],
                    "fitness": cell["quality_score"], "novelty": None, "skills": cell["scores"],
                })
    else:
        solved = {m: [1.0 if scores[m][t] >= 1 else 0.0 for t in task_ids] for m in candidates}
        weights = task_weights(solved)
        fitness = {m: sum(w * s for w, s in zip(weights, solved[m], strict=True)) / max(sum(weights), 1e-12) for m in candidates}
        novelty = dns_scores(solved, k=cfg.dns_k, weights=weights)
        if cfg.selection == "random":
            survivors = random_select(candidates, cfg.size, ctx.rng(generation, "select"))
        else:
            survivors = dns_select(solved, cfg.size, k=cfg.dns_k, weights=weights)
        for rank, model_id in enumerate(survivors):
            value = novelty.get(model_id)
            rows.append({
                "session_id": ctx.session_id, "generation": generation, "grid": POPULATION_GRID, "slot": f"{rank:03d}",
                "model_id": model_id, "fitness": fitness[model_id],
                "novelty": value if value is not None and math.isfinite(value) else None,
                "skills": _family_vector(ctx, scores[model_id], lambda f: f.family_id),
            })
    ctx.archive.add_population_snapshot(rows)


def _measure(ctx: PopulationContext, generation: int, *, children: int, children_ok: int, discarded: int,
             added: int, removed: int, n_rejected: int) -> None:
    cfg = ctx.config.population
    # Wall time since the previous generation was measured (a resumed one includes the pause).
    previous = ctx.archive.scalar(
        "select max(created_at) from generation_metrics where session_id = ? and generation = ?",
        [ctx.session_id, generation - 1],
    )
    members = population(ctx, generation)
    task_ids = [t for t, *_ in ctx.active_tasks()]
    scores = _scores(ctx, members)
    solved = {m: {t for t, s in scores[m].items() if s >= 1} for m in members}
    team = greedy_team(solved, cfg.team_size, task_ids)
    curve = coverage_curve(solved, task_ids, cfg.team_size)
    answers = _answers(ctx, team, task_ids)
    pick = None
    if ctx.config.judge.best_of_n == "llm":
        prompts = {t: p for t, p, _, _ in ctx.active_tasks()}
        pick = lambda task_id, candidates: pick_best_of_n(ctx.judge_llm, prompts[task_id], candidates)  # noqa: E731
    chosen = best_of_n(answers, team, pick)
    # The picked answer scores what the team member who wrote it scored on the task.
    best = [
        max((scores[m][t] for m in team if t in chosen and answers[m].get(t, "").strip() == chosen[t].strip()), default=0.0)
        for t in task_ids
    ]
    row: dict[str, Any] = {
        "session_id": ctx.session_id, "generation": generation, "n_tasks": len(task_ids), "n_families": len(ctx.families()),
        "n_models": len(members), "population_coverage": coverage(solved, members, task_ids), "team_size": cfg.team_size,
        "team": team, "team_coverage": coverage(solved, team, task_ids), "coverage_curve": [c for _, c, _ in curve],
        "best_of_n": sum(best) / max(1, len(best)), "children": children, "children_ok": children_ok,
        "children_discarded": discarded, "tasks_added": added, "tasks_removed": removed, "tasks_rejected": n_rejected,
        "duration_s": None if previous is None else (datetime.now(UTC).replace(tzinfo=None) - previous).total_seconds(),
    }
    with ctx.archive.transaction():
        ctx.archive.add_generation_metrics(row)
    say(f"[generation {generation}] coverage {percent(row['population_coverage'])} of {len(task_ids)} tasks by {len(members)} models; "
        f"team of {cfg.team_size}: {percent(row['team_coverage'])}, best-of-{cfg.team_size} {percent(row['best_of_n'])}"
        + (f"; children {children_ok}/{children} ok, {discarded} discarded" if children else ""))


def _answers(ctx: PopulationContext, team: list[str], task_ids: list[str]) -> dict[str, dict[str, str]]:
    """answers[model_id][task_id]: the team's archived answers to the active tasks."""
    out: dict[str, dict[str, str]] = {m: {} for m in team}
    rows = ctx.archive.query(
        "select model_id, task_id, any_value(answer) from evaluations where model_id in (select unnest(?)) "
        "and task_id in (select unnest(?)) group by 1, 2", [team, task_ids],
    )[1]
    for model_id, task_id, answer in rows:
        out[model_id][task_id] = answer or ""
    return out


def _evaluate(ctx: PopulationContext, models: list[tuple[str, Path]], tasks: list, *, label: str) -> list[dict]:
    """Evaluation rows of `models` on `tasks` (answers by the resident judge model, then scored)."""
    if not tasks or not models:
        return []
    answers: dict[str, list[str]] = {}
    with progress(label, len(models)) as advance:
        for model_id, path in models:
            answers[model_id] = ctx.answers(path, tasks)
            advance()
    return _score(ctx, answers, tasks)


def _score(ctx: PopulationContext, answers: dict[str, list[str]], tasks: list) -> list[dict]:
    """Score every model's answers: one sandboxed checker job per family (or the LLM judge)."""
    if not answers:
        return []
    rows = []
    if ctx.config.judge.llm:
        judge = LLMJudge(ctx.judge_llm)
        for model_id, model_answers in answers.items():
            items = [{"question": prompt, "answer": a, "reference": str(instance.get("solution", "")),
                      "instructions": family.instructions}
                     for (_, prompt, family, instance), a in zip(tasks, model_answers, strict=True)]
            for (task_id, *_), a, s in zip(tasks, model_answers, judge.score(items), strict=True):
                rows.append({"model_id": model_id, "task_id": task_id, "judge": judge.name, "answer": a, "score": s})
        return rows
    by_family: dict[str, list[int]] = {}
    for index, (_, _, family, _) in enumerate(tasks):
        by_family.setdefault(family.family_id, []).append(index)
    model_ids = list(answers)
    for family_id, indices in by_family.items():
        family = tasks[indices[0]][2]
        cases = [{"answer": answers[m][i], "instance": tasks[i][3]} for m in model_ids for i in indices]
        scores, problem = score_with_checker(ctx.runner, family.checker, cases)
        if problem:
            say(f"  {family_id}: {problem}")
        position = 0
        for model_id in model_ids:
            for i in indices:
                rows.append({"model_id": model_id, "task_id": tasks[i][0], "judge": "checker",
                             "answer": answers[model_id][i], "score": scores[position]})
                position += 1
    return rows


def _gibberish_filter(ctx: PopulationContext) -> Any:
    kind = ctx.config.population.gibberish
    if kind == "off":
        return None
    if kind == "llm":
        return LLMGibberishFilter(ctx.judge_llm)
    return HeuristicGibberishFilter()


def _gibberish_sample(tasks: list, answers: list[str]) -> list[str]:
    """Answers to GIBBERISH_SAMPLES tasks of different families (AC/DC reads 3 answers)."""
    picked, seen = [], set()
    for (_, _, family, _), answer in zip(tasks, answers, strict=True):
        if family.family_id not in seen:
            seen.add(family.family_id)
            picked.append(answer)
        if len(picked) == GIBBERISH_SAMPLES:
            break
    return picked


def _pick_algorithm(ctx: PopulationContext, rng: random.Random) -> dict[str, Any]:
    """A generated merge algorithm to use as crossover: the best, or sampled by dev score."""
    if ctx.config.population.algorithm == "best":
        return ctx.algorithms[0]
    top = max(a["dev_score"] for a in ctx.algorithms)
    weights = [math.exp((a["dev_score"] - top) / ALGORITHM_SAMPLING_TEMPERATURE) for a in ctx.algorithms]
    return rng.choices(ctx.algorithms, weights=weights, k=1)[0]


def generated_algorithms(archive: Archive, limit: int = 64) -> list[dict[str, Any]]:
    """Executable generated algorithms of Self-Developing sessions, best dev score first."""
    return archive.records(
        "select s.algorithm_id, a.code, s.dev_score from algorithm_scores s join algorithms a using (algorithm_id) "
        "join sessions x on x.session_id = a.session_id where x.mode = 'selfdev' and s.outcome = 'ok' "
        "and s.dev_score is not null order by s.dev_score desc, s.algorithm_id limit ?", [limit],
    )


def _merge_elites(ctx: PopulationContext, generation: int) -> None:
    """CycleQD's final model: the best elite of each grid merged with softmax(quality) weights."""
    sid = ctx.session_id
    last = generation - 1
    rows = ctx.archive.records(
        "select grid, model_id, fitness from population_snapshots where session_id = ? and generation = ? "
        "qualify row_number() over (partition by grid order by fitness desc, model_id) = 1 order by grid", [sid, last],
    )
    best: dict[str, float] = {}
    for r in rows:
        best[r["model_id"]] = max(best.get(r["model_id"], -1.0), r["fitness"])
    if not best:
        return
    elites = sorted(best)
    exps = [math.exp(best[m]) for m in elites]
    weights = [e / sum(exps) for e in exps]
    paths = ctx.archive.model_paths(elites)
    algorithm_id = f"{sid}/final"
    code = crossover_program(weights)
    out_dir = ctx.model_dir(f"{algorithm_id}/model")
    result = ctx.runner.run(MergeJob(source=code, base_dir=ctx.base_dir, expert_dirs=[Path(paths[m]) for m in elites], out_dir=out_dir))
    operator_text = _operator_description(ctx.config)
    model_id = f"{algorithm_id}/model"
    evaluation_rows = _evaluate(ctx, [(model_id, out_dir)], ctx.active_tasks(), label="judge (merged elites)") if result.verdict == "ok" else []
    with ctx.archive.transaction():
        ctx.archive.add_algorithms([{
            "algorithm_id": algorithm_id, "session_id": sid, "iteration": generation, "sample_index": 0, "generator_version": 0,
            "prompt_hash": prompt_hash(operator_text), "temperature": 0.0, "code": code, "code_hash": prompt_hash(code),
            "normalized_hash": code_hash(code), "policy_ok": True, "exemplar_ids": [],
        }])
        ctx.archive.add_sandbox_runs([sandbox_run_row(algorithm_id, result, ctx.runner)])
        if result.verdict == "ok":
            ctx.archive.add_models([{
                "model_id": model_id, "session_id": sid, "kind": "merged", "name": "cycleqd-final (merged elites)",
                "algorithm_id": algorithm_id, "path": str(out_dir), "parent_ids": elites, "generation": generation,
                "operator": "crossover:softmax(quality)", "crossover_weights": weights,
            }])
            ctx.archive.add_evaluations(evaluation_rows)
        ctx.archive.mark_step(sid, generation, "report")
    if result.verdict != "ok":
        say(f"  merging the elites failed: {result.verdict}: {result.reason}")


def _operator_description(config: Config) -> str:
    """What bred a generation's children, archived as the children's 'prompt' (by hash)."""
    p = config.population
    return (f"{config.mode} operators: crossover={p.crossover}"
            + (f"(mu={p.crossover_mu}, sigma={p.crossover_sigma})" if p.crossover == "paper" else f"({p.algorithm})")
            + f", mutation={p.mutation}(top_k={p.svd_top_k}, sigma={p.svd_sigma}, w_max={p.w_max}, gauss_sigma={p.gauss_sigma})"
            + f", parents={p.parents}")


def _mutation_text(mutation: Mutation) -> str:
    if mutation.kind == "svd_noise":
        return f"svd_noise(top_k={mutation.top_k}, sigma={mutation.sigma}, seed={mutation.seed})"
    if mutation.kind == "svd_scale":
        return f"svd_scale(w_max={mutation.w_max}, seed={mutation.seed})"
    if mutation.kind == "gaussian":
        return f"gaussian(sigma={mutation.gauss_sigma}, seed={mutation.seed})"
    return "none"


def _add_families(ctx: PopulationContext, families: list[TaskFamily], generation: int) -> None:
    ctx.archive.add_task_families([
        {"family_id": f.family_id, "session_id": ctx.session_id, "generation": generation, "name": f.name,
         "instructions": f.instructions, "checker": f.checker, "params": f.params, "parent_id": f.parent_id,
         "action": f.action, "origin": f.origin, "n_instances": len(f.instances),
         "prompt_hash": f.params.get("prompt_hash") if isinstance(f.params.get("prompt_hash"), str) else None}
        for f in families
    ])
    ctx.archive.add_tasks([
        {"task_id": task_id, "skill": skill_of(f), "split": "dev", "prompt": prompt,
         "answer": str(instance["solution"]) if "solution" in instance else None, "origin": f.origin,
         "family_id": f.family_id, "instance": instance}
        for f in families for task_id, prompt, instance in f.questions()
    ])


def _add_rejections(ctx: PopulationContext, rejections: list[Rejection], generation: int) -> None:
    rows = []
    for index, r in enumerate(rejections):
        f = r.family
        rows.append({
            "rejection_id": f"{ctx.session_id}/rejected/g{generation}/{index:03d}", "session_id": ctx.session_id,
            "generation": generation, "parent_id": f.parent_id if f else None, "action": f.action if f else "unknown",
            "stage": r.stage, "reason": r.reason, "name": f.name if f else None,
            "instructions": f.instructions if f else None, "checker": f.checker if f else None,
            "params": f.params if f else None, "raw": r.raw or None,
        })
    ctx.archive.add_task_rejections(rows)


def format_population_report(archive: Archive, session_id: str) -> str:
    """Coverage per generation, the final team, and (CycleQD) the merged elites' score."""
    lines = [f"Session {session_id}", "", "Coverage per generation (share of active tasks solved):"]
    lines.append(f"  {'gen':>3} {'tasks':>5} {'models':>6} {'archive':>8} {'team':>6} {'best-of-N':>9} {'children ok':>11} {'tasks +/-/rej':>13}")
    metrics = archive.records("select * from generation_metrics where session_id = ? order by generation", [session_id])
    for m in metrics:
        lines.append(
            f"  {m['generation']:>3} {m['n_tasks']:>5} {m['n_models']:>6} {percent(m['population_coverage']):>8} "
            f"{percent(m['team_coverage']):>6} {percent(m['best_of_n']):>9} "
            f"{str(m['children_ok']) + '/' + str(m['children']):>11} "
            f"{str(m['tasks_added']) + '/' + str(m['tasks_removed']) + '/' + str(m['tasks_rejected']):>13}"
        )
    if metrics:
        last = metrics[-1]
        team = json.loads(last["team"])
        curve = json.loads(last["coverage_curve"])
        lines += ["", f"Final team (greedy for coverage, N = {last['team_size']}):"]
        names = dict(archive.query("select model_id, name from models where model_id in (select unnest(?))", [team])[1])
        for n, (model_id, value) in enumerate(zip(team, curve, strict=False), 1):
            lines.append(f"  {n}. {names.get(model_id, model_id):28} team coverage with it {percent(value)}  ({model_id})")
    final = archive.records(
        "select avg(e.score) as score, count(*) as n from evaluations e join models m using (model_id) "
        "where m.session_id = ? and m.name like 'cycleqd-final%'", [session_id],
    )
    if final and final[0]["n"]:
        lines += ["", f"Merged elites (softmax of quality): mean score {percent(final[0]['score'])} over {final[0]['n']} tasks"]
    lines += ["", "Inspect: coevo sql -c \"select * from generation_metrics\"; \"select * from task_pool\"; \"select * from lineage\""]
    return "\n".join(lines)
