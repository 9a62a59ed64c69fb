"""Named reads of the archive: what the discovery loops, the reports and the CLI ask it.

Every SQL read outside `archive_store` is one of these functions (or a view); they take an
open archive (the writer's, or a reader's snapshot) and return plain Python values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from archive_store.db import ArchiveError
from archive_store.pages import algorithm as algorithm_detail
from archive_store.reader import NOT_QUARANTINED, ArchiveReader

# ----------------------------------------------------------------------------- sessions


def session(archive: ArchiveReader, session_id: str) -> dict[str, Any] | None:
    """One session's row (with its config as JSON text), or None."""
    rows = archive.records("SELECT * FROM sessions WHERE session_id = ?", [session_id])
    return rows[0] if rows else None


def latest_unfinished_session(archive: ArchiveReader) -> dict[str, Any] | None:
    """The most recently started session that has not finished (running, stopped or killed)."""
    rows = archive.records(
        "SELECT * FROM sessions WHERE status != 'finished' ORDER BY started_at DESC, session_id DESC LIMIT 1"
    )
    return rows[0] if rows else None


def current_generator_version(archive: ArchiveReader, session_id: str) -> dict[str, Any] | None:
    """A session's newest generator version row (version, path, weights, adapter_path,
    served_name), or None."""
    rows = archive.records(
        "SELECT * FROM generator_versions WHERE session_id = ? ORDER BY version DESC LIMIT 1", [session_id]
    )
    return rows[0] if rows else None


# ----------------------------------------------------------------------------- algorithms


def first_algorithm_by_code(archive: ArchiveReader, session_id: str, *, before_iteration: int) -> dict[str, str]:
    """Normalised code hash -> the first algorithm with that code, of earlier iterations."""
    return dict(archive.query(
        "SELECT normalized_hash, min(algorithm_id) FROM algorithms WHERE session_id = ? AND iteration < ? "
        "AND duplicate_of IS NULL GROUP BY 1", [session_id, before_iteration],
    )[1])


def runnable_algorithms(archive: ArchiveReader, session_id: str, iteration: int) -> list[str]:
    """The algorithms of an iteration that passed the policy and repeat no earlier one."""
    return [row[0] for row in archive.query(
        "SELECT algorithm_id FROM algorithms WHERE session_id = ? AND iteration = ? AND policy_ok "
        "AND duplicate_of IS NULL ORDER BY algorithm_id", [session_id, iteration],
    )[1]]


def algorithm_code(archive: ArchiveReader, algorithm_ids: list[str]) -> dict[str, str]:
    """algorithm id -> its code."""
    if not algorithm_ids:
        return {}
    return dict(archive.query(
        "SELECT algorithm_id, code FROM algorithms WHERE algorithm_id IN (SELECT unnest(?))", [algorithm_ids]
    )[1])


def generated_algorithms(archive: ArchiveReader, limit: int = 64) -> list[dict[str, Any]]:
    """Executable generated algorithms of Self-Developing sessions, best dev score first
    (crossover operators: quarantined ones never)."""
    return archive.records(
        "SELECT s.algorithm_id, a.code, s.dev_score FROM algorithm_scores s JOIN algorithms a USING (algorithm_id) "
        "JOIN sessions x ON x.session_id = a.session_id WHERE x.mode = 'selfdev' AND s.outcome = 'ok' "
        f"AND s.dev_score IS NOT NULL AND {NOT_QUARANTINED.format(column='s.algorithm_id')} "
        "ORDER BY s.dev_score DESC, s.algorithm_id LIMIT ?", [limit],
    )


def iteration_stats(archive: ArchiveReader, session_id: str, iteration: int | None = None) -> list[dict[str, Any]]:
    """Rows of the `iteration_stats` view of a session (one iteration, or all in order)."""
    if iteration is None:
        return archive.records("SELECT * FROM iteration_stats WHERE session_id = ? ORDER BY iteration", [session_id])
    return archive.records(
        "SELECT * FROM iteration_stats WHERE session_id = ? AND iteration = ?", [session_id, iteration]
    )


def top_dev_scores(archive: ArchiveReader, session_id: str, iteration: int, k: int = 3) -> list[float]:
    """The best `k` dev scores of an iteration's programs."""
    return [row[0] for row in archive.query(
        "SELECT dev_score FROM algorithm_scores WHERE session_id = ? AND iteration = ? AND dev_score IS NOT NULL "
        "ORDER BY dev_score DESC LIMIT ?", [session_id, iteration, k],
    )[1]]


