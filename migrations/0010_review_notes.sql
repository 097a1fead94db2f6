-- Review items a reviewer was unsure about: their comment, and the item leaves the reviewers' queue until an
-- admin resolves it. Indexes for what the review page counts on every view: the open items not waiting for an
-- admin (index-only count), the leased ones (few; renewing a lease changes only lease_until, which stays out
-- of every index so that update remains HOT) and today's resolved ones. Re-runnable.

ALTER TABLE review_queue ADD COLUMN IF NOT EXISTS flagged_by text;
ALTER TABLE review_queue ADD COLUMN IF NOT EXISTS flag_note text;
ALTER TABLE review_queue ADD COLUMN IF NOT EXISTS flagged_at timestamptz;
CREATE INDEX IF NOT EXISTS review_queue_flagged_idx ON review_queue (flagged_at, id)
    WHERE resolved_at IS NULL AND flagged_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS review_queue_todo_idx ON review_queue (created_at, id)
    WHERE resolved_at IS NULL AND flagged_at IS NULL;
CREATE INDEX IF NOT EXISTS review_queue_leased_idx ON review_queue (leased_by)
    WHERE resolved_at IS NULL AND leased_by IS NOT NULL;
CREATE INDEX IF NOT EXISTS review_queue_resolved_idx ON review_queue (resolved_at) WHERE resolved_at IS NOT NULL;
