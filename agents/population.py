"""The population modes (AC/DC and CycleQD), declared in one place.

    seed -> measure --+--> write_tasks -> breed -> evaluate -> select -> measure --+--> report -> END
                      ^                                                         |
                      +------------------------ next generation ----------------+

A generation adapts the task pool (AC/DC), breeds children (crossover + mutation rendered as
one merge program each, run in the sandbox), has them answer the active tasks (broken ones
are discarded, answers are scored by checker code or an LLM judge), selects the archive of
models (Dominated Novelty Search, or per-skill MAP-Elites with a rotating quality axis) and
measures coverage, the greedy team and best-of-N. Nodes are functions of (state, runtime)
like the Self-Developing loop (`agents.selfdev`); the shared machinery (step markers, seeded
random choices, sandbox batches) is `agents.loop`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from agents.console import percent, progress, say
from agents.judge import (
    BestOfNPicker,
    FamilyTask,
    GibberishFilter,
    LLMJudge,
    gibberish_sample,
    score_answers,
)
from agents.loop import LoopContext, algorithm_row, run_merge_jobs, sandbox_run_row
from agents.metrics import best_of_n_score, coverage, coverage_curve, greedy_team
from agents.novelty import NoveltyFilter
from agents.operators import (
    Mutation,
    child_program,
    crossover_program,
    crossover_weights,
    describe_mutation,
    describe_operators,
    pick_algorithm,
)
from agents.prompts import Prompt, PromptDirs, reload_prompt
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
from agents.task_writer import AdaptResult, TaskWriter, adapt, seed_pool
from agents.tasks import (
    Task,
    TaskFamily,
    family_format,
    family_from_row,
    family_rows,
    family_task_rows,
    rejection_rows,
    skill_of,
)
from archive_store import queries
from sandbox.jobs import MergeJob
from sandbox.policy import check_program

POPULATION_GRID = "population"
MAX_CHILD_BYTES = 32_000


class PopulationError(RuntimeError):
    """A population session cannot go on (e.g. no seed task passed validation); one line."""


class PopulationState(TypedDict, total=False):
    generation: int
    finished: bool


@dataclass(kw_only=True)
class PopulationContext(LoopContext):
    """A population session's live components: the shared ones plus its task writer, the LLM
    roles of its judge, and the generated algorithms its crossover may draw from."""

    writer: TaskWriter
    novelty: NoveltyFilter
    llm_judge: LLMJudge | None = None  # judge.scoring = "llm"
    gibberish: GibberishFilter | None = None
    best_of_n: BestOfNPicker | None = None  # judge.best_of_n = "llm"
    algorithms: list[dict[str, Any]] = field(default_factory=list)  # generated crossovers to draw from
    prompt_dirs: PromptDirs = None  # where the roles' templates are read again each generation
    _families: dict[str, TaskFamily] | None = field(default=None, repr=False)

    def answers(self, model_dir: Path, tasks: list[FamilyTask]) -> list[str]:
        """A model's answers to `tasks`, long enough for the longest reference solution; the
        families of a user's task set with a format are answered and read its way."""
        longest = max((len(str(instance.get("solution", ""))) for _, _, _, instance in tasks), default=0)
        self.answerer.max_new_tokens = max(self.config.judge.max_new_tokens, longest + 2)
        as_tasks = [Task(task_id, "", "dev", prompt, "", family_format(family)) for task_id, prompt, family, _ in tasks]
        return self.answerer.answer_tasks(model_dir, as_tasks)

    def _prompt_holders(self) -> list[tuple[str, Any, str]]:
        """(role, object, attribute or dict key) of every template the session's roles hold."""
        holders: list[tuple[str, Any, str]] = []
        for key in sorted(getattr(self.writer, "prompts", {}) or {}):
            holders.append(("task_writer", self.writer.prompts, key))  # type: ignore[attr-defined]
        if getattr(self.novelty, "prompt", None) is not None:
            holders.append(("task_writer", self.novelty, "prompt"))
        for role in (self.llm_judge, self.gibberish, self.best_of_n):
            if getattr(role, "prompt", None) is not None:
                holders.append(("judge", role, "prompt"))
        return holders

    def role_prompts(self) -> list[tuple[str, Prompt]]:
        """(role, template) of every template this session's roles use now."""
        return [(role, _held(holder, key)) for role, holder, key in self._prompt_holders()]

    def reload_prompts(self) -> None:
        """Read every role's template again: an edit is used from this generation on (an
        invalid one is reported and the last good template kept)."""
        if self.prompt_dirs is None:
            return
        for _, holder, key in self._prompt_holders():
            old = _held(holder, key)
            new, warning = reload_prompt(old, self.prompt_dirs)
            if warning:
                say(f"  [prompts] {warning}")
            elif new.hash != old.hash:
                say(f"  [prompts] {new.name} template {old.hash} -> {new.hash} ({new.path})")
            if isinstance(holder, dict):
                holder[key] = new
            else:
                setattr(holder, key, new)

    def prompt_uses(self) -> list[tuple[str, str, str, str]]:
        """What `Archive.add_prompt_uses` records for the current templates."""
        return [(role, p.name, p.text, p.hash) for role, p in self.role_prompts()]

    def families(self) -> dict[str, TaskFamily]:
        """The active task families, read from the archive once and kept up to date after."""
        if self._families is None:
            self._families = {
                row["family_id"]: family_from_row(row, instances)
                for row, instances in queries.active_families(self.archive, self.session_id)
            }
        return self._families

    def active_tasks(self) -> list[FamilyTask]:
        """(task_id, prompt, family, instance) of every active instance, in a stable order."""
        out = []
        for family_id in sorted(self.families()):
            family = self.families()[family_id]
            for task_id, prompt, instance in family.questions():
                out.append((task_id, prompt, family, instance))
        return out

    def population(self, generation: int) -> list[str]:
        """The model ids in the archive after `generation` (CycleQD: every grid's elites)."""
        return queries.population(self.archive, self.session_id, generation)


