-- A lifecycle an operator can trust: which model wrote a listing, workers by role, job heartbeats and
-- cancellation, beat's liveness, un-rejecting a candidate. Re-runnable.

-- The model version whose output a listing carries now (its predicted tags, review items, embedding).
-- A backfill's to-do after a promotion or a rollback is "enriched by another version".
ALTER TABLE listings ADD COLUMN IF NOT EXISTS enriched_by text;
UPDATE listings l SET enriched_by = coalesce(
        (SELECT t.model_version FROM listing_tags t
          WHERE t.listing_id = l.listing_id AND t.source = 'predicted' ORDER BY t.updated_at DESC LIMIT 1),
        (SELECT e.model_version FROM embeddings e
          WHERE e.listing_id = l.listing_id ORDER BY e.created_at DESC LIMIT 1))
 WHERE l.enriched_by IS NULL AND l.status = 'enriched';

-- Which queues a worker process consumes: the console and health tell gpu, cpu and train workers apart.
ALTER TABLE worker_status ADD COLUMN IF NOT EXISTS queues text;

-- A running training job proves it is alive; an admin can cancel a queued or running one.
ALTER TABLE training_jobs ADD COLUMN IF NOT EXISTS heartbeat_at timestamptz;
ALTER TABLE training_jobs ADD COLUMN IF NOT EXISTS cancel_requested_by text;
ALTER TABLE training_jobs DROP CONSTRAINT IF EXISTS training_jobs_status_check;
ALTER TABLE training_jobs ADD CONSTRAINT training_jobs_status_check
    CHECK (status IN ('queued', 'running', 'done', 'failed', 'skipped', 'cancelled'));

-- Liveness of processes that do no request work of their own (beat): the last time each was seen.
CREATE TABLE IF NOT EXISTS heartbeats (
    name           text PRIMARY KEY,
    seen_at        timestamptz NOT NULL DEFAULT now(),
    details        jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- Two more moves recorded like every other: an admin puts a rejected candidate back ('unreject'); the
-- gate's verdict on a candidate it neither promoted nor rejected ('gate': two models not comparable, or a
-- retraining job's candidate that passed and waits for an admin).
ALTER TABLE model_events DROP CONSTRAINT IF EXISTS model_events_action_check;
ALTER TABLE model_events ADD CONSTRAINT model_events_action_check
    CHECK (action IN ('register', 'promote', 'rollback', 'reject', 'unreject', 'shadow', 'unshadow', 'gate'));
