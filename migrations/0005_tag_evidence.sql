-- Issue 23: a predicted tag the listing's text contributed to keeps its evidence (matched words, the
-- value's probability before and after fusion; schemas.enrichment.TagEvidence). NULL: the image alone,
-- a seller or a corrected tag. Re-runnable (IF NOT EXISTS).

ALTER TABLE listing_tags ADD COLUMN IF NOT EXISTS evidence jsonb;
