-- Model lifecycle: immutable artifacts, an "active" alias with its history, rollback, retraining jobs,
-- catalogue backfills, shadow predictions. Re-runnable (IF NOT EXISTS).

-- Where a registered model's files live (by version and sha256) and which evaluation set its gate
-- metrics were measured on; a model that was ever active can become active again without a gate.
ALTER TABLE models ADD COLUMN IF NOT EXISTS artifact_uri text;
ALTER TABLE models ADD COLUMN IF NOT EXISTS sha256 text;
ALTER TABLE models ADD COLUMN IF NOT EXISTS eval_set text;
ALTER TABLE models ADD COLUMN IF NOT EXISTS registered_by text;
ALTER TABLE models ADD COLUMN IF NOT EXISTS reason text;
ALTER TABLE models ADD COLUMN IF NOT EXISTS was_active boolean NOT NULL DEFAULT false;
UPDATE models SET was_active = true WHERE status IN ('active', 'retired') AND NOT was_active;
ALTER TABLE models DROP CONSTRAINT IF EXISTS models_status_check;
ALTER TABLE models ADD CONSTRAINT models_status_check
    CHECK (status IN ('candidate', 'active', 'rejected', 'retired', 'shadow'));

-- Every move of the alias (promote, rollback, reject, shadow), who did it and why.
CREATE TABLE IF NOT EXISTS model_events (
    id             bigserial PRIMARY KEY,
    model_version  text NOT NULL REFERENCES models (model_version),
    action         text NOT NULL CHECK (action IN ('register', 'promote', 'rollback', 'reject', 'shadow',
                                                   'unshadow')),
    previous       text,
    actor          text NOT NULL,
    reason         text NOT NULL DEFAULT '',
    details        jsonb NOT NULL DEFAULT '{}'::jsonb,
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS model_events_version_idx ON model_events (model_version, at);

-- Retraining jobs (periodic or asked for by an admin); one runs at a time.
CREATE TABLE IF NOT EXISTS training_jobs (
    id             bigserial PRIMARY KEY,
    status         text NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'running', 'done', 'failed', 'skipped')),
    trigger        text NOT NULL CHECK (trigger IN ('schedule', 'admin')),
    requested_by   text NOT NULL,
    reason         text NOT NULL DEFAULT '',
    params         jsonb NOT NULL DEFAULT '{}'::jsonb,
    progress       jsonb NOT NULL DEFAULT '{}'::jsonb,   -- stage, step, of, …
    model_version  text,                                 -- the candidate it produced
    outcome        text,                                 -- promoted / waiting for an admin / rejected: why / skipped: why
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz
);
CREATE INDEX IF NOT EXISTS training_jobs_status_idx ON training_jobs (status, created_at);

-- Re-embedding the catalogue under a newly active model: one row per target model version.
CREATE TABLE IF NOT EXISTS backfills (
    model_version  text PRIMARY KEY REFERENCES models (model_version),
    status         text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'cancelled')),
    total          integer NOT NULL DEFAULT 0,
    done           integer NOT NULL DEFAULT 0,
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);

-- A shadow candidate's predictions on live listings: stored apart, never tags.
CREATE TABLE IF NOT EXISTS shadow_predictions (
    model_version  text NOT NULL REFERENCES models (model_version) ON DELETE CASCADE,
    listing_id     text NOT NULL REFERENCES listings (listing_id) ON DELETE CASCADE,
    tag_group      text NOT NULL,
    value          text NOT NULL,
    confidence     real NOT NULL,
    active_version text NOT NULL,                        -- the model that served the listing meanwhile
    active_value   text,                                 -- what it predicted for the group (NULL: seller's tag kept)
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version, listing_id, tag_group)
);
