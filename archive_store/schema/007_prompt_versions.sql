-- schema v7: prompt templates are editable while a session runs (`coevo serve`, or a file in
-- the workdir's prompts/ dir); a session reads its templates again before each iteration
-- (Self-Developing) or generation (population modes).
--
-- `algorithms.template_hash` is the hash of the template an algorithm's prompt was rendered
-- from (`prompt_hash` stays the hash of the rendered prompt, exemplars included).
ALTER TABLE algorithms ADD COLUMN IF NOT EXISTS template_hash TEXT;    -- prompts.prompt_hash

-- Which version of each template every iteration / generation used: the link from a template
-- version to what it produced, for roles whose artifacts carry no hash of their own (the
-- judge's scores, the gibberish filter's discards, best-of-N picks).
CREATE TABLE IF NOT EXISTS prompt_uses (
    session_id   TEXT NOT NULL,
    generation   INTEGER NOT NULL,                 -- the iteration (selfdev) or generation
    name         TEXT NOT NULL,                    -- template name, e.g. 'judge'
    prompt_hash  TEXT NOT NULL,                    -- prompts.prompt_hash
    created_at   TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    PRIMARY KEY (session_id, generation, name)
);

-- Every template version: the iterations / generations that used it, when, and what it
-- produced (generated algorithms for the generator's template, task families for the task
-- writer's; the judge's templates produce scores, counted by `n_steps`).
CREATE OR REPLACE VIEW prompt_versions AS
WITH uses AS (
    SELECT prompt_hash, count(*) AS n_steps, min(created_at) AS first_used, max(created_at) AS last_used,
           list(DISTINCT session_id ORDER BY session_id) AS sessions
    FROM prompt_uses GROUP BY prompt_hash
),
artifacts AS (
    SELECT prompt_hash, sum(n) AS n_artifacts FROM (
        SELECT template_hash AS prompt_hash, count(*) AS n FROM algorithms WHERE template_hash IS NOT NULL GROUP BY ALL
        UNION ALL
        SELECT prompt_hash, count(*) FROM task_families WHERE prompt_hash IS NOT NULL GROUP BY ALL
    ) GROUP BY prompt_hash
)
SELECT p.name,
       p.role,
       p.prompt_hash,
       p.created_at                  AS recorded_at,
       u.first_used,
       u.last_used,
       coalesce(u.n_steps, 0)        AS n_steps,
       coalesce(a.n_artifacts, 0)    AS n_artifacts,
       coalesce(u.sessions, [])      AS sessions
FROM prompts p
LEFT JOIN uses u ON u.prompt_hash = p.prompt_hash
LEFT JOIN artifacts a ON a.prompt_hash = p.prompt_hash
WHERE p.role NOT IN ('generator', 'operator')   -- rendered prompts and operator listings, not templates
ORDER BY p.name, p.created_at;
