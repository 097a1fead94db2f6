-- Why a review item was queued (schemas/enrichment.py ReviewReason: below_threshold, text_conflict or
-- no_value_applies, with its numbers and words), shown on the review card. Items written before this column
-- keep NULL and the card falls back to the threshold line. Re-runnable.

ALTER TABLE review_queue ADD COLUMN IF NOT EXISTS reason jsonb;
