-- schema v7: prompt templates are editable while a session runs (`coevo serve`, or a file in
-- the workdir's prompts/ dir); a session reads the generator's template again before each
-- iteration. `template_hash` is the hash of the template an algorithm's prompt was rendered
-- from (`prompt_hash` stays the hash of the rendered prompt, exemplars included), so each
-- template version can be tied to what it produced.
ALTER TABLE algorithms ADD COLUMN IF NOT EXISTS template_hash TEXT;    -- prompts.prompt_hash

-- Every template version a session used: where it was used first and last, and what it
-- produced (generated algorithms for the generator's template, task families for the task
-- writer's).
CREATE OR REPLACE VIEW prompt_versions AS
WITH used AS (
    SELECT template_hash AS prompt_hash, session_id, count(*) AS n_artifacts,
           min(created_at) AS first_used, max(created_at) AS last_used
    FROM algorithms WHERE template_hash IS NOT NULL GROUP BY ALL
    UNION ALL
    SELECT prompt_hash, session_id, count(*), min(created_at), max(created_at)
    FROM task_families WHERE prompt_hash IS NOT NULL GROUP BY ALL
)
SELECT p.name,
       p.role,
       p.prompt_hash,
       p.created_at                            AS recorded_at,
       min(u.first_used)                       AS first_used,
       max(u.last_used)                        AS last_used,
       coalesce(sum(u.n_artifacts), 0)         AS n_artifacts,
       list(DISTINCT u.session_id) FILTER (WHERE u.session_id IS NOT NULL) AS sessions
FROM prompts p
LEFT JOIN used u ON u.prompt_hash = p.prompt_hash
WHERE p.role NOT IN ('generator', 'operator')   -- rendered prompts and operator listings, not templates
GROUP BY p.name, p.role, p.prompt_hash, p.created_at
ORDER BY p.name, p.created_at;
