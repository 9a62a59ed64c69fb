"""The discovery loop, declared in one place.

    baselines -> propose -> vet -> execute -> judge -> select -> improve --+--> report -> END
                    ^                                                      |
                    +----------------- next iteration ---------------------+

Nodes are plain functions of (state, ctx): `state` is small and checkpointed after every node
(SQLite), `ctx` holds the live components (archive, generator backend, sandbox runner, judge).
Every node is idempotent given the archive: ids are deterministic and nodes skip work the
archive already holds, so a session killed anywhere resumes with nothing lost or done twice.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph

from agents.backends import LLMBackend
from agents.dpo import DPOSettings, make_preference_pairs, train_dpo
from agents.judge import Judge, mean_score
from archive_store import Archive, prompt_hash
from coevo.baselines import baseline_merge
from coevo.config import Config
from coevo.prompts import FENCE, Prompt, completion_text, extract_program, format_exemplars
from coevo.tasks import Task
from coevo.ui import percent, progress, say
from sandbox.policy import check_program, code_hash
from sandbox.runner import MergeJob, Runner, SandboxResult, run_many

BASELINE_METHODS = ("task_arithmetic", "ties")


class SessionState(TypedDict, total=False):
    iteration: int
    generator_version: int
    generator_path: str
    prompt_text: str
    proposals: list[dict[str, Any]]
    to_execute: list[str]
    finished: bool


@dataclass
class SessionContext:
    """The live components a session's nodes work with (never checkpointed)."""

    config: Config
    session_id: str
    workdir: Path
    archive: Archive
    runner: Runner
    base_dir: Path
    expert_dirs: list[Path]
    tasks: list[Task]
    task_prefix: str
    prompt: Prompt
    make_backend: Callable[[Path], LLMBackend]
    _backend: LLMBackend | None = field(default=None, repr=False)
    _backend_path: Path | None = field(default=None, repr=False)
    _judge: Judge | None = field(default=None, repr=False)

    def backend(self, path: Path) -> LLMBackend:
        """The generator backend serving `path`, (re)loaded when the version changed."""
        if self._backend is None:
            self._backend = self.make_backend(path)
        elif self._backend_path != path:
            reload = getattr(self._backend, "reload", None)
            if reload is not None:
                reload(path)
        self._backend_path = path
        return self._backend

    @property
    def judge(self) -> Judge:
        if self._judge is None:
            cfg = self.config.judge
            self._judge = Judge(
                self.base_dir, device=cfg.device, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens
            )
        return self._judge

    def split(self, name: str) -> list[Task]:
        return [t for t in self.tasks if t.split == name]

    def task_id(self, task: Task) -> str:
        return f"{self.task_prefix}/{task.task_id}"

    def model_dir(self, model_id: str) -> Path:
        return self.workdir / "models" / model_id.replace("/", "__")

    def temperature(self, iteration: int) -> float:
        g = self.config.generator
        last = max(1, self.config.session.iterations - 1)
        return g.temperature_start + (g.temperature_end - g.temperature_start) * min(1.0, iteration / last)


# ----------------------------------------------------------------------------- nodes


def baselines(state: SessionState, ctx: SessionContext) -> SessionState:
    """Score base, experts and reference merges on dev and test: the bar to beat."""
    sid = ctx.session_id
    experts = [f"{sid}/expert/{p.name}" for p in ctx.expert_dirs]
    models: list[tuple[str, str, str, Path, str | None]] = [(f"{sid}/base", "base", "base", ctx.base_dir, None)]
    models += [(m, "expert", p.name, p, None) for m, p in zip(experts, ctx.expert_dirs, strict=True)]
    models += [(f"{sid}/baseline/{m}", "baseline", m, ctx.model_dir(f"{sid}/baseline/{m}"), m) for m in BASELINE_METHODS]
    if ctx.archive.existing_ids("evaluations", "model_id", [m[0] for m in models]):
        return {}  # the step committed before (resume)
    dev, test = ctx.split("dev"), ctx.split("test")
    model_rows, evaluation_rows = [], []
    with progress("baselines", len(models)) as advance:
        for model_id, kind, name, path, method in models:
            if method is not None:
                params = baseline_merge(
                    method, ctx.base_dir, ctx.expert_dirs, path, judge=ctx.judge, dev_tasks=dev,
                    include=ctx.config.models.include or None,
                )
                name += "".join(f"({k}={v})" for k, v in params.items())
            scored = ctx.judge.score(path, dev + test)
            model_rows.append({
                "model_id": model_id, "session_id": sid, "kind": kind, "name": name, "path": str(path),
                "parent_ids": [f"{sid}/base", *experts] if method else [],
            })
            evaluation_rows += _evaluation_rows(ctx, model_id, dev + test, scored)
            advance(info=f"{name}: dev {mean_score(scored[: len(dev)]):.1f}")
    with ctx.archive.transaction():  # one transaction per graph step: all of it or none
        ctx.archive.add_models(model_rows)
        ctx.archive.add_evaluations(evaluation_rows)
    return {}


