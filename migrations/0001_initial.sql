-- Initial schema. Forward-only; every statement is re-runnable (IF NOT EXISTS).

CREATE TABLE IF NOT EXISTS listings (
    listing_id     text PRIMARY KEY,
    seller_id      text NOT NULL,
    event          jsonb NOT NULL,              -- the raw, validated ListingEvent
    content_hash   text NOT NULL,               -- sha256 of the canonical event: an edit changes it
    status         text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'enriched', 'failed', 'deleted')),
    enriched_hash  text,                        -- content_hash the current enrichment was made from
    error          text,
    received_at    timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS listings_status_idx ON listings (status);

-- One current value per listing and group ('category', 'type' or an attribute group).
CREATE TABLE IF NOT EXISTS listing_tags (
    listing_id     text NOT NULL REFERENCES listings (listing_id) ON DELETE CASCADE,
    tag_group      text NOT NULL,
    value          text NOT NULL,
    source         text NOT NULL CHECK (source IN ('seller', 'predicted', 'corrected')),
    confidence     real CHECK (confidence IS NULL OR (confidence >= 0 AND confidence <= 1)),
    model_version  text,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (listing_id, tag_group),
    CHECK (source <> 'predicted' OR (confidence IS NOT NULL AND model_version IS NOT NULL))
);

-- Raw little-endian float32 bytes: portable with or without pgvector and the fastest to read
-- back in bulk (faiss does the searching, not Postgres).
CREATE TABLE IF NOT EXISTS embeddings (
    listing_id     text NOT NULL REFERENCES listings (listing_id) ON DELETE CASCADE,
    model_version  text NOT NULL,
    dim            integer NOT NULL CHECK (dim > 0),
    vector         bytea NOT NULL CHECK (length(vector) = 4 * dim),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version, listing_id)
);

-- Versioned nightly neighbours. Readers join through similar_items_active, switched atomically.
CREATE TABLE IF NOT EXISTS similar_items_versions (
    version        bigserial PRIMARY KEY,
    model_version  text NOT NULL,
    status         text NOT NULL DEFAULT 'building' CHECK (status IN ('building', 'ready', 'retired', 'failed')),
    k              integer NOT NULL,
    params         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
CREATE TABLE IF NOT EXISTS similar_items (
    version        bigint NOT NULL REFERENCES similar_items_versions (version) ON DELETE CASCADE,
    listing_id     text NOT NULL,
    neighbour_ids  text[] NOT NULL,
    scores         real[] NOT NULL,
    PRIMARY KEY (version, listing_id)
);
CREATE TABLE IF NOT EXISTS similar_items_active (
    model_version  text PRIMARY KEY,
    version        bigint NOT NULL REFERENCES similar_items_versions (version),
    switched_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS review_queue (
    id             bigserial PRIMARY KEY,
    listing_id     text NOT NULL REFERENCES listings (listing_id) ON DELETE CASCADE,
    tag_group      text NOT NULL,
    candidates     jsonb NOT NULL,              -- [[value, confidence], ...] best first
    threshold      real NOT NULL,
    model_version  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    resolved_at    timestamptz,
    UNIQUE (listing_id, tag_group, model_version)
);

CREATE TABLE IF NOT EXISTS corrections (
    event_id       text PRIMARY KEY,
    listing_id     text NOT NULL,
    tag_group      text NOT NULL,
    old_value      text,
    new_value      text NOT NULL,
    corrected_by   text NOT NULL,
    corrected_at   timestamptz NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS corrections_listing_idx ON corrections (listing_id);

CREATE TABLE IF NOT EXISTS models (
    model_version  text PRIMARY KEY,
    manifest       jsonb NOT NULL,
    metrics        jsonb NOT NULL DEFAULT '{}'::jsonb,
    path           text NOT NULL,
    status         text NOT NULL DEFAULT 'candidate'
                   CHECK (status IN ('candidate', 'active', 'rejected', 'retired')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    promoted_at    timestamptz
);
-- At most one active model.
CREATE UNIQUE INDEX IF NOT EXISTS models_one_active ON models ((status)) WHERE status = 'active';

-- Idempotency of event handling: a replayed event id is a no-op.
CREATE TABLE IF NOT EXISTS processed_events (
    event_id       text PRIMARY KEY,
    topic          text NOT NULL,
    kafka_partition integer,
    kafka_offset   bigint,
    processed_at   timestamptz NOT NULL DEFAULT now()
);