def resolve_algorithm_id(archive: ArchiveReader, text: str) -> str:
    """The one algorithm id `text` names (the id, or the unique end of one); ArchiveError otherwise."""
    ids = [r[0] for r in archive.query(
        "SELECT algorithm_id FROM algorithms WHERE algorithm_id = ? OR algorithm_id LIKE '%/' || ? "
        "ORDER BY algorithm_id = ? DESC, algorithm_id LIMIT 3", [text, text, text])[1]]
    if ids and ids[0] == text:
        return text
    if not ids:
        raise ArchiveError(f"no algorithm {text!r} in the archive (see `coevo review`)")
    if len(ids) > 1:
        raise ArchiveError(f"{text!r} names several algorithms ({', '.join(ids[:2])}, ...): give the whole id")
    return str(ids[0])


def review_history(archive: ArchiveReader, algorithm_id: str) -> list[dict[str, Any]]:
    """An algorithm's verdicts, oldest first."""
    return archive.records(
        "SELECT verdict, note, reviewer, created_at FROM reviews WHERE algorithm_id = ? ORDER BY created_at, review_id",
        [algorithm_id],
    )


def review_algorithm(archive: ArchiveReader, algorithm_id: str) -> dict[str, Any]:
    """One algorithm with everything known about it (`pages.algorithm`); `algorithm_id` may be
    the end of an id. ArchiveError when there is none."""
    found = archive.scalar(
        "SELECT algorithm_id FROM algorithms WHERE algorithm_id = ? OR algorithm_id LIKE '%' || ? "
        "ORDER BY algorithm_id = ? DESC LIMIT 1", [algorithm_id, algorithm_id, algorithm_id],
    )
    if found is None:
        raise ArchiveError(f"no algorithm {algorithm_id!r} in the archive")
    return algorithm_detail(archive, str(found))


def session_leaderboard(archive: ArchiveReader, session_id: str) -> list[tuple[Any, ...]]:
    """(name, kind, dev, test) of a session's models: the baselines, and the merged models
    that were scored on test, best test score first (a tie in both scores keeps the
    reference models first, then goes by name, so the order never depends on the engine)."""
    return archive.query(
        """
        WITH scores AS (
          SELECT m.model_id, m.kind, m.name, m.algorithm_id, t.split, avg(e.score) AS score
          FROM models m JOIN evaluations e USING (model_id) JOIN tasks t USING (task_id)
          WHERE m.session_id = ? GROUP BY ALL
        )
        SELECT coalesce(algorithm_id, kind || ':' || name) AS name, kind,
               max(score) FILTER (WHERE split = 'dev') AS dev, max(score) FILTER (WHERE split = 'test') AS test
        FROM scores GROUP BY ALL
        HAVING kind != 'merged' OR max(score) FILTER (WHERE split = 'test') IS NOT NULL
        ORDER BY test DESC NULLS LAST, dev DESC, kind, name  -- ties: references first, then by name
        """,
        [session_id],
    )[1]


# ----------------------------------------------------------------------------- models


def merged_models(archive: ArchiveReader, session_id: str, generation: int) -> list[tuple[str, str]]:
    """(model id, path) of the models merged in a generation (Self-Developing: iteration)."""
    return [tuple(row) for row in archive.query(  # type: ignore[misc]
        "SELECT model_id, path FROM models WHERE session_id = ? AND generation = ? AND kind = 'merged' "
        "ORDER BY model_id", [session_id, generation],
    )[1]]


def merged_weights(archive: ArchiveReader, session_id: str) -> list[tuple[str, str]]:
    """(model id, path) of a session's merged models whose weights have not been deleted."""
    return [
        (m, p) for m, p in archive.query(
            "SELECT model_id, path FROM models WHERE session_id = ? AND kind = 'merged' "
            "AND weights_deleted_at IS NULL AND path IS NOT NULL ORDER BY model_id",
            [session_id],
        )[1]
    ]


def judged_children(archive: ArchiveReader, session_id: str, generation: int) -> list[str]:
    """A generation's children that were kept (not discarded) and judged."""
    return [row[0] for row in archive.query(
        "SELECT model_id FROM models WHERE session_id = ? AND generation = ? AND kind = 'merged' "
        "AND discarded_reason IS NULL AND model_id IN (SELECT model_id FROM evaluations) ORDER BY model_id",
        [session_id, generation],
    )[1]]


def model_names(archive: ArchiveReader, model_ids: list[str]) -> dict[str, str]:
    """model id -> its display name."""
    return dict(archive.query("SELECT model_id, name FROM models WHERE model_id IN (SELECT unnest(?))", [model_ids])[1])


# ----------------------------------------------------------------------------- population


def population(archive: ArchiveReader, session_id: str, generation: int) -> list[str]:
    """The model ids in the archive after `generation` (CycleQD: every grid's elites)."""
    return [row[0] for row in archive.query(
        "SELECT model_id FROM population_snapshots WHERE session_id = ? AND generation = ? "
        "GROUP BY model_id ORDER BY min(grid), min(slot), model_id", [session_id, generation],
    )[1]]


