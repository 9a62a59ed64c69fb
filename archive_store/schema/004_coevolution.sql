-- schema v4: population modes (AC/DC, CycleQD). Task families written by the task writer,
-- every rejected task with its reason, the population (or MAP-Elites grids) after each
-- generation, and the per-generation coverage metrics.

-- A task family: instructions + instances + checker code, written by the task writer
-- (procedural or an LLM). Each instance is one row of `tasks` (tasks.family_id). A family is
-- active from `generation` until `removed_generation` (exclusive), when the adaptation
-- removed or retired it.
CREATE TABLE IF NOT EXISTS task_families (
    family_id           TEXT PRIMARY KEY,
    session_id          TEXT NOT NULL,
    generation          INTEGER NOT NULL,            -- generation it became active
    name                TEXT NOT NULL,
    instructions        TEXT NOT NULL,
    checker             TEXT NOT NULL,               -- generated checker code (sandbox only)
    params              JSON NOT NULL,
    parent_id           TEXT,                        -- task_families.family_id it was derived from
    action              TEXT NOT NULL,               -- 'seed' | 'harder' | 'novel'
    origin              TEXT NOT NULL,               -- 'procedural' | 'llm:<backend>'
    prompt_hash         TEXT,                        -- prompts.prompt_hash (LLM writers)
    n_instances         INTEGER NOT NULL,
    status              TEXT NOT NULL DEFAULT 'active',   -- 'active' | 'removed'
    removed_generation  INTEGER,
    removed_reason      TEXT,
    created_at          TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);

ALTER TABLE tasks ADD COLUMN IF NOT EXISTS family_id TEXT;        -- task_families.family_id
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS instance JSON;         -- what the family's checker reads

-- Every candidate task the writer produced and the filters refused, with the reason.
CREATE TABLE IF NOT EXISTS task_rejections (
    rejection_id  TEXT PRIMARY KEY,
    session_id    TEXT NOT NULL,
    generation    INTEGER NOT NULL,
    parent_id     TEXT,                              -- task_families.family_id
    action        TEXT NOT NULL,                     -- 'seed' | 'harder' | 'novel'
    stage         TEXT NOT NULL,                     -- 'parse' | 'policy' | 'validation' | 'novelty'
    reason        TEXT NOT NULL,
    name          TEXT,
    instructions  TEXT,
    checker       TEXT,
    params        JSON,
    raw           TEXT,                              -- the LLM's reply, when there was one
    created_at    TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);

-- How a population child was bred: 'crossover' (the papers' normalised model-wise weights,
-- in `crossover_weights`) or 'algorithm:<algorithm_id>' (a generated merge algorithm), and
-- why a child was discarded before selection (the gibberish filter), if it was.
ALTER TABLE models ADD COLUMN IF NOT EXISTS operator TEXT;
ALTER TABLE models ADD COLUMN IF NOT EXISTS crossover_weights JSON;
ALTER TABLE models ADD COLUMN IF NOT EXISTS discarded_reason TEXT;

-- The archive of models after each generation: AC/DC's population (with each member's
-- Dominated-Novelty score) or CycleQD's MAP-Elites cells (one row per occupied cell per grid).
CREATE TABLE IF NOT EXISTS population_snapshots (
    session_id  TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    grid        TEXT NOT NULL,                      -- 'population' (AC/DC) | the grid's quality task (CycleQD)
    slot        TEXT NOT NULL,                      -- rank (AC/DC) or the cell's bins joined by ',' (CycleQD)
    model_id    TEXT NOT NULL,
    fitness     DOUBLE,                             -- AC/DC: difficulty-weighted solve share; CycleQD: quality
    novelty     DOUBLE,                             -- AC/DC: the DNS competition score (NULL = infinite)
    skills      JSON NOT NULL,                      -- skill vector: task family (AC/DC) or skill (CycleQD) -> score
    PRIMARY KEY (session_id, generation, grid, slot)
);

-- Graph steps whose writes committed (population modes): a step found here is not redone on
-- resume, even when the session was killed between the commit and LangGraph's checkpoint.
CREATE TABLE IF NOT EXISTS graph_steps (
    session_id    TEXT NOT NULL,
    generation    INTEGER NOT NULL,
    step          TEXT NOT NULL,
    committed_at  TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    PRIMARY KEY (session_id, generation, step)
);

-- Per-generation metrics of a population session, as printed live.
CREATE TABLE IF NOT EXISTS generation_metrics (
    session_id         TEXT NOT NULL,
    generation         INTEGER NOT NULL,
    n_tasks            INTEGER NOT NULL,            -- active task instances
    n_families         INTEGER NOT NULL,
    n_models           INTEGER NOT NULL,            -- archive size after selection
    population_coverage DOUBLE NOT NULL,            -- tasks any archive member solves
    team_size          INTEGER NOT NULL,
    team               JSON NOT NULL,               -- greedy team (model ids), best first
    team_coverage      DOUBLE NOT NULL,
    coverage_curve     JSON NOT NULL,               -- coverage of the greedy team of N = 1, 2, ...
    best_of_n          DOUBLE NOT NULL,             -- score of the answer the judge picks among the team's
    children           INTEGER NOT NULL,
    children_ok        INTEGER NOT NULL,            -- executed in the sandbox with verdict ok
    children_discarded INTEGER NOT NULL,            -- by the gibberish filter
    tasks_added        INTEGER NOT NULL,
    tasks_removed      INTEGER NOT NULL,
    tasks_rejected     INTEGER NOT NULL,
    duration_s         DOUBLE,
    created_at         TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    PRIMARY KEY (session_id, generation)
);

-- Running totals per (model, task family), kept by the writer with the other summaries
-- (`Archive.add_evaluations`), so skill vectors need not scan every evaluation.
CREATE TABLE IF NOT EXISTS model_family_scores (
    model_id   TEXT NOT NULL,                 -- models.model_id
    family_id  TEXT NOT NULL,                 -- task_families.family_id
    judge      TEXT NOT NULL,
    n_tasks    BIGINT NOT NULL,
    sum_score  DOUBLE NOT NULL,
    n_solved   BIGINT NOT NULL,
    PRIMARY KEY (model_id, family_id, judge)
);

-- Each model's skill vector: its pass rate per task family (instances solved / judged).
CREATE OR REPLACE VIEW skill_vectors AS
SELECT s.model_id,
       m.session_id,
       m.generation,
       s.family_id,
       f.name                                       AS family,
       s.judge,
       s.n_tasks                                    AS n_instances,
       s.n_solved,
       s.sum_score / s.n_tasks                      AS pass_rate
FROM model_family_scores s
JOIN task_families f ON f.family_id = s.family_id
JOIN models m ON m.model_id = s.model_id
ORDER BY s.model_id, s.family_id;

-- The task pool's history: every family with how it came and went, and what the population
-- made of it (pass rate over every evaluation of its instances).
CREATE OR REPLACE VIEW task_pool AS
SELECT f.session_id,
       f.family_id,
       f.name,
       f.action,
       f.parent_id,
       f.origin,
       f.generation                                 AS added_generation,
       f.removed_generation,
       f.status,
       f.removed_reason,
       f.n_instances,
       sum(s.sum_score) / nullif(sum(s.n_models), 0) AS pass_rate
FROM task_families f
LEFT JOIN tasks t ON t.family_id = f.family_id
LEFT JOIN task_scores s ON s.task_id = t.task_id
GROUP BY ALL
ORDER BY f.session_id, f.generation, f.family_id;
