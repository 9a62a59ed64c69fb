-- schema v6: human verdicts on generated algorithms. A verdict is never overwritten: a new one
-- is a new row, and an algorithm's verdict is its latest row (`latest_reviews`). Approve and
-- reject become preference pairs of the next DPO update (preference_pairs.source = 'human');
-- a quarantined algorithm is never shown to the generator, used as a crossover operator, or
-- counted in a report's top-k.
CREATE TABLE IF NOT EXISTS reviews (
    review_id     TEXT PRIMARY KEY,
    algorithm_id  TEXT NOT NULL,                     -- algorithms.algorithm_id
    verdict       TEXT NOT NULL CHECK (verdict IN ('approve', 'reject', 'quarantine')),
    note          TEXT NOT NULL DEFAULT '',
    reviewer      TEXT NOT NULL,                     -- the OS user who gave it
    created_at    TIMESTAMP NOT NULL
);

CREATE OR REPLACE VIEW latest_reviews AS
SELECT algorithm_id, verdict, note, reviewer, created_at, review_id
FROM reviews
QUALIFY row_number() OVER (PARTITION BY algorithm_id ORDER BY created_at DESC, review_id DESC) = 1;

ALTER TABLE preference_pairs ADD COLUMN IF NOT EXISTS source TEXT DEFAULT 'scores';  -- 'scores' | 'human'
