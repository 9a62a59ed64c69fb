-- Named queries over the archive. `coevo sql "FROM leaderboard LIMIT 10"`.

-- One row per generated algorithm, with the outcome of its latest sandbox run and the mean
-- score of the merged model(s) it produced, on dev tasks and on test tasks.
-- `verdict` is the raw sandbox verdict (NULL when never run); `outcome` also says why a
-- program never ran: 'duplicate', 'rejected_by_policy', or 'not_run'.
CREATE OR REPLACE VIEW algorithm_scores AS
WITH latest_run AS (
    SELECT algorithm_id, run_id, verdict, duration_s, peak_memory_mb
    FROM sandbox_runs
    QUALIFY row_number() OVER (
        PARTITION BY algorithm_id ORDER BY created_at DESC, run_id DESC) = 1
),
merged_scores AS (
    SELECT m.algorithm_id,
           avg(e.score) FILTER (WHERE t.split = 'dev')  AS dev_score,
           avg(e.score) FILTER (WHERE t.split = 'test') AS test_score,
           count(*) FILTER (WHERE t.split = 'dev')      AS n_dev_evals,
           count(*) FILTER (WHERE t.split = 'test')     AS n_test_evals
    FROM models m
    JOIN evaluations e ON e.model_id = m.model_id
    JOIN tasks t ON t.task_id = e.task_id
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
LEFT JOIN latest_run r ON r.algorithm_id = a.algorithm_id
LEFT JOIN merged_scores s ON s.algorithm_id = a.algorithm_id
ORDER BY a.session_id, a.iteration, a.sample_index, a.algorithm_id;

-- Algorithms that have a dev score, best first; `rank` is within the session.
CREATE OR REPLACE VIEW leaderboard AS
SELECT rank() OVER (PARTITION BY session_id ORDER BY dev_score DESC) AS rank,
       algorithm_id,
       session_id,
       iteration,
       generator_version,
       dev_score,
       test_score,
       n_dev_evals,
       n_test_evals,
       code_hash
FROM algorithm_scores
WHERE dev_score IS NOT NULL
ORDER BY dev_score DESC, test_score DESC NULLS LAST, algorithm_id;

-- The Self-Developing curves: per session, iteration and generator version.
-- executable_rate = n_executable / n_programs (all generated programs, duplicates and
-- policy rejections included). Dev statistics are over algorithms with a dev score.
CREATE OR REPLACE VIEW iteration_stats AS
WITH ranked AS (
    SELECT *,
           row_number() OVER (
               PARTITION BY session_id, iteration, generator_version
               ORDER BY dev_score DESC NULLS LAST, algorithm_id) AS dev_rank
    FROM algorithm_scores
)
SELECT session_id,
       iteration,
       generator_version,
       count(*)                                   AS n_programs,
       count(*) FILTER (WHERE policy_ok)          AS n_policy_ok,
       count(*) FILTER (WHERE verdict = 'ok')     AS n_executable,
       count(*) FILTER (WHERE verdict = 'ok') / count(*) AS executable_rate,
       avg(dev_score)                             AS mean_dev,
       median(dev_score)                          AS median_dev,
       max(dev_score)                             AS max_dev,
       avg(dev_score) FILTER (WHERE dev_rank <= 3) AS top3_mean_dev
FROM ranked
GROUP BY session_id, iteration, generator_version
ORDER BY session_id, iteration, generator_version;

-- What happened to the generated programs, per iteration.
CREATE OR REPLACE VIEW verdict_breakdown AS
SELECT session_id, iteration, outcome AS verdict, count(*) AS n
FROM algorithm_scores
GROUP BY session_id, iteration, outcome
ORDER BY session_id, iteration, n DESC, verdict;
