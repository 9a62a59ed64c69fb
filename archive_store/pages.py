"""Reads behind `coevo serve` and `coevo report --html`: sessions, the papers' per-iteration and
per-generation series, one algorithm with everything known about it, lineage, prompt versions.

Every function takes an open `ArchiveReader` (the web app opens the published snapshot per
request, so it never waits on a running session) and returns plain rows.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from archive_store.db import ArchiveError
from archive_store.reader import ArchiveReader

# At most this many earlier programs are compared when looking for an algorithm's closest relative.
RELATIVE_CANDIDATES = 400


def sessions(archive: ArchiveReader, session_id: str | None = None) -> list[dict[str, Any]]:
    """Every session (or just `session_id`), newest first, with its runner(s) and counts of
    programs and models."""
    where, params = ("WHERE s.session_id = ?", [session_id]) if session_id is not None else ("", [])
    return archive.records(
        f"""
        SELECT s.session_id, s.mode, s.seed, s.status, s.started_at, s.finished_at,
               date_diff('second', s.started_at, coalesce(s.finished_at, now() AT TIME ZONE 'UTC')) AS elapsed_s,
               (SELECT count(*) FROM algorithms a WHERE a.session_id = s.session_id) AS n_algorithms,
               (SELECT count(*) FROM models m WHERE m.session_id = s.session_id) AS n_models,
               (SELECT string_agg(DISTINCT r.runner, ', ') FROM sandbox_runs r
                  JOIN algorithms a ON a.algorithm_id = r.algorithm_id WHERE a.session_id = s.session_id) AS runner
        FROM sessions s {where} ORDER BY s.started_at DESC, s.session_id
        """, params,
    )


def session_detail(archive: ArchiveReader, session_id: str) -> dict[str, Any]:
    """One session's row, its config parsed; ArchiveError when there is none."""
    rows = sessions(archive, session_id)
    if not rows:
        raise ArchiveError(f"no session {session_id!r} in the archive")
    row = rows[0]
    row["config"] = json.loads(archive.scalar("SELECT config_json FROM sessions WHERE session_id = ?", [session_id]))
    return row


