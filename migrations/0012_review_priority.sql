-- The review order (ENRICH_REVIEW_ORDER=gain): each open item's expected gain of asking it (worker/review_order.py),
-- written as the item's uncertainty when it is queued and re-ranked by `enrich review-order` / beat. NULL (items
-- queued before this column) sorts last until the next ranking. The index serves the console's pick of the next
-- open item in that order (the FIFO order keeps review_queue_todo_idx of 0010). Re-runnable.

ALTER TABLE review_queue ADD COLUMN IF NOT EXISTS priority real;
CREATE INDEX IF NOT EXISTS review_queue_gain_idx ON review_queue (priority DESC NULLS LAST, created_at, id)
    WHERE resolved_at IS NULL AND flagged_at IS NULL;