def propose(state: SessionState, ctx: SessionContext) -> SessionState:
    """Sample N merge programs from the generator, prompted with the archive's best so far."""
    it, cfg = state["iteration"], ctx.config.generator
    exemplars = ctx.archive.top_algorithms(ctx.session_id, cfg.exemplars, max_iteration=it - 1) if cfg.exemplars else []
    prompt_text = ctx.prompt.render(
        n_experts=len(ctx.expert_dirs),
        exemplars=format_exemplars([(e["code"], 100 * e["dev_score"]) for e in exemplars]),
    )
    temperature = ctx.temperature(it)
    say(f"[iteration {it}] generator v{state['generator_version']}: sampling {cfg.programs_per_iteration} programs at T={temperature:.2f}")
    started = time.time()
    completions = ctx.backend(Path(state["generator_path"])).generate(
        [prompt_text], n=cfg.programs_per_iteration, temperature=temperature, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens, seed=ctx.config.seed * 1000 + it, stop=[FENCE],
    )[0]
    say(f"  sampled in {time.time() - started:.1f}s")
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
    return {"proposals": proposals, "prompt_text": prompt_text}


def vet(state: SessionState, ctx: SessionContext) -> SessionState:
    """Normalise, dedupe and run the static policy; every proposal is recorded, rejected or not."""
    it, sid = state["iteration"], ctx.session_id
    seen = dict(ctx.archive.query(
        "select normalized_hash, min(algorithm_id) from algorithms where session_id = ? and iteration < ? "
        "and duplicate_of is null group by 1", [sid, it],
    )[1])
    rows, to_execute = [], []
    rendered_hash = prompt_hash(state["prompt_text"])
    for proposal in state["proposals"]:
        code = extract_program(proposal["completion"])
        verdict = check_program(code, max_bytes=16_000)
        normalized = code_hash(code)
        duplicate_of = seen.get(normalized) if verdict.ok else None
        if verdict.ok and duplicate_of is None:
            seen[normalized] = proposal["algorithm_id"]
            to_execute.append(proposal["algorithm_id"])
        rows.append({
            "algorithm_id": proposal["algorithm_id"], "session_id": sid, "iteration": it,
            "sample_index": proposal["sample_index"], "generator_version": state["generator_version"],
            "prompt_hash": rendered_hash, "temperature": proposal["temperature"], "code": code,
            "code_hash": prompt_hash(code), "normalized_hash": normalized, "duplicate_of": duplicate_of,
            "policy_ok": verdict.ok, "policy_rule": verdict.rule, "policy_reason": verdict.reason,
            "exemplar_ids": proposal["exemplar_ids"],
        })
    with ctx.archive.transaction():  # one transaction per graph step: all of it or none
        ctx.archive.add_prompt("generator", ctx.prompt.name, state["prompt_text"])
        ctx.archive.add_algorithms(rows)
    rejected = sum(not r["policy_ok"] for r in rows)
    dupes = sum(r["duplicate_of"] is not None for r in rows)
    say(f"  vetted: {len(to_execute)} to run, {rejected} rejected by policy, {dupes} duplicates")
    return {"to_execute": to_execute}


