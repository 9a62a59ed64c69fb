"""Running totals the archive keeps next to its big tables, so the views stay fast.

The summary tables (`model_scores`, `task_scores`, `generation_task_scores`,
`model_family_scores`, `latest_runs`) are derived from `evaluations` and `sandbox_runs`: the
writer adds each batch's rows to them in the same transaction (`ADD_EVALUATIONS`, `ADD_RUNS`),
recounts what a partly replayed batch touches (`RECOUNT`), and `refill` rebuilds them after an
import, a merge or a migration. They are never exported.
"""

from __future__ import annotations

import duckdb

SUMMARY_TABLES = ("model_scores", "task_scores", "generation_task_scores", "model_family_scores", "latest_runs")
# Adds the sandbox runs in the registered relation `{new}` to `latest_runs`.
ADD_RUNS = """
INSERT INTO latest_runs
SELECT algorithm_id,
       arg_max(run_id, (created_at, run_id)), arg_max(verdict, (created_at, run_id)),
       arg_max(duration_s, (created_at, run_id)), arg_max(peak_memory_mb, (created_at, run_id)),
       max(created_at)
FROM {new}
GROUP BY algorithm_id
ON CONFLICT (algorithm_id) DO UPDATE SET
    run_id = excluded.run_id, verdict = excluded.verdict, duration_s = excluded.duration_s,
    peak_memory_mb = excluded.peak_memory_mb, created_at = excluded.created_at
WHERE excluded.created_at > latest_runs.created_at
   OR (excluded.created_at = latest_runs.created_at AND excluded.run_id >= latest_runs.run_id);
"""
# Recounts the evaluation summaries of the models, tasks and generations that the registered
# batch `{batch}` touches, from all their evaluations (after a partly replayed batch).
RECOUNT = """
CREATE OR REPLACE TEMP TABLE _touched AS
SELECT DISTINCT e.model_id, e.task_id, e.judge FROM {batch} e;
CREATE OR REPLACE TEMP TABLE _touched_generations AS
SELECT DISTINCT m.session_id, m.generation
FROM _touched t JOIN models m ON m.model_id = t.model_id
WHERE m.generation IS NOT NULL;
DELETE FROM model_scores WHERE model_id IN (SELECT model_id FROM _touched);
DELETE FROM model_family_scores WHERE model_id IN (SELECT model_id FROM _touched);
DELETE FROM task_scores WHERE task_id IN (SELECT task_id FROM _touched);
DELETE FROM generation_task_scores g USING _touched_generations t
WHERE g.session_id = t.session_id AND g.generation = t.generation;
INSERT INTO model_scores
SELECT e.model_id, t.split, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM evaluations e JOIN tasks t ON t.task_id = e.task_id
WHERE e.model_id IN (SELECT model_id FROM _touched)
GROUP BY ALL;
INSERT INTO task_scores
SELECT e.task_id, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM evaluations e
WHERE e.task_id IN (SELECT task_id FROM _touched)
GROUP BY ALL;
INSERT INTO model_family_scores
SELECT e.model_id, t.family_id, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM evaluations e JOIN tasks t ON t.task_id = e.task_id
WHERE e.model_id IN (SELECT model_id FROM _touched) AND t.family_id IS NOT NULL
GROUP BY ALL;
INSERT INTO generation_task_scores
SELECT m.session_id, m.generation, e.task_id, e.judge, count(*), max(e.score)
FROM evaluations e JOIN models m ON m.model_id = e.model_id
JOIN _touched_generations t ON t.session_id = m.session_id AND t.generation = m.generation
GROUP BY ALL;
DROP TABLE _touched;
DROP TABLE _touched_generations;
"""
# Adds the evaluations in the registered relation `{new}` to the summary tables.
ADD_EVALUATIONS = """
INSERT INTO model_scores
SELECT e.model_id, t.split, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM {new} e JOIN tasks t ON t.task_id = e.task_id
GROUP BY ALL
ON CONFLICT (model_id, split, judge) DO UPDATE SET
    n_tasks = model_scores.n_tasks + excluded.n_tasks,
    sum_score = model_scores.sum_score + excluded.sum_score,
    n_solved = model_scores.n_solved + excluded.n_solved;
INSERT INTO task_scores
SELECT e.task_id, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM {new} e
GROUP BY ALL
ON CONFLICT (task_id, judge) DO UPDATE SET
    n_models = task_scores.n_models + excluded.n_models,
    sum_score = task_scores.sum_score + excluded.sum_score,
    n_solved = task_scores.n_solved + excluded.n_solved;
INSERT INTO generation_task_scores
SELECT m.session_id, m.generation, e.task_id, e.judge, count(*), max(e.score)
FROM {new} e JOIN models m ON m.model_id = e.model_id
WHERE m.generation IS NOT NULL
GROUP BY ALL
ON CONFLICT (session_id, generation, task_id, judge) DO UPDATE SET
    n_models = generation_task_scores.n_models + excluded.n_models,
    best_score = greatest(generation_task_scores.best_score, excluded.best_score);
INSERT INTO model_family_scores
SELECT e.model_id, t.family_id, e.judge, count(*), sum(e.score), count(*) FILTER (WHERE e.score >= 1)
FROM {new} e JOIN tasks t ON t.task_id = e.task_id
WHERE t.family_id IS NOT NULL
GROUP BY ALL
ON CONFLICT (model_id, family_id, judge) DO UPDATE SET
    n_tasks = model_family_scores.n_tasks + excluded.n_tasks,
    sum_score = model_family_scores.sum_score + excluded.sum_score,
    n_solved = model_family_scores.n_solved + excluded.n_solved;
"""


def refill(con: duckdb.DuckDBPyConnection) -> None:
    """Recompute every summary table from `evaluations` and `sandbox_runs`."""
    for table in SUMMARY_TABLES:
        con.execute(f"DELETE FROM {table}")
    con.execute(ADD_EVALUATIONS.format(new="evaluations"))
    con.execute(ADD_RUNS.format(new="sandbox_runs"))
