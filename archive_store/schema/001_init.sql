-- coevo archive, schema v1: one row per thing that happened in a session.
--
-- Ids are TEXT, deterministic and supplied by the writer (e.g. '<session>/it3/s07'), so a
-- resumed session re-derives the same ids and INSERT OR IGNORE makes replays harmless.
-- There are no FOREIGN KEY constraints on purpose: DuckDB checks them row by row (slow for
-- 50k-row evaluation batches) and forbids updating referenced rows, and a resumed session
-- may write children before their parents are re-confirmed. The relations are documented
-- per column instead and joined in 002_views.sql.
-- Timestamps are TIMESTAMP in UTC.

CREATE TABLE sessions (
    session_id   TEXT PRIMARY KEY,
    mode         TEXT NOT NULL,                       -- 'self_developing' | 'acdc' | 'cycleqd'
    seed         BIGINT NOT NULL,
    config_json  JSON NOT NULL,                       -- the validated session config
    started_at   TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    finished_at  TIMESTAMP,
    status       TEXT NOT NULL DEFAULT 'running'      -- 'running' | 'finished' | 'failed' | 'stopped'
);

-- Prompt texts are stored once; artifacts refer to them by hash.
CREATE TABLE prompts (
    prompt_hash  TEXT PRIMARY KEY,                    -- sha256(text) hex, first 16 chars
    role         TEXT NOT NULL,                       -- 'generator' | 'task_writer' | 'judge'
    name         TEXT NOT NULL,                       -- template name, e.g. 'generator.md'
    text         TEXT NOT NULL,
    created_at   TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);

CREATE TABLE generator_versions (
    session_id      TEXT NOT NULL,                    -- sessions.session_id
    version         INTEGER NOT NULL,                 -- 0 = the initial generator
    path            TEXT NOT NULL,                    -- weights / adapter directory or model name
    parent_version  INTEGER,
    dpo_run_id      TEXT,                             -- dpo_runs.dpo_run_id that produced it
    created_at      TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    PRIMARY KEY (session_id, version)
);

CREATE TABLE algorithms (
    algorithm_id       TEXT PRIMARY KEY,
    session_id         TEXT NOT NULL,
    iteration          INTEGER NOT NULL,
    sample_index       INTEGER NOT NULL,
    generator_version  INTEGER NOT NULL,
    prompt_hash        TEXT NOT NULL,                 -- prompts.prompt_hash
    temperature        DOUBLE NOT NULL,
    code               TEXT NOT NULL,
    code_hash          TEXT NOT NULL,
    normalized_hash    TEXT NOT NULL,                 -- hash of the normalised AST, used to dedupe
    duplicate_of       TEXT,                          -- algorithms.algorithm_id of the first copy
    policy_ok          BOOLEAN NOT NULL,
    policy_rule        TEXT,                          -- the static-policy rule that failed
    policy_reason      TEXT,
    exemplar_ids       TEXT[] NOT NULL DEFAULT [],    -- algorithms shown to the generator
    created_at         TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);

CREATE TABLE sandbox_runs (
    run_id          TEXT PRIMARY KEY,
    algorithm_id    TEXT NOT NULL,                    -- algorithms.algorithm_id
    runner          TEXT NOT NULL,                    -- 'docker' | 'process' | ...
    verdict         TEXT NOT NULL,                    -- 'ok' | 'timeout' | 'error' | 'invalid_output' | ...
    reason          TEXT,
    duration_s      DOUBLE,
    peak_memory_mb  DOUBLE,
    stdout          TEXT,
    stderr          TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);

CREATE TABLE models (
    model_id      TEXT PRIMARY KEY,
    session_id    TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('base', 'expert', 'baseline', 'merged')),
    name          TEXT NOT NULL,
    algorithm_id  TEXT,                               -- set for kind = 'merged'
    parent_ids    TEXT[] NOT NULL DEFAULT [],         -- models.model_id of the merged parents
    mutation      TEXT,                               -- e.g. 'svd' when a mutation was applied
    path          TEXT,
    created_at    TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);

CREATE TABLE tasks (
    task_id     TEXT PRIMARY KEY,
    skill       TEXT NOT NULL,
    split       TEXT NOT NULL CHECK (split IN ('dev', 'test')),
    prompt      TEXT NOT NULL,
    answer      TEXT,                                 -- reference answer (exact-match tasks)
    checker     TEXT,                                 -- generated checker code, sandbox only
    origin      TEXT NOT NULL,                        -- 'builtin' | 'task_writer' | ...
    created_at  TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);

CREATE TABLE evaluations (
    model_id    TEXT NOT NULL,                        -- models.model_id
    task_id     TEXT NOT NULL,                        -- tasks.task_id
    judge       TEXT NOT NULL,                        -- 'exact_match' | 'checker' | 'llm:<name>'
    answer      TEXT,                                 -- the model's answer
    score       DOUBLE NOT NULL,
    created_at  TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    PRIMARY KEY (model_id, task_id, judge)
);

CREATE TABLE preference_pairs (
    pair_id                TEXT PRIMARY KEY,
    session_id             TEXT NOT NULL,
    iteration              INTEGER NOT NULL,
    prompt_hash            TEXT NOT NULL,
    chosen_algorithm_id    TEXT NOT NULL,
    rejected_algorithm_id  TEXT NOT NULL,
    chosen_score           DOUBLE NOT NULL,
    rejected_score         DOUBLE NOT NULL,
    created_at             TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);

CREATE TABLE dpo_runs (
    dpo_run_id    TEXT PRIMARY KEY,
    session_id    TEXT NOT NULL,
    iteration     INTEGER NOT NULL,
    base_version  INTEGER NOT NULL,                   -- generator_versions.version trained from
    new_version   INTEGER NOT NULL,                   -- generator_versions.version produced
    num_pairs     INTEGER NOT NULL,
    config_json   JSON NOT NULL,
    final_loss    DOUBLE,
    duration_s    DOUBLE,
    created_at    TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);