def execute(state: SessionState, ctx: SessionContext) -> SessionState:
    """Apply each program to the experts' task vectors in the sandbox; record every verdict."""
    sid = ctx.session_id
    run_ids = {f"{a}/run": a for a in state["to_execute"]}
    if ctx.archive.existing_ids("sandbox_runs", "run_id", list(run_ids)):
        return {}  # the step committed before (resume)
    pending = list(run_ids.values())
    code = dict(ctx.archive.query(
        "select algorithm_id, code from algorithms where algorithm_id in (select unnest(?))", [pending]
    )[1]) if pending else {}
    workers = ctx.config.sandbox.workers
    ok = 0
    runs, models = [], []
    with progress(f"sandbox ({ctx.runner.name})", len(run_ids)) as advance:
        for start in range(0, len(pending), 4 * workers):
            chunk = pending[start : start + 4 * workers]
            jobs = [
                MergeJob(source=code[a], base_dir=ctx.base_dir, expert_dirs=ctx.expert_dirs,
                         out_dir=ctx.model_dir(f"{a}/model"), include=ctx.config.models.include or None)
                for a in chunk
            ]
            results = run_many(ctx.runner, jobs, workers=workers)
            for algorithm_id, job, result in zip(chunk, jobs, results, strict=True):
                runs.append(sandbox_run_row(algorithm_id, result, ctx.runner))
                if result.verdict == "ok":
                    ok += 1
                    models.append({
                        "model_id": f"{algorithm_id}/model", "session_id": sid, "kind": "merged",
                        "name": algorithm_id.rsplit("/", 2)[-2] + "/" + algorithm_id.rsplit("/", 1)[-1],
                        "algorithm_id": algorithm_id, "path": str(job.out_dir),
                        "parent_ids": [f"{sid}/base"] + [f"{sid}/expert/{p.name}" for p in ctx.expert_dirs],
                        "generation": state["iteration"],
                    })
            advance(len(chunk), info=f"{ok} ok")
    with ctx.archive.transaction():  # one transaction per graph step: all of it or none
        ctx.archive.add_sandbox_runs(runs)
        ctx.archive.add_models(models)
    return {}


def judge(state: SessionState, ctx: SessionContext) -> SessionState:
    """Each merged model answers the dev tasks; exact-match scores go to the archive."""
    it = state["iteration"]
    merged = ctx.archive.query(
        "select m.model_id, m.path from models m join algorithms a using (algorithm_id) "
        "where a.session_id = ? and a.iteration = ? and m.kind = 'merged' order by m.model_id",
        [ctx.session_id, it],
    )[1]
    if ctx.archive.existing_ids("evaluations", "model_id", [m for m, _ in merged]):
        return {}  # the step committed before (resume)
    dev = ctx.split("dev")
    best = None
    rows = []
    with progress("judge (dev)", len(merged)) as advance:
        for model_id, path in merged:
            scored = ctx.judge.score(Path(path), dev)
            rows += _evaluation_rows(ctx, model_id, dev, scored)
            score = mean_score(scored)
            best = score if best is None else max(best, score)
            advance(info=f"best {best:.1f}")
    with ctx.archive.transaction():  # one transaction per graph step: all of it or none
        ctx.archive.add_evaluations(rows)
    return {}


def select(state: SessionState, ctx: SessionContext) -> SessionState:
    """Self-Developing mode keeps seed and experts fixed: report where this iteration stands."""
    it = state["iteration"]
    stats = ctx.archive.records(
        "select * from iteration_stats where session_id = ? and iteration = ?", [ctx.session_id, it]
    )
    for row in stats:
        say(f"  iteration {it}: {row['n_executable']}/{row['n_programs']} executable, "
            f"mean dev {percent(row['mean_dev'])}, best {percent(row['max_dev'])}")
    return {}


def improve(state: SessionState, ctx: SessionContext) -> SessionState:
    """DPO on this iteration's programs (top vs bottom by dev score); a new generator version."""
    it, version, sid = state["iteration"], state["generator_version"], ctx.session_id
    nxt: SessionState = {"iteration": it + 1}
    cfg = ctx.config.dpo
    if not cfg.enabled:
        return nxt
    new_version = version + 1
    out_dir = ctx.workdir / "generators" / sid / f"v{new_version}"
    if ctx.archive.scalar(
        "select count(*) from generator_versions where session_id = ? and version = ?", [sid, new_version]
    ):
        return {**nxt, "generator_version": new_version, "generator_path": str(out_dir)}
    scores = {r["algorithm_id"]: r["dev_score"] for r in ctx.archive.algorithm_scores(sid, it)}
    scored = [
        {"algorithm_id": p["algorithm_id"], "prompt": state["prompt_text"],
         "completion": completion_text(p["completion"]), "score": scores.get(p["algorithm_id"])}
        for p in state["proposals"]
    ]
    pairs = make_preference_pairs(scored, top_frac=cfg.top_frac, bottom_frac=cfg.bottom_frac, max_pairs=cfg.max_pairs)
    if not pairs:
        say(f"  DPO skipped: no preference pairs (all {len(scored)} programs scored alike)")
        return nxt
    settings = DPOSettings(
        beta=cfg.beta, learning_rate=cfg.learning_rate, epochs=cfg.epochs, batch_size=cfg.batch_size,
        lora_rank=cfg.lora_rank, max_length=cfg.max_length, seed=ctx.config.seed * 1000 + it,
    )
    say(f"  DPO: {len(pairs)} pairs, generator v{version} -> v{new_version}")
    if out_dir.exists():  # a DPO run killed before it was recorded: start it over
        shutil.rmtree(out_dir)
    result = train_dpo(Path(state["generator_path"]), pairs, out_dir, settings)
    dpo_run_id = f"{sid}/dpo/it{it}"
    with ctx.archive.transaction():  # the prompt itself was archived by `vet`
        ctx.archive.add_preference_pairs([
            {"pair_id": f"{dpo_run_id}/p{i:04d}", "session_id": sid, "iteration": it,
             "prompt_hash": prompt_hash(state["prompt_text"]),
             "chosen_algorithm_id": p["chosen_id"], "rejected_algorithm_id": p["rejected_id"],
             "chosen_score": p["chosen_score"], "rejected_score": p["rejected_score"] if p["rejected_score"] is not None else float("nan"),
             "dpo_run_id": dpo_run_id}
            for i, p in enumerate(pairs)
        ])
        ctx.archive.add_dpo_run({
            "dpo_run_id": dpo_run_id, "session_id": sid, "iteration": it, "base_version": version,
            "new_version": new_version, "num_pairs": len(pairs), "config_json": cfg.model_dump(),
            "final_loss": result.final_loss, "duration_s": result.duration_s,
        })
        ctx.archive.add_generator_version(sid, new_version, str(out_dir), parent_version=version, dpo_run_id=dpo_run_id)
    say(f"  DPO done in {result.duration_s:.0f}s (loss {result.final_loss:.3f})")
    return {**nxt, "generator_version": new_version, "generator_path": str(out_dir)}


