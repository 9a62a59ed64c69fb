"""The Self-Developing loop, declared in one place.

    baselines -> propose -> vet -> execute -> judge -> select -> improve --+--> report -> END
                    ^                                                      |
                    +----------------- next iteration ---------------------+

Nodes are plain functions of (state, runtime): `state` is small and checkpointed after every
node (SQLite); `runtime.context` is the session's `SelfdevContext` (archive, generator,
sandbox runner, answerer). Every node that writes commits its writes with a step marker and
does nothing the second time (`agents.loop`), so a session killed anywhere resumes with
nothing lost or done twice.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from agents.baselines import baseline_merge
from agents.console import percent, progress, say
from agents.dpo import bottom_ids, human_pairs, make_preference_pairs, train_dpo
from agents.generator import Generator, GeneratorVersion, adapter_name, completion_text
from agents.generator import vet as vet_programs
from agents.judge import Scored, exact_scores, mean_score
from agents.loop import LoopContext, algorithm_row, run_merge_jobs, sandbox_run_row
from agents.tasks import Task
from archive_store import prompt_hash, queries
from archive_store.reviews import latest_verdicts
from sandbox.jobs import MergeJob, SandboxResult

BASELINE_METHODS = ("task_arithmetic", "ties")
JUDGE = "exact_match"


class SessionState(TypedDict, total=False):
    iteration: int
    generator_version: int
    generator_path: str       # the version's model dir; for LoRA versions, the weights under the adapter
    generator_adapter: str    # the version's LoRA adapter dir ('' = none)
    prompt_text: str
    template_text: str        # the generator template prompt_text was rendered from
    proposals: list[dict[str, Any]]
    to_execute: list[str]
    finished: bool


@dataclass(kw_only=True)
class SelfdevContext(LoopContext):
    """A Self-Developing session's live components: the shared ones plus its task set and
    its generator."""

    tasks: list[Task]
    task_prefix: str
    generator: Generator

    def generator_version(self, state: SessionState) -> GeneratorVersion:
        """The generator version `state` is at."""
        number, adapter = state["generator_version"], state.get("generator_adapter", "")
        return GeneratorVersion(
            number, Path(state["generator_path"]), Path(adapter) if adapter else None,
            adapter_name(self.session_id, number) if adapter else None,
        )

    @property
    def scratch_dir(self) -> Path | None:
        """Where judge-only merged weights go (judge.scratch_dir), or None to keep them all."""
        return Path(self.config.judge.scratch_dir).resolve() if self.config.judge.scratch_dir else None

    def merged_dir(self, model_id: str) -> Path:
        """Where a generated algorithm's merged model is written."""
        scratch = self.scratch_dir
        return scratch / model_id.replace("/", "__") if scratch else self.model_dir(model_id)

    def merge_jobs(self, algorithm_ids: list[str]) -> list[MergeJob]:
        code = queries.algorithm_code(self.archive, algorithm_ids)
        return [
            MergeJob(source=code[a], base_dir=self.base_dir, expert_dirs=self.expert_dirs,
                     out_dir=self.merged_dir(f"{a}/model"), include=self.config.models.include or None)
            for a in algorithm_ids
        ]

    def settle_weights(self) -> None:
        """With judge.scratch_dir: keep the weights of the session's top-k algorithms by dev
        score (moved into the workdir), delete the other judged ones, including earlier top-k
        that have dropped out. Idempotent: a move or deletion cut short is finished on the next
        call."""
        scratch = self.scratch_dir
        if scratch is None:
            return
        top = self.archive.top_algorithms(self.session_id, self.config.report.top_k)
        keep = {f"{a['algorithm_id']}/model" for a in top}
        moves, deleted, lost = {}, [], []
        for model_id, path in queries.merged_weights(self.archive, self.session_id):
            target = self.model_dir(model_id)
            if model_id not in keep:
                shutil.rmtree(path, ignore_errors=True)
                deleted.append(model_id)
            elif Path(path) != target and Path(path).exists():
                partial = target.with_name(f".{target.name}.partial")
                shutil.rmtree(partial, ignore_errors=True)
                shutil.copytree(path, partial)
                shutil.rmtree(target, ignore_errors=True)
                partial.rename(target)
                shutil.rmtree(path)
                moves[model_id] = str(target)
            elif not target.exists():
                lost.append(model_id)
            elif Path(path) != target:
                moves[model_id] = str(target)  # moved before, not yet recorded
        if lost:
            # Scratch in RAM does not survive a reboot: merge those programs again (a merge is
            # deterministic; their sandbox runs and scores are recorded already).
            say(f"  {len(lost)} top-{self.config.report.top_k} models' weights are gone from {scratch}: merging them again")
            jobs = [dataclasses.replace(job, out_dir=self.model_dir(m))
                    for m, job in zip(lost, self.merge_jobs([m.removesuffix("/model") for m in lost]), strict=True)]
            for model_id, result in zip(lost, run_merge_jobs(self.runner, jobs, workers=self.workers,
                                                             label="merge again"), strict=True):
                if result.verdict != "ok":
                    raise RuntimeError(f"merging {model_id} again gave {result.verdict}: {result.reason}")
                moves[model_id] = str(self.model_dir(model_id))
        with self.archive.transaction() as archive:
            archive.move_model_weights(moves)
            archive.mark_weights_deleted(deleted)
        if moves or deleted:
            say(f"  weights: {len(moves)} kept (top {self.config.report.top_k}), {len(deleted)} judged and deleted from {scratch}")

    def split(self, name: str) -> list[Task]:
        return [t for t in self.tasks if t.split == name]

    def task_id(self, task: Task) -> str:
        return f"{self.task_prefix}/{task.task_id}"

    def score(self, model_dir: Path, tasks: list[Task]) -> list[Scored]:
        """The answers of the model in `model_dir` to `tasks`, scored by exact match."""
        return exact_scores(tasks, self.answerer.answer_tasks(model_dir, tasks))

    def evaluation_rows(self, model_id: str, tasks: list[Task], scored: list[Scored]) -> list[dict[str, Any]]:
        return [
            {"model_id": model_id, "task_id": self.task_id(t), "judge": JUDGE, "answer": s.answer, "score": s.score}
            for t, s in zip(tasks, scored, strict=True)
        ]


