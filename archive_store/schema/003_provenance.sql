-- schema v3: provenance links that v2 left implicit, and the views the README documents.

-- Every preference pair names the DPO run that trained on it (v2 archives: matched by
-- session and iteration, the only way a v2 session ever paired them).
ALTER TABLE preference_pairs ADD COLUMN IF NOT EXISTS dpo_run_id TEXT;     -- dpo_runs.dpo_run_id
UPDATE preference_pairs SET dpo_run_id = d.dpo_run_id
FROM dpo_runs d
WHERE d.session_id = preference_pairs.session_id AND d.iteration = preference_pairs.iteration;

-- The population generation a model belongs to (Self-Developing: its algorithm's iteration;
-- NULL for the base, the experts and the baselines).
ALTER TABLE models ADD COLUMN IF NOT EXISTS generation INTEGER;
UPDATE models SET generation = a.iteration
FROM algorithms a
WHERE a.algorithm_id = models.algorithm_id;

-- Running totals the writer keeps in the same transaction as the evaluations they count
-- (`Archive.add_evaluations`; rebuilt whole after an import or a merge), so the views read
-- one row per model, task or (generation, task) instead of every evaluation.
CREATE TABLE IF NOT EXISTS model_scores (
    model_id   TEXT NOT NULL,                 -- models.model_id
    split      TEXT NOT NULL,                 -- tasks.split
    judge      TEXT NOT NULL,
    n_tasks    BIGINT NOT NULL,
    sum_score  DOUBLE NOT NULL,
    n_solved   BIGINT NOT NULL,               -- score >= 1
    PRIMARY KEY (model_id, split, judge)
);

CREATE TABLE IF NOT EXISTS task_scores (
    task_id    TEXT NOT NULL,                 -- tasks.task_id
    judge      TEXT NOT NULL,
    n_models   BIGINT NOT NULL,
    sum_score  DOUBLE NOT NULL,
    n_solved   BIGINT NOT NULL,
    PRIMARY KEY (task_id, judge)
);

CREATE TABLE IF NOT EXISTS generation_task_scores (
    session_id  TEXT NOT NULL,
    generation  INTEGER NOT NULL,             -- models.generation
    task_id     TEXT NOT NULL,
    judge       TEXT NOT NULL,
    n_models    BIGINT NOT NULL,
    best_score  DOUBLE NOT NULL,
    PRIMARY KEY (session_id, generation, task_id, judge)
);

CREATE TABLE IF NOT EXISTS latest_runs (     -- each algorithm's latest sandbox run
    algorithm_id    TEXT PRIMARY KEY,
    run_id          TEXT NOT NULL,
    verdict         TEXT NOT NULL,
    duration_s      DOUBLE,
    peak_memory_mb  DOUBLE,
    created_at      TIMESTAMP NOT NULL
);

-- Where every model came from: one row per (model, ancestor) with the distance between them
-- (1 = a parent), the algorithm that made the model and the mutation applied.
CREATE OR REPLACE VIEW lineage AS
WITH RECURSIVE edges AS (
    SELECT model_id AS child_id, unnest(parent_ids) AS parent_id FROM models
),
walk (model_id, ancestor_id, depth) AS (
    SELECT child_id, parent_id, 1 FROM edges
    UNION ALL
    SELECT w.model_id, e.parent_id, w.depth + 1
    FROM walk w JOIN edges e ON e.child_id = w.ancestor_id
    WHERE w.depth < 64
)
SELECT m.session_id,
       w.model_id,
       m.kind,
       m.name,
       m.generation,
       m.algorithm_id,
       m.mutation,
       m.path,
       w.depth,
       w.ancestor_id,
       p.kind AS ancestor_kind,
       p.name AS ancestor_name
FROM walk w
JOIN models m ON m.model_id = w.model_id
LEFT JOIN models p ON p.model_id = w.ancestor_id
ORDER BY m.session_id, w.model_id, w.depth, w.ancestor_id;

-- How hard each task is: how many models were judged on it, the mean score (the pass rate
-- for exact-match tasks) and how many solved it (score 1).
CREATE OR REPLACE VIEW task_stats AS
SELECT t.task_id,
       t.skill,
       t.split,
       t.origin,
       s.judge,
       s.n_models,
       s.sum_score / s.n_models AS pass_rate,
       s.n_solved
FROM task_scores s
JOIN tasks t ON t.task_id = s.task_id
ORDER BY pass_rate, t.task_id;

-- Coverage per generation: a task is covered when any model of that generation solves it.
-- Denominator: the tasks any model of the generation was judged on (per split).
CREATE OR REPLACE VIEW coverage AS
SELECT g.session_id,
       g.generation,
       t.split,
       max(g.n_models)                                          AS n_evaluations_per_task,
       count(*)                                                 AS n_tasks,
       count(*) FILTER (WHERE g.best_score >= 1)                AS n_covered,
       count(*) FILTER (WHERE g.best_score >= 1) / count(*)     AS coverage
