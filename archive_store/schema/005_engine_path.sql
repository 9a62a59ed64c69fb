-- schema v5: generator versions trained with LoRA DPO are adapters over the start weights.
-- A version's `path` stays its own directory (a model dir, or an adapter dir); `weights` is
-- the model dir it runs on, `adapter_path` the PEFT adapter (NULL for a full model), and
-- `served_name` the name it is sampled under (the served model or the adapter's name on an
-- OpenAI-compatible server or an in-process vLLM engine; NULL for an in-process model dir).
ALTER TABLE generator_versions ADD COLUMN IF NOT EXISTS weights TEXT;
ALTER TABLE generator_versions ADD COLUMN IF NOT EXISTS adapter_path TEXT;
ALTER TABLE generator_versions ADD COLUMN IF NOT EXISTS served_name TEXT;
UPDATE generator_versions SET weights = path WHERE weights IS NULL;

-- Merged weights that exist only to be judged (judge.scratch_dir, e.g. /dev/shm) are deleted
-- after judging unless they rank in the report's top-k (then moved into the workdir and
-- `path` updated): `weights_deleted_at` says when a model's weights were deleted.
ALTER TABLE models ADD COLUMN IF NOT EXISTS weights_deleted_at TIMESTAMP;