Ctx = Runtime[SelfdevContext]


# ----------------------------------------------------------------------------- nodes


def baselines(state: SessionState, runtime: Ctx) -> SessionState:
    """Score base, experts and reference merges on dev and test: the bar to beat."""
    ctx = runtime.context
    if ctx.done(0, "baselines"):
        return {}
    sid = ctx.session_id
    experts = [f"{sid}/expert/{p.name}" for p in ctx.expert_dirs]
    models: list[tuple[str, str, str, Path, str | None]] = [(f"{sid}/base", "base", "base", ctx.base_dir, None)]
    models += [(m, "expert", p.name, p, None) for m, p in zip(experts, ctx.expert_dirs, strict=True)]
    models += [(f"{sid}/baseline/{m}", "baseline", m, ctx.model_dir(f"{sid}/baseline/{m}"), m) for m in BASELINE_METHODS]
    dev, test = ctx.split("dev"), ctx.split("test")
    model_rows, evaluation_rows = [], []
    with progress("baselines", len(models)) as advance:
        for model_id, kind, name, path, method in models:
            if method is not None:
                params = baseline_merge(
                    method, ctx.base_dir, ctx.expert_dirs, path, answerer=ctx.answerer, dev_tasks=dev,
                    include=ctx.config.models.include or None,
                )
                name += "".join(f"({k}={v})" for k, v in params.items())
            scored = ctx.score(path, dev + test)
            model_rows.append({
                "model_id": model_id, "session_id": sid, "kind": kind, "name": name, "path": str(path),
                "parent_ids": [f"{sid}/base", *experts] if method else [],
            })
            evaluation_rows += ctx.evaluation_rows(model_id, dev + test, scored)
            advance(info=f"{name}: dev {mean_score(scored[: len(dev)]):.1f}")
    with ctx.step(0, "baselines") as archive:
        archive.add_models(model_rows)
        archive.add_evaluations(evaluation_rows)
    return {}


def propose(state: SessionState, runtime: Ctx) -> SessionState:
    """Sample N merge programs from the generator, prompted with the archive's best so far."""
    ctx = runtime.context
    it, generator = state["iteration"], ctx.generator
    ctx.record_reviews()  # a quarantined program is never an exemplar
    k = generator.config.exemplars
    exemplars = ctx.archive.top_algorithms(ctx.session_id, k, max_iteration=it - 1) if k else []
    before = generator.prompt.hash
    warning = generator.reload_prompt()  # an edit saved since the last iteration is used from here on
    if warning:
        say(f"  [prompts] {warning}")
    elif generator.prompt.hash != before:
        say(f"  [prompts] generator template {before} -> {generator.prompt.hash} ({generator.prompt.path})")
    prompt_text = generator.render(exemplars)
    temperature = generator.temperature(it)
    completions = generator.sample(
        ctx.generator_version(state), prompt_text, temperature=temperature, seed=ctx.config.seed * 1000 + it,
        label=f"[iteration {it}] generator v{state['generator_version']}",
    )
    proposals = [
        {
            "algorithm_id": f"{ctx.session_id}/it{it}/s{index:03d}",
            "sample_index": index,
            "completion": completion,
            "temperature": temperature,
            "exemplar_ids": [e["algorithm_id"] for e in exemplars],
        }
        for index, completion in enumerate(completions)
    ]
    return {"proposals": proposals, "prompt_text": prompt_text, "template_text": generator.prompt.text}