FROM generation_task_scores g
JOIN tasks t ON t.task_id = g.task_id
GROUP BY g.session_id, g.generation, t.split
ORDER BY g.session_id, g.generation, t.split;

-- Every DPO update: the pairs it used, the generator version it produced, and the mean dev
-- score of the programs written by the version it started from and by the one it produced.
CREATE OR REPLACE VIEW dpo_history AS
WITH pairs AS (
    SELECT dpo_run_id,
           count(*)                                               AS n_pairs,
           avg(chosen_score)                                      AS mean_chosen,
           avg(rejected_score) FILTER (WHERE NOT isnan(rejected_score)) AS mean_rejected
    FROM preference_pairs
    GROUP BY dpo_run_id
),
by_version AS (
    SELECT session_id, generator_version, avg(dev_score) AS mean_dev, count(*) AS n_programs
    FROM algorithm_scores
    GROUP BY session_id, generator_version
)
SELECT d.session_id,
       d.iteration,
       d.dpo_run_id,
       d.base_version,
       d.new_version,
       g.path            AS new_generator_path,
       d.num_pairs,
       p.n_pairs         AS n_pairs_archived,
       p.mean_chosen,
       p.mean_rejected,
       d.final_loss,
       d.duration_s,
       b.mean_dev        AS mean_dev_before,
       a.mean_dev        AS mean_dev_after,
       a.n_programs      AS n_programs_after
FROM dpo_runs d
LEFT JOIN pairs p ON p.dpo_run_id = d.dpo_run_id
LEFT JOIN generator_versions g ON g.session_id = d.session_id AND g.version = d.new_version
LEFT JOIN by_version b ON b.session_id = d.session_id AND b.generator_version = d.base_version
LEFT JOIN by_version a ON a.session_id = d.session_id AND a.generator_version = d.new_version
ORDER BY d.session_id, d.iteration;

-- v2's algorithm_scores, reading the running totals instead of every run and evaluation.
CREATE OR REPLACE VIEW algorithm_scores AS
WITH merged_scores AS (
    SELECT m.algorithm_id,
           sum(s.sum_score) FILTER (WHERE s.split = 'dev') / sum(s.n_tasks) FILTER (WHERE s.split = 'dev')   AS dev_score,
           sum(s.sum_score) FILTER (WHERE s.split = 'test') / sum(s.n_tasks) FILTER (WHERE s.split = 'test') AS test_score,
           coalesce(sum(s.n_tasks) FILTER (WHERE s.split = 'dev'), 0)  AS n_dev_evals,
           coalesce(sum(s.n_tasks) FILTER (WHERE s.split = 'test'), 0) AS n_test_evals
    FROM models m
    JOIN model_scores s ON s.model_id = m.model_id
    WHERE m.kind = 'merged' AND m.algorithm_id IS NOT NULL
    GROUP BY m.algorithm_id
)
SELECT a.algorithm_id,
       a.session_id,
       a.iteration,
       a.sample_index,
       a.generator_version,
       a.prompt_hash,
       a.temperature,
       a.code_hash,
       a.normalized_hash,
       a.duplicate_of,
       a.policy_ok,
       a.policy_rule,
       r.run_id,
       r.verdict,
       CASE
           WHEN a.duplicate_of IS NOT NULL THEN 'duplicate'
           WHEN NOT a.policy_ok THEN 'rejected_by_policy'
           WHEN r.verdict IS NULL THEN 'not_run'
           ELSE r.verdict
       END AS outcome,
       r.duration_s,
       r.peak_memory_mb,
       s.dev_score,
       s.test_score,
       coalesce(s.n_dev_evals, 0)  AS n_dev_evals,
       coalesce(s.n_test_evals, 0) AS n_test_evals
FROM algorithms a
LEFT JOIN latest_runs r ON r.algorithm_id = a.algorithm_id
LEFT JOIN merged_scores s ON s.algorithm_id = a.algorithm_id;
-- (unordered since v3: sorting a million rows costs more than the view; add ORDER BY)

-- v2's iteration_stats without a window over every program: the top-3 mean comes from the
-- programs that have a dev score only.
CREATE OR REPLACE VIEW iteration_stats AS
WITH counts AS (
    SELECT session_id, iteration, generator_version,
           count(*)                                   AS n_programs,
           count(*) FILTER (WHERE policy_ok)          AS n_policy_ok,
           count(*) FILTER (WHERE verdict = 'ok')     AS n_executable,
           avg(dev_score)                             AS mean_dev,
           median(dev_score)                          AS median_dev,
           max(dev_score)                             AS max_dev,
           max(dev_score, 3)                          AS top3
    FROM algorithm_scores
    GROUP BY session_id, iteration, generator_version
)
SELECT session_id,
       iteration,
       generator_version,
       n_programs,
       n_policy_ok,
       n_executable,
       n_executable / n_programs                  AS executable_rate,
       mean_dev,
       median_dev,
       max_dev,
       list_avg(top3)                             AS top3_mean_dev
FROM counts
ORDER BY session_id, iteration, generator_version;