Ctx = Runtime[PopulationContext]


# ----------------------------------------------------------------------------- nodes


def _held(holder: Any, key: str) -> Prompt:
    """The template a role holds: `holder[key]` (the task writer's dict) or `holder.key`."""
    return holder[key] if isinstance(holder, dict) else getattr(holder, key)


def seed(state: PopulationState, runtime: Ctx) -> PopulationState:
    """The seed task families and the first population (base and experts), all scored."""
    ctx = runtime.context
    sid = ctx.session_id
    if ctx.done(0, "seed"):
        return {"generation": 0}
    say(f"  task writer ({ctx.writer.name}): writing and validating the seed task families in the sandbox")
    seeded = seed_pool(ctx.writer, runner=ctx.runner, novelty=ctx.novelty, prefix=f"{sid}/tasks",
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
    with ctx.step(0, "seed") as archive:
        archive.add_prompt_uses(sid, 0, ctx.prompt_uses())
        archive.add_task_families(family_rows(sid, accepted, 0))
        archive.add_tasks(family_task_rows(accepted))
        archive.add_task_rejections(rejection_rows(sid, rejected, 0))
        archive.add_models(model_rows)
        archive.add_evaluations(evaluation_rows)
        _select_and_snapshot(ctx, 0, [m for m, *_ in models])
    say(f"  {len(accepted)} seed task families ({len(ctx.active_tasks())} tasks), {len(rejected)} rejected; "
        f"first population: base and {len(ctx.expert_dirs)} experts")
    return {"generation": 0}


def write_tasks(state: PopulationState, runtime: Ctx) -> PopulationState:
    """Adapt the task pool to the population (AC/DC): remove, make harder, make novel."""
    ctx = runtime.context
    g, sid, cfg = state["generation"], ctx.session_id, ctx.config.tasks
    ctx.reload_prompts()  # the first step of every generation after the seed
    if not cfg.coevolve or g % cfg.adapt_every != 0 or ctx.done(g, "write_tasks"):
        return {}
    members = ctx.population(g - 1)
    pass_rates = queries.family_pass_rates(ctx.archive, members, list(ctx.families()))
    # Sorted by id, as a resumed session reads them back: the writer's draws depend on the order.
    active = sorted(ctx.families().values(), key=lambda f: f.family_id)
    result: AdaptResult = adapt(
        ctx.writer, active, pass_rates, runner=ctx.runner, novelty=ctx.novelty,
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
    with ctx.step(g, "write_tasks") as archive:
        archive.add_task_families(family_rows(sid, result.added, g))
        archive.add_tasks(family_task_rows(result.added))
        archive.remove_task_families(result.removed, g)
        archive.add_task_rejections(rejection_rows(sid, result.rejected, g))
        archive.add_evaluations(evaluation_rows)
    say(f"  tasks: +{len(result.added)} families, -{len(result.removed)} removed, {len(result.rejected)} rejected "
        f"({len(families)} active)")
    for family_id, reason in result.removed[:3]:
        say(f"    removed {family_id.rsplit('/', 1)[-1]}: {reason}")
    for rejection in result.rejected[:3]:
        say(f"    rejected ({rejection.stage}): {rejection.reason}")
    return {}


def breed(state: PopulationState, runtime: Ctx) -> PopulationState:
    """Children from parents' task vectors (crossover + mutation), each run in the sandbox."""
    ctx = runtime.context
    g, sid, cfg = state["generation"], ctx.session_id, ctx.config.population
    if ctx.done(g, "breed"):
        return {}
    rng = ctx.rng(g, "breed")
    members = ctx.population(g - 1)
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
            source_algorithm = pick_algorithm(ctx.algorithms, cfg.algorithm, rng)
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
    operator_text = describe_operators(ctx.config.mode, cfg)
    algorithm_rows, runs, models = [], [], []
    jobs, runnable = [], []
    for child in children:
        verdict = check_program(child["code"], max_bytes=MAX_CHILD_BYTES)
        algorithm_rows.append(algorithm_row(
            sid, child["algorithm_id"], child["code"], verdict, iteration=g, sample_index=child["index"],
            prompt_text=operator_text, exemplar_ids=child["exemplar_ids"],
        ))
        if verdict.ok:
            runnable.append(child)
            jobs.append(MergeJob(source=child["code"], base_dir=ctx.base_dir, expert_dirs=[Path(paths[p]) for p in child["parents"]],
                                 out_dir=ctx.model_dir(f"{child['algorithm_id']}/model"), include=ctx.config.models.include or None))
    results = run_merge_jobs(ctx.runner, jobs, workers=ctx.workers, label=f"breed (sandbox: {ctx.runner.name})")
    for child, job, result in zip(runnable, jobs, results, strict=True):
        runs.append(sandbox_run_row(child["algorithm_id"], result, ctx.runner))
        if result.verdict == "ok":
            models.append({
                "model_id": f"{child['algorithm_id']}/model", "session_id": sid, "kind": "merged",
                "name": f"g{g}/c{child['index']:02d}", "algorithm_id": child["algorithm_id"], "path": str(job.out_dir),
                "parent_ids": child["parents"], "generation": g, "operator": child["operator"],
                "crossover_weights": child["weights"], "mutation": describe_mutation(child["mutation"]),
            })
        else:
            say(f"  child {child['index']}: {result.verdict}: {result.reason}")
    with ctx.step(g, "breed") as archive:
        archive.add_prompt_uses(sid, g, ctx.prompt_uses())
        archive.add_prompt("operator", f"{ctx.config.mode}-operators", operator_text)
        archive.add_algorithms(algorithm_rows)
        archive.add_sandbox_runs(runs)
        archive.add_models(models)
    return {}


def evaluate(state: PopulationState, runtime: Ctx) -> PopulationState:
    """Children answer the active tasks; broken ones are discarded; answers are scored."""
    ctx = runtime.context
    g = state["generation"]
    if ctx.done(g, "evaluate"):
        return {}
    children = queries.merged_models(ctx.archive, ctx.session_id, g)
    tasks = ctx.active_tasks()
    discards: list[tuple[str, str]] = []
    answers: dict[str, list[str]] = {}  # of the children kept
    with progress("children answer", len(children)) as advance:
        for model_id, path in children:
            model_answers = ctx.answers(Path(path), tasks)
            verdict = ctx.gibberish.check(gibberish_sample(tasks, model_answers)) if ctx.gibberish else None
            if verdict is not None and verdict.broken:
                discards.append((model_id, f"gibberish ({ctx.gibberish.name}): {verdict.reason}"))  # type: ignore[union-attr]
            else:
                answers[model_id] = model_answers
            advance(info=f"{len(discards)} discarded")
    evaluation_rows = score_answers(ctx.runner, answers, tasks, ctx.llm_judge)
    with ctx.step(g, "evaluate") as archive:
        archive.discard_models(discards)
        archive.add_evaluations(evaluation_rows)
    return {}


def select(state: PopulationState, runtime: Ctx) -> PopulationState:
    """Update the archive of models: DNS / random survivors (AC/DC) or MAP-Elites grids (CycleQD)."""
    ctx = runtime.context
    g = state["generation"]
    if ctx.done(g, "select"):
        return {}
    children = queries.judged_children(ctx.archive, ctx.session_id, g)
    with ctx.step(g, "select"):
        _select_and_snapshot(ctx, g, ctx.population(g - 1) + children)
    return {}


def measure(state: PopulationState, runtime: Ctx) -> PopulationState:
    """Coverage, the greedy team and best-of-N for this generation; then the next one."""
    ctx = runtime.context
    g = state["generation"]
    if not ctx.done(g, "measure"):
        _measure(ctx, g)
    return {"generation": g + 1}


def report(state: PopulationState, runtime: Ctx) -> PopulationState:
    """The final team and its coverage (CycleQD: also the elites merged into one model)."""
    ctx = runtime.context
    g = state["generation"]
    if ctx.done(g, "report"):
        return {"finished": True}
    merged = _merge_elites(ctx, g) if ctx.config.mode == "cycleqd" else None
    with ctx.step(g, "report") as archive:
        if merged is not None:
            merged(archive)
        archive.finish_session(ctx.session_id, "finished")
    return {"finished": True}


# ----------------------------------------------------------------------------- wiring


def after_measure(state: PopulationState, runtime: Ctx) -> Literal["write_tasks", "report"]:
    return "write_tasks" if state["generation"] <= runtime.context.config.population.generations else "report"


def build_graph(checkpointer: Any) -> Any:
    graph = StateGraph(PopulationState, context_schema=PopulationContext)
    for node in (seed, write_tasks, breed, evaluate, select, measure, report):
        graph.add_node(node.__name__, node)
    graph.add_edge(START, "seed")
    graph.add_edge("seed", "measure")
    graph.add_edge("write_tasks", "breed")
    graph.add_edge("breed", "evaluate")
    graph.add_edge("evaluate", "select")
    graph.add_edge("select", "measure")
    graph.add_conditional_edges("measure", after_measure)
    graph.add_edge("report", END)
    return graph.compile(checkpointer=checkpointer)


# ----------------------------------------------------------------------------- helpers


def _evaluate(ctx: PopulationContext, models: list[tuple[str, Path]], tasks: list[FamilyTask], *, label: str) -> list[dict]:
    """Evaluation rows of `models` on `tasks` (answers by the resident model, then scored)."""
    if not tasks or not models:
        return []
    answers: dict[str, list[str]] = {}
    with progress(label, len(models)) as advance:
        for model_id, path in models:
            answers[model_id] = ctx.answers(path, tasks)
            advance()
    return score_answers(ctx.runner, answers, tasks, ctx.llm_judge)


def _skills(ctx: PopulationContext) -> list[str]:
    """CycleQD's tasks (one grid each): the skills of the active families."""
    return sorted({skill_of(f) for f in ctx.families().values()})


def _scores(ctx: PopulationContext, model_ids: list[str]) -> dict[str, dict[str, float]]:
    """model -> task id -> score over the active tasks (0 where a model was not judged)."""
    task_ids = [t for t, *_ in ctx.active_tasks()]
    scores: dict[str, dict[str, float]] = {m: dict.fromkeys(task_ids, 0.0) for m in model_ids}
    for model_id, task_id, score in queries.best_scores(ctx.archive, model_ids, task_ids):
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
    members = sorted(ctx.population(generation))
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


def _measure(ctx: PopulationContext, generation: int) -> None:
    """Store (and print) the generation's metrics: coverage, the greedy team, best-of-N."""
    cfg, sid = ctx.config.population, ctx.session_id
    counts = queries.generation_counts(ctx.archive, sid, generation)
    # Wall time since the previous generation was measured (a resumed one includes the pause).
    previous = queries.generation_measured_at(ctx.archive, sid, generation - 1)
    members = ctx.population(generation)
    task_ids = [t for t, *_ in ctx.active_tasks()]
    scores = _scores(ctx, members)
    solved = {m: {t for t, s in scores[m].items() if s >= 1} for m in members}
    team = greedy_team(solved, cfg.team_size, task_ids)
    curve = coverage_curve(solved, task_ids, cfg.team_size)
    answers = queries.answers(ctx.archive, team, task_ids)
    pick = None
    if ctx.best_of_n is not None:
        prompts = {t: p for t, p, _, _ in ctx.active_tasks()}
        picker = ctx.best_of_n
        pick = lambda task_id, candidates: picker(prompts[task_id], candidates)  # noqa: E731
    row: dict[str, Any] = {
        "session_id": sid, "generation": generation, "n_tasks": len(task_ids), "n_families": len(ctx.families()),
        "n_models": len(members), "population_coverage": coverage(solved, members, task_ids), "team_size": cfg.team_size,
        "team": team, "team_coverage": coverage(solved, team, task_ids), "coverage_curve": [c for _, c, _ in curve],
        "best_of_n": best_of_n_score(answers, team, scores, task_ids, pick), "children": counts["children"], "children_ok": counts["ok"],
        "children_discarded": counts["discarded"], "tasks_added": counts["added"], "tasks_removed": counts["removed"],
        "tasks_rejected": counts["rejected"],
        "duration_s": None if previous is None else (datetime.now(UTC).replace(tzinfo=None) - previous).total_seconds(),
    }
    with ctx.step(generation, "measure") as archive:
        archive.add_generation_metrics(row)
    children = counts["children"]
    say(f"[generation {generation}] coverage {percent(row['population_coverage'])} of {len(task_ids)} tasks by {len(members)} models; "
        f"team of {cfg.team_size}: {percent(row['team_coverage'])}, best-of-{cfg.team_size} {percent(row['best_of_n'])}"
        + (f"; children {counts['ok']}/{children} ok, {counts['discarded']} discarded" if children else ""))


def _merge_elites(ctx: PopulationContext, generation: int) -> Callable[[Any], None] | None:
    """CycleQD's final model: the best elite of each grid merged with softmax(quality) weights.

    Merges and scores it; returns the archive writes, for the report's transaction."""
    sid = ctx.session_id
    best: dict[str, float] = {}
    for r in queries.best_elites(ctx.archive, sid, generation - 1):
        best[r["model_id"]] = max(best.get(r["model_id"], -1.0), r["fitness"])
    if not best:
        return None
    elites = sorted(best)
    exps = [math.exp(best[m]) for m in elites]
    weights = [e / sum(exps) for e in exps]
    paths = ctx.archive.model_paths(elites)
    algorithm_id = f"{sid}/final"
    code = crossover_program(weights)
    out_dir = ctx.model_dir(f"{algorithm_id}/model")
    result = ctx.runner.run(MergeJob(source=code, base_dir=ctx.base_dir, expert_dirs=[Path(paths[m]) for m in elites], out_dir=out_dir))
    model_id = f"{algorithm_id}/model"
    ok = result.verdict == "ok"
    evaluation_rows = _evaluate(ctx, [(model_id, out_dir)], ctx.active_tasks(), label="judge (merged elites)") if ok else []
    if not ok:
        say(f"  merging the elites failed: {result.verdict}: {result.reason}")
    row = algorithm_row(sid, algorithm_id, code, check_program(code), iteration=generation, sample_index=0,
                        prompt_text=describe_operators(ctx.config.mode, ctx.config.population))

    def write(archive: Any) -> None:
        archive.add_algorithms([row])
        archive.add_sandbox_runs([sandbox_run_row(algorithm_id, result, ctx.runner)])
        if ok:
            archive.add_models([{
                "model_id": model_id, "session_id": sid, "kind": "merged", "name": "cycleqd-final (merged elites)",
                "algorithm_id": algorithm_id, "path": str(out_dir), "parent_ids": elites, "generation": generation,
                "operator": "crossover:softmax(quality)", "crossover_weights": weights,
            }])
            archive.add_evaluations(evaluation_rows)

    return write

