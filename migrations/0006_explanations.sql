-- Issue 24: a Grad-CAM heat map of a review item's top candidate (model/explain.py), stored by the worker
-- when ENRICH_EXPLAIN_REVIEW is on and shown by the console as the item's "why". One row per listing, tag
-- group and model version: a batch run again rewrites the row instead of adding one. `uri` is the PNG under
-- <data dir>/explanations. Re-runnable (IF NOT EXISTS).

CREATE TABLE IF NOT EXISTS explanations (
    listing_id     text NOT NULL REFERENCES listings (listing_id) ON DELETE CASCADE,
    tag_group      text NOT NULL,
    model_version  text NOT NULL,
    value          text NOT NULL,               -- the candidate explained (the review item's first)
    method         text NOT NULL DEFAULT 'grad-cam',
    uri            text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (listing_id, tag_group, model_version)
);