def best_elites(archive: ArchiveReader, session_id: str, generation: int) -> list[dict[str, Any]]:
    """The fittest model of each grid after `generation`: grid, model_id, fitness."""
    return archive.records(
        "SELECT grid, model_id, fitness FROM population_snapshots WHERE session_id = ? AND generation = ? "
        "QUALIFY row_number() OVER (PARTITION BY grid ORDER BY fitness DESC, model_id) = 1 ORDER BY grid",
        [session_id, generation],
    )


def active_families(archive: ArchiveReader, session_id: str) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(family row, its instances in task order) of every active task family of a session."""
    families = archive.records(
        "SELECT * FROM task_families WHERE session_id = ? AND status = 'active' ORDER BY family_id", [session_id]
    )
    instances: dict[str, list[dict[str, Any]]] = {f["family_id"]: [] for f in families}
    for family_id, instance in archive.query(
        "SELECT family_id, instance FROM tasks WHERE family_id IN (SELECT unnest(?)) ORDER BY family_id, task_id",
        [list(instances)],
    )[1]:
        instances[family_id].append(json.loads(instance))
    return [(f, instances[f["family_id"]]) for f in families]


def family_pass_rates(archive: ArchiveReader, model_ids: list[str], family_ids: list[str]) -> dict[str, float]:
    """Each family's mean score over the models' answers to its instances (0 when none)."""
    rates = dict.fromkeys(family_ids, 0.0)
    rows = archive.query(
        "SELECT t.family_id, avg(e.score) FROM evaluations e JOIN tasks t USING (task_id) "
        "WHERE e.model_id IN (SELECT unnest(?)) AND t.family_id IN (SELECT unnest(?)) GROUP BY 1",
        [model_ids, family_ids],
    )[1]
    rates.update({family: float(rate) for family, rate in rows})
    return rates


def best_scores(archive: ArchiveReader, model_ids: list[str], task_ids: list[str]) -> list[tuple[str, str, float]]:
    """(model, task, best score) of every evaluation of the models on the tasks."""
    return [tuple(row) for row in archive.query(  # type: ignore[misc]
        "SELECT model_id, task_id, max(score) FROM evaluations WHERE model_id IN (SELECT unnest(?)) "
        "AND task_id IN (SELECT unnest(?)) GROUP BY 1, 2", [model_ids, task_ids],
    )[1]]


def answers(archive: ArchiveReader, model_ids: list[str], task_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """answers[model_id][task_id]: the models' archived answers to the tasks."""
    out: dict[str, dict[str, str]] = {m: {} for m in model_ids}
    for model_id, task_id, answer in archive.query(
        "SELECT model_id, task_id, any_value(answer) FROM evaluations WHERE model_id IN (SELECT unnest(?)) "
        "AND task_id IN (SELECT unnest(?)) GROUP BY 1, 2", [model_ids, list(task_ids)],
    )[1]:
        out[model_id][task_id] = answer or ""
    return out


def generation_counts(archive: ArchiveReader, session_id: str, generation: int) -> dict[str, int]:
    """A generation's children (bred, ok, discarded) and task-pool changes (added, removed, rejected)."""
    return archive.records(
        """SELECT count(*) AS children, count(*) FILTER (WHERE r.verdict = 'ok') AS ok,
                  count(*) FILTER (WHERE m.discarded_reason IS NOT NULL) AS discarded,
                  (SELECT count(*) FROM task_families WHERE session_id = ?1 AND generation = ?2) AS added,
                  (SELECT count(*) FROM task_families WHERE session_id = ?1 AND removed_generation = ?2) AS removed,
                  (SELECT count(*) FROM task_rejections WHERE session_id = ?1 AND generation = ?2) AS rejected
           FROM algorithms a LEFT JOIN latest_runs r USING (algorithm_id) LEFT JOIN models m USING (algorithm_id)
           WHERE a.session_id = ?1 AND a.iteration = ?2""",
        [session_id, generation],
    )[0]


def generation_measured_at(archive: ArchiveReader, session_id: str, generation: int) -> datetime | None:
    """When a generation's metrics were stored (None before generation 0)."""
    value: datetime | None = archive.scalar(
        "SELECT max(created_at) FROM generation_metrics WHERE session_id = ? AND generation = ?",
        [session_id, generation],
    )
    return value


def generation_metrics(archive: ArchiveReader, session_id: str) -> list[dict[str, Any]]:
    """The `generation_metrics` rows of a session, in generation order."""
    return archive.records("SELECT * FROM generation_metrics WHERE session_id = ? ORDER BY generation", [session_id])


def merged_elites_score(archive: ArchiveReader, session_id: str) -> tuple[float | None, int]:
    """CycleQD's merged elites: (mean score, number of evaluations)."""
    row = archive.query(
        "SELECT avg(e.score), count(*) FROM evaluations e JOIN models m USING (model_id) "
        "WHERE m.session_id = ? AND m.name LIKE 'cycleqd-final%'", [session_id],
    )[1][0]
    return row[0], int(row[1])