def report(state: SessionState, ctx: SessionContext) -> SessionState:
    """Re-score the top algorithms by dev score on the test split (scored once, as in the paper)."""
    top = ctx.archive.top_algorithms(ctx.session_id, ctx.config.report.top_k)
    test = ctx.split("test")
    ids = [f"{a['algorithm_id']}/model" for a in top]
    paths = ctx.archive.model_paths(ids)
    scored_ids = {r[0] for r in ctx.archive.query(
        "select distinct e.model_id from evaluations e join tasks t using (task_id) "
        "where t.split = 'test' and e.model_id in (select unnest(?))", [ids])[1]} if ids else set()
    rows = []
    with progress("test split (top algorithms)", len(ids)) as advance:
        for model_id in ids:
            if model_id not in scored_ids:
                scored = ctx.judge.score(Path(paths[model_id]), test)
                rows += _evaluation_rows(ctx, model_id, test, scored)
            advance()
    with ctx.archive.transaction():  # one transaction per graph step: all of it or none
        ctx.archive.add_evaluations(rows)
        ctx.archive.finish_session(ctx.session_id, "finished")
    return {"finished": True}


# ----------------------------------------------------------------------------- wiring


def _after_improve(state: SessionState, ctx: SessionContext) -> str:
    return "propose" if state["iteration"] < ctx.config.session.iterations else "report"


def build_graph(ctx: SessionContext, checkpointer: Any) -> Any:
    graph = StateGraph(SessionState)
    for node in (baselines, propose, vet, execute, judge, select, improve, report):
        graph.add_node(node.__name__, functools.partial(node, ctx=ctx))
    graph.add_edge(START, "baselines")
    graph.add_edge("baselines", "propose")
    graph.add_edge("propose", "vet")
    graph.add_edge("vet", "execute")
    graph.add_edge("execute", "judge")
    graph.add_edge("judge", "select")
    graph.add_edge("select", "improve")
    graph.add_conditional_edges("improve", functools.partial(_after_improve, ctx=ctx), ["propose", "report"])
    graph.add_edge("report", END)
    return graph.compile(checkpointer=checkpointer)


def sandbox_run_row(algorithm_id: str, result: SandboxResult, runner: Runner) -> dict[str, Any]:
    """The archive row of an algorithm's sandbox run (`<algorithm_id>/run`)."""
    return {
        "run_id": f"{algorithm_id}/run", "algorithm_id": algorithm_id, "runner": result.runner or runner.name,
        "verdict": result.verdict, "reason": result.reason, "duration_s": result.duration_s,
        "peak_memory_mb": result.peak_memory_mb, "stdout": result.stdout, "stderr": result.stderr,
    }


def _evaluation_rows(ctx: SessionContext, model_id: str, tasks: list[Task], scored: list[Any]) -> list[dict]:
    return [
        {"model_id": model_id, "task_id": ctx.task_id(t), "judge": ctx.judge.name, "answer": s.answer, "score": s.score}
        for t, s in zip(tasks, scored, strict=True)
    ]