def vet(state: SessionState, runtime: Ctx) -> SessionState:
    """Normalise, dedupe and run the static policy; every proposal is recorded, rejected or not."""
    ctx = runtime.context
    it, sid = state["iteration"], ctx.session_id
    if ctx.done(it, "vet"):
        return {"to_execute": queries.runnable_algorithms(ctx.archive, sid, it)}
    seen = queries.first_algorithm_by_code(ctx.archive, sid, before_iteration=it)
    proposals = state["proposals"]
    template = state.get("template_text") or ctx.generator.prompt.text  # (checkpoints of schema < 7 lack it)
    template_hash = prompt_hash(template)
    vetted = vet_programs([(p["algorithm_id"], p["completion"]) for p in proposals], seen)
    rows = [
        algorithm_row(
            sid, p["algorithm_id"], v.code, v.verdict, iteration=it, sample_index=p["sample_index"],
            prompt_text=state["prompt_text"], generator_version=state["generator_version"],
            temperature=p["temperature"], exemplar_ids=p["exemplar_ids"], duplicate_of=v.duplicate_of,
            normalized_hash=v.normalized_hash, template_hash=template_hash,
        )
        for p, v in zip(proposals, vetted, strict=True)
    ]
    with ctx.step(it, "vet") as archive:
        archive.add_prompt_uses(sid, it, [("generator-template", ctx.generator.prompt.name, template, template_hash)])
        archive.add_prompt("generator", ctx.generator.prompt.name, state["prompt_text"])
        archive.add_algorithms(rows)
    to_execute = [p["algorithm_id"] for p, v in zip(proposals, vetted, strict=True) if v.runnable]
    rejected = sum(not v.verdict.ok for v in vetted)
    dupes = sum(v.duplicate_of is not None for v in vetted)
    say(f"  vetted: {len(to_execute)} to run, {rejected} rejected by policy, {dupes} duplicates")
    return {"to_execute": to_execute}


def execute(state: SessionState, runtime: Ctx) -> SessionState:
    """Apply each program to the experts' task vectors in the sandbox; record every verdict.

    With judge.scratch_dir, each merged model is judged as soon as it is merged, while the
    sandbox merges the next ones, and its weights are deleted at once unless it can still rank
    in the top-k: scratch holds a few models, not an iteration's (the judge step is done here)."""
    ctx = runtime.context
    it, sid = state["iteration"], ctx.session_id
    if ctx.done(it, "execute"):
        return {}
    pending = state["to_execute"]
    jobs = ctx.merge_jobs(pending)
    scratch = ctx.scratch_dir
    dev, k = ctx.split("dev"), ctx.config.report.top_k
    contenders = sorted((a["dev_score"] for a in ctx.archive.top_algorithms(sid, k)), reverse=True)
    evaluations: list[dict[str, Any]] = []

    def judge_now(index: int, result: SandboxResult) -> str:
        if result.verdict != "ok":
            return ""
        model_id = f"{pending[index]}/model"
        scored = ctx.score(jobs[index].out_dir, dev)
        evaluations.extend(ctx.evaluation_rows(model_id, dev, scored))
        score = mean_score(scored) / 100  # as the archive's dev_score
        if len(contenders) >= k and score < contenders[k - 1]:
            shutil.rmtree(jobs[index].out_dir, ignore_errors=True)  # can no longer make the top-k
        else:
            contenders.append(score)
            contenders.sort(reverse=True)
        return f"dev {100 * score:.1f}"

    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    label = f"sandbox ({ctx.runner.name})" + (" + judge (dev)" if scratch is not None else "")
    results = run_merge_jobs(ctx.runner, jobs, workers=ctx.workers, label=label,
                             consume=judge_now if scratch is not None else None)
    runs, models = [], []
    for algorithm_id, job, result in zip(pending, jobs, results, strict=True):
        runs.append(sandbox_run_row(algorithm_id, result, ctx.runner))
        if result.verdict == "ok":
            models.append({
                "model_id": f"{algorithm_id}/model", "session_id": sid, "kind": "merged",
                "name": algorithm_id.rsplit("/", 2)[-2] + "/" + algorithm_id.rsplit("/", 1)[-1],
                "algorithm_id": algorithm_id, "path": str(job.out_dir),
                "parent_ids": [f"{sid}/base"] + [f"{sid}/expert/{p.name}" for p in ctx.expert_dirs],
                "generation": it,
            })
    with ctx.step(it, "execute") as archive:
        archive.add_sandbox_runs(runs)
        archive.add_models(models)
        if scratch is not None:  # the judge node keeps the top-k's weights and deletes the rest
            archive.add_evaluations(evaluations)
            archive.mark_step(sid, it, "judge")
    return {}