def step_timings(archive: ArchiveReader, session_id: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(steps in the order they run, one row per iteration / generation: {generation, total,
    step: seconds}). A step's time runs from the previous step's commit (the session's start for the
    first); after a resume it includes the time the session was stopped."""
    steps: list[str] = []
    rows: dict[int, dict[str, Any]] = {}
    for generation, step, seconds in archive.query(
        "SELECT g.generation, g.step, date_diff('millisecond', coalesce(lag(g.committed_at) OVER (ORDER BY g.committed_at), "
        "s.started_at), g.committed_at) / 1000.0 FROM graph_steps g JOIN sessions s USING (session_id) "
        "WHERE g.session_id = ? ORDER BY g.committed_at", [session_id],
    )[1]:
        if step not in steps:
            steps.append(step)
        row = rows.setdefault(int(generation), {"generation": int(generation), "total": 0.0})
        row[step] = float(seconds)
        row["total"] += float(seconds)
    return steps, [rows[g] for g in sorted(rows)]


def dev_scores_by_iteration(archive: ArchiveReader, session_id: str) -> dict[int, list[float]]:
    """Dev scores of the executable programs (sandbox verdict ok), per iteration."""
    out: dict[int, list[float]] = {}
    for iteration, score in archive.query(
        "SELECT iteration, dev_score FROM algorithm_scores WHERE session_id = ? AND verdict = 'ok' "
        "AND dev_score IS NOT NULL ORDER BY iteration, algorithm_id", [session_id]
    )[1]:
        out.setdefault(int(iteration), []).append(float(score))
    return out


def outcomes_by_iteration(archive: ArchiveReader, session_id: str) -> dict[int, dict[str, int]]:
    """How many programs ended how (ok, rejected_by_policy, duplicate, timeout, ...), per iteration."""
    out: dict[int, dict[str, int]] = {}
    for iteration, outcome, n in archive.query(
        "SELECT iteration, outcome, count(*) FROM algorithm_scores WHERE session_id = ? GROUP BY ALL ORDER BY ALL",
        [session_id],
    )[1]:
        out.setdefault(int(iteration), {})[str(outcome)] = int(n)
    return out


def reviews_by_iteration(archive: ArchiveReader, session_id: str) -> dict[int, dict[str, int]]:
    """Human verdicts (each algorithm's latest), per iteration."""
    out: dict[int, dict[str, int]] = {}
    for iteration, verdict, n in archive.query(
        "SELECT a.iteration, r.verdict, count(*) FROM latest_reviews r JOIN algorithms a USING (algorithm_id) "
        "WHERE a.session_id = ? GROUP BY ALL ORDER BY ALL", [session_id],
    )[1]:
        out.setdefault(int(iteration), {})[str(verdict)] = int(n)
    return out


def dpo_history(archive: ArchiveReader, session_id: str) -> list[dict[str, Any]]:
    """Every DPO update of the session (the `dpo_history` view) with its human pairs counted."""
    return archive.records(
        "SELECT h.*, (SELECT count(*) FROM preference_pairs p WHERE p.dpo_run_id = h.dpo_run_id "
        "AND p.source = 'human') AS n_human_pairs FROM dpo_history h WHERE h.session_id = ? ORDER BY h.iteration",
        [session_id],
    )


def algorithms_page(
    archive: ArchiveReader, session_id: str, *, outcome: str | None = None, limit: int = 100, offset: int = 0
) -> list[dict[str, Any]]:
    """A session's programs, best dev score first, each with its latest human verdict."""
    where, params = "WHERE s.session_id = ?", [session_id]
    if outcome:
        where += " AND s.outcome = ?"
        params.append(outcome)
    return archive.records(
        f"SELECT s.algorithm_id, s.iteration, s.sample_index, s.generator_version, s.outcome, s.dev_score, "
        f"s.test_score, s.duration_s, r.verdict AS review FROM algorithm_scores s "
        f"LEFT JOIN latest_reviews r USING (algorithm_id) {where} "
        f"ORDER BY s.dev_score DESC NULLS LAST, s.algorithm_id LIMIT ? OFFSET ?",
        [*params, limit, offset],
    )


def algorithm(archive: ArchiveReader, algorithm_id: str) -> dict[str, Any]:
    """Everything about one algorithm: scores and outcome, code, policy finding, its latest
    sandbox run (verdict, reason, duration, memory, stdout/stderr), provenance (generator
    version, temperature, prompt and template hash, exemplars). ArchiveError when unknown."""
    rows = archive.records(
        "SELECT s.*, a.code, a.policy_reason, a.exemplar_ids, a.template_hash, a.created_at, "
        "r.runner, r.reason, r.stdout, r.stderr, g.served_name, g.path AS generator_path "
        "FROM algorithm_scores s JOIN algorithms a USING (algorithm_id) "
        "LEFT JOIN sandbox_runs r ON r.run_id = s.run_id "
        "LEFT JOIN generator_versions g ON g.session_id = s.session_id AND g.version = s.generator_version "
        "WHERE s.algorithm_id = ?", [algorithm_id],
    )
    if not rows:
        raise ArchiveError(f"no algorithm {algorithm_id!r} in the archive")
    return rows[0]


def closest_relative(archive: ArchiveReader, row: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """(relative, why) for an algorithm row: the shown exemplar most like it (its parents in the
    prompt), else the most similar earlier program of the session; None for the first one."""
    exemplars = [e for e in (row.get("exemplar_ids") or []) if e != row["algorithm_id"]]
    if exemplars:
        candidates = archive.records(
            "SELECT algorithm_id, iteration, code FROM algorithms WHERE list_contains(?, algorithm_id)", [exemplars]
        )
        why = "the most similar of the exemplars its prompt showed"
    else:
        candidates = archive.records(
            "SELECT algorithm_id, iteration, code FROM algorithms WHERE session_id = ? AND algorithm_id <> ? "
            "AND (iteration < ? OR (iteration = ? AND sample_index < ?)) AND duplicate_of IS NULL "
            "ORDER BY iteration DESC, sample_index DESC LIMIT ?",
            [row["session_id"], row["algorithm_id"], row["iteration"], row["iteration"], row["sample_index"],
             RELATIVE_CANDIDATES],
        )
        why = "the most similar earlier program of the session"
    if not candidates:
        return None
    lines = row["code"].splitlines()

    def similarity(candidate: dict[str, Any]) -> float:
        return difflib.SequenceMatcher(None, candidate["code"].splitlines(), lines, autojunk=False).ratio()

    best = max(candidates, key=similarity)
    return best, why


def task_results(archive: ArchiveReader, algorithm_id: str, limit: int = 500) -> list[dict[str, Any]]:
    """The merged model's score and answer on each task, with the reference answer."""
    return archive.records(
        "SELECT t.split, e.task_id, t.skill, e.judge, e.score, e.answer, t.answer AS reference "
        "FROM models m JOIN evaluations e ON e.model_id = m.model_id JOIN tasks t ON t.task_id = e.task_id "
        "WHERE m.algorithm_id = ? AND m.kind = 'merged' ORDER BY t.split, e.score, e.task_id LIMIT ?",
        [algorithm_id, limit],
    )


def generation_metrics(archive: ArchiveReader, session_id: str) -> list[dict[str, Any]]:
    """Population sessions: the per-generation metrics, team and coverage curve parsed."""
    rows = archive.records(
        "SELECT * FROM generation_metrics WHERE session_id = ? ORDER BY generation", [session_id]
    )
    for row in rows:
        row["team"] = json.loads(row["team"])
        row["coverage_curve"] = json.loads(row["coverage_curve"])
    return rows


def elite_grids(archive: ArchiveReader, session_id: str) -> tuple[int | None, dict[str, list[dict[str, Any]]]]:
    """CycleQD: (generation, grid -> occupied cells) of the last generation's MAP-Elites grids;
    AC/DC's 'population' is left out (it is a ranked list, not a grid)."""
    generation = archive.scalar(
        "SELECT max(generation) FROM population_snapshots WHERE session_id = ? AND grid <> 'population'", [session_id]
    )
    if generation is None:
        return None, {}
    grids: dict[str, list[dict[str, Any]]] = {}
    for row in archive.records(
        "SELECT grid, slot, model_id, fitness FROM population_snapshots WHERE session_id = ? AND generation = ? "
        "AND grid <> 'population' ORDER BY grid, slot", [session_id, generation]
    ):
        grids.setdefault(row["grid"], []).append(row)
    return int(generation), grids


def population_members(archive: ArchiveReader, session_id: str) -> list[dict[str, Any]]:
    """AC/DC: the last generation's population, best rank first, with names."""
    return archive.records(
        "SELECT p.slot, p.model_id, m.name, p.fitness, p.novelty FROM population_snapshots p "
        "JOIN models m USING (model_id) WHERE p.session_id = ? AND p.grid = 'population' AND p.generation = "
        "(SELECT max(generation) FROM population_snapshots WHERE session_id = ? AND grid = 'population') "
        "ORDER BY try_cast(p.slot AS INTEGER), p.slot", [session_id, session_id],
    )


def model(archive: ArchiveReader, model_id: str) -> dict[str, Any]:
    """One model's row; ArchiveError when unknown."""
    rows = archive.records("SELECT * FROM models WHERE model_id = ?", [model_id])
    if not rows:
        raise ArchiveError(f"no model {model_id!r} in the archive")
    return rows[0]


def lineage_tree(archive: ArchiveReader, model_id: str, max_depth: int = 12) -> dict[str, Any]:
    """`model_id` and its ancestors as a tree: {model_id, name, kind, generation, operator,
    mutation, parents: [...]}; shared ancestors repeat (it is a DAG shown as a tree), cut at
    `max_depth`."""
    rows = archive.records(
        "SELECT DISTINCT m.model_id, m.name, m.kind, m.generation, m.operator, m.mutation, m.algorithm_id, "
        "m.parent_ids FROM models m WHERE m.model_id = ? OR m.model_id IN "
        "(SELECT ancestor_id FROM lineage WHERE model_id = ?)", [model_id, model_id],
    )
    by_id = {r["model_id"]: r for r in rows}
    if model_id not in by_id:
        raise ArchiveError(f"no model {model_id!r} in the archive")

    def node(mid: str, depth: int) -> dict[str, Any]:
        row = by_id.get(mid, {"model_id": mid, "name": mid, "kind": "?", "parent_ids": []})
        parents = [] if depth >= max_depth else [node(p, depth + 1) for p in row.get("parent_ids") or []]
        return {**{k: v for k, v in row.items() if k != "parent_ids"}, "parents": parents}

    return node(model_id, 0)


def prompt_versions(archive: ArchiveReader, name: str | None = None) -> list[dict[str, Any]]:
    """Every archived version of the templates (or of `name`), oldest first, with what it produced."""
    if name is None:
        return archive.records("SELECT * FROM prompt_versions")
    return archive.records("SELECT * FROM prompt_versions WHERE name = ?", [name])


def prompt_text(archive: ArchiveReader, digest: str) -> str | None:
    """The archived text with hash `digest`."""
    value = archive.scalar("SELECT text FROM prompts WHERE prompt_hash = ?", [digest])
    return None if value is None else str(value)
