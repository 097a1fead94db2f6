-- Similar items: online neighbours of listings embedded since the last nightly version, and one view
-- that the "similar items" shelves read. Re-runnable (IF NOT EXISTS / OR REPLACE).

-- Byte-order ("C") comparison of listing ids in the neighbour table: the nightly job inserts ~1 M
-- rows into its primary key, and locale-aware text comparison made that 3× slower (C.UTF-8 and
-- en_US still go through strcoll). Ids are ASCII ([A-Za-z0-9._:-]), so the order is the same.
DO $$
BEGIN
    IF (SELECT collation_name FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = 'similar_items' AND column_name = 'listing_id')
       IS DISTINCT FROM 'C' THEN
        ALTER TABLE similar_items ALTER COLUMN listing_id TYPE text COLLATE "C";
    END IF;
END
$$;

-- When the nightly job read its embeddings: online rows computed after this are fresher than it.
ALTER TABLE similar_items_versions ADD COLUMN IF NOT EXISTS snapshot_at timestamptz;
CREATE INDEX IF NOT EXISTS similar_items_versions_model_idx ON similar_items_versions (model_version, status);

-- The online path searches embeddings created since the last snapshot exactly: find them by time.
CREATE INDEX IF NOT EXISTS embeddings_created_idx ON embeddings (model_version, created_at);

-- Top-K of a listing computed by the worker right after it embedded the listing.
CREATE TABLE IF NOT EXISTS similar_items_online (
    model_version  text NOT NULL,
    listing_id     text COLLATE "C" NOT NULL REFERENCES listings (listing_id) ON DELETE CASCADE,
    neighbour_ids  text[] NOT NULL,
    scores         real[] NOT NULL,
    computed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version, listing_id)
);

-- What a shelf shows for (model_version, listing_id): the online row when it is newer than the data
-- the active nightly version was computed from (or the listing is not in that version), else the
-- nightly row. One statement over this view sees one active version, whole.
CREATE OR REPLACE VIEW similar_items_current AS
SELECT a.model_version, s.listing_id, s.neighbour_ids, s.scores, 'nightly'::text AS source
  FROM similar_items_active a
  JOIN similar_items_versions v ON v.version = a.version
  JOIN similar_items s ON s.version = a.version
 WHERE NOT EXISTS (SELECT 1 FROM similar_items_online o
                    WHERE o.model_version = a.model_version AND o.listing_id = s.listing_id
                      AND o.computed_at > coalesce(v.snapshot_at, v.created_at))
UNION ALL
SELECT o.model_version, o.listing_id, o.neighbour_ids, o.scores, 'online'::text AS source
  FROM similar_items_online o
  LEFT JOIN similar_items_active a ON a.model_version = o.model_version
  LEFT JOIN similar_items_versions v ON v.version = a.version
 WHERE v.version IS NULL
    OR o.computed_at > coalesce(v.snapshot_at, v.created_at)
    OR NOT EXISTS (SELECT 1 FROM similar_items s WHERE s.version = a.version AND s.listing_id = o.listing_id);