def judge(state: SessionState, runtime: Ctx) -> SessionState:
    """Each merged model answers the dev tasks; exact-match scores go to the archive."""
    ctx = runtime.context
    it = state["iteration"]
    if ctx.done(it, "judge"):
        ctx.settle_weights()
        return {}
    merged = queries.merged_models(ctx.archive, ctx.session_id, it)
    dev = ctx.split("dev")
    best = None
    rows = []
    with progress("judge (dev)", len(merged)) as advance:
        answers = ctx.answerer.answer_many([(Path(path), dev) for _, path in merged])
        for (model_id, _), answered in zip(merged, answers, strict=True):
            scored = exact_scores(dev, answered)
            rows += ctx.evaluation_rows(model_id, dev, scored)
            score = mean_score(scored)
            best = score if best is None else max(best, score)
            advance(info=f"best {best:.1f}")
    with ctx.step(it, "judge") as archive:
        archive.add_evaluations(rows)
    return {}


def select(state: SessionState, runtime: Ctx) -> SessionState:
    """Self-Developing mode keeps seed and experts fixed: report where this iteration stands."""
    ctx = runtime.context
    it = state["iteration"]
    for row in queries.iteration_stats(ctx.archive, ctx.session_id, it):
        say(f"  iteration {it}: {row['n_executable']}/{row['n_programs']} executable, "
            f"mean dev {percent(row['mean_dev'])}, best {percent(row['max_dev'])}")
    return {}


def improve(state: SessionState, runtime: Ctx) -> SessionState:
    """DPO on this iteration's programs (top vs bottom by dev score); a new generator version.

    A full fine-tune writes a model dir; LoRA writes only an adapter (the current one trained
    further), which the generator's backend loads at once (a server hot-loads it)."""
    ctx = runtime.context
    it, version, sid = state["iteration"], state["generator_version"], ctx.session_id
    nxt: SessionState = {"iteration": it + 1}
    cfg = ctx.config.dpo
    if not cfg.enabled:
        return nxt
    new_version = version + 1
    out_dir = ctx.workdir / "generators" / sid / f"v{new_version}"
    lora = bool(cfg.lora_rank)
    trained: SessionState = (
        {"generator_version": new_version, "generator_path": state["generator_path"], "generator_adapter": str(out_dir)}
        if lora else {"generator_version": new_version, "generator_path": str(out_dir), "generator_adapter": ""}
    )
    if ctx.done(it, "improve"):
        return {**nxt, **trained}
    ctx.record_reviews()
    verdicts = latest_verdicts(ctx.archive, sid)
    scores = {r["algorithm_id"]: r["dev_score"] for r in ctx.archive.algorithm_scores(sid)}
    scored = [
        {"algorithm_id": p["algorithm_id"], "prompt": state["prompt_text"],
         "completion": completion_text(p["completion"]),
         # a quarantined program is never a chosen one: it ranks with those that did not run
         "score": None if verdicts.get(p["algorithm_id"]) == "quarantine" else scores.get(p["algorithm_id"])}
        for p in state["proposals"]
    ]
    pairs = make_preference_pairs(scored, top_frac=cfg.top_frac, bottom_frac=cfg.bottom_frac, max_pairs=cfg.max_pairs)
    people: list[dict[str, Any]] = []
    if cfg.human_weight:
        approved = [a for a, v in verdicts.items() if v == "approve"]
        rejected = [a for a, v in verdicts.items() if v == "reject"]
        bottom = bottom_ids(scored, cfg.bottom_frac) if approved else []
        code = queries.algorithm_code(ctx.archive, approved + rejected)
        completions = {**{a: completion_text(c) for a, c in code.items()}, **{s["algorithm_id"]: s["completion"] for s in scored}}
        people = human_pairs(approved, rejected, bottom, completions, scores, state["prompt_text"])
    if not pairs and not people:
        say(f"  DPO skipped: no preference pairs (all {len(scored)} programs scored alike, no verdicts)")
        return nxt
    kind = f"LoRA rank {cfg.lora_rank} adapter" if lora else "full fine-tune"
    from_people = f" + {len(people)} from reviewers (x{cfg.human_weight})" if people else ""
    say(f"  DPO: {len(pairs)} pairs{from_people}, generator v{version} -> v{new_version} ({kind})")
    if out_dir.exists():  # a DPO run killed before it was recorded: start it over
        shutil.rmtree(out_dir)
    current = ctx.generator_version(state)
    result = train_dpo(
        current.weights, pairs + people * cfg.human_weight, out_dir, cfg, seed=ctx.config.seed * 1000 + it,
        adapter=current.adapter,
    )
    new = ctx.generator_version({**state, **trained})
    dpo_run_id = f"{sid}/dpo/it{it}"
    with ctx.step(it, "improve") as archive:  # the prompt itself was archived by `vet`
        archive.add_preference_pairs([
            {"pair_id": f"{dpo_run_id}/{tag}{i:04d}", "session_id": sid, "iteration": it,
             "prompt_hash": prompt_hash(state["prompt_text"]),
             "chosen_algorithm_id": p["chosen_id"], "rejected_algorithm_id": p["rejected_id"],
             "chosen_score": _or_nan(p["chosen_score"]), "rejected_score": _or_nan(p["rejected_score"]),
             "dpo_run_id": dpo_run_id, "source": source}
            for tag, source, group in (("p", "scores", pairs), ("h", "human", people))
            for i, p in enumerate(group)
        ])
        archive.add_dpo_run({
            "dpo_run_id": dpo_run_id, "session_id": sid, "iteration": it, "base_version": version,
            "new_version": new_version, "num_pairs": len(pairs) + len(people) * cfg.human_weight, "config_json": cfg.model_dump(),
            "final_loss": result.final_loss, "duration_s": result.duration_s,
        })
        archive.add_generator_version(
            sid, new_version, str(out_dir), parent_version=version, dpo_run_id=dpo_run_id,
            weights=str(new.weights), adapter_path=str(new.adapter) if new.adapter else None,
            served_name=ctx.generator.served_name(new),
        )
    say(f"  DPO done in {result.duration_s:.0f}s (loss {result.final_loss:.3f})")
    if lora and after_improve({**state, **nxt}, runtime) == "propose":
        started = time.perf_counter()
        backend = ctx.generator.backend(new)
        say(f"  generator v{new_version} loaded in {time.perf_counter() - started:.1f}s: {backend.name}")
    return {**nxt, **trained}


def _or_nan(score: float | None) -> float:
    return float("nan") if score is None else score


def report(state: SessionState, runtime: Ctx) -> SessionState:
    """Re-score the top algorithms by dev score on the test split (scored once, as in the paper)."""
    ctx = runtime.context
    last = state["iteration"]
    if ctx.done(last, "report"):
        return {"finished": True}
    ctx.settle_weights()
    top = ctx.archive.top_algorithms(ctx.session_id, ctx.config.report.top_k)
    test = ctx.split("test")
    ids = [f"{a['algorithm_id']}/model" for a in top]
    paths = ctx.archive.model_paths(ids)
    rows = []
    with progress("test split (top algorithms)", len(ids)) as advance:
        for model_id in ids:
            rows += ctx.evaluation_rows(model_id, test, ctx.score(Path(paths[model_id]), test))
            advance()
    with ctx.step(last, "report") as archive:
        archive.add_evaluations(rows)
        archive.finish_session(ctx.session_id, "finished")
    return {"finished": True}


# ----------------------------------------------------------------------------- wiring


def after_improve(state: SessionState, runtime: Ctx) -> Literal["propose", "report"]:
    return "propose" if state["iteration"] < runtime.context.config.session.iterations else "report"


def build_graph(checkpointer: Any) -> Any:
    graph = StateGraph(SessionState, context_schema=SelfdevContext)
    for node in (baselines, propose, vet, execute, judge, select, improve, report):
        graph.add_node(node.__name__, node)
    graph.add_edge(START, "baselines")
    graph.add_edge("baselines", "propose")
    graph.add_edge("propose", "vet")
    graph.add_edge("vet", "execute")
    graph.add_edge("execute", "judge")
    graph.add_edge("judge", "select")
    graph.add_edge("select", "improve")
    graph.add_conditional_edges("improve", after_improve)
    graph.add_edge("report", END)
    return graph.compile(checkpointer=checkpointer)
