-- The browser console: accounts, an audit trail of what people did, and leases on review items so two
-- reviewers never get the same item at once. Re-runnable (IF NOT EXISTS).

CREATE TABLE IF NOT EXISTS console_users (
    name           text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9._@-]{1,64}$'),
    password_hash  text NOT NULL,                       -- argon2id
    role           text NOT NULL CHECK (role IN ('reviewer', 'admin')),
    disabled       boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS console_actions (
    id             bigserial PRIMARY KEY,
    user_name      text NOT NULL,
    action         text NOT NULL,
    details        jsonb NOT NULL DEFAULT '{}'::jsonb,
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS console_actions_user_idx ON console_actions (user_name, at);

ALTER TABLE review_queue ADD COLUMN IF NOT EXISTS leased_by text;
ALTER TABLE review_queue ADD COLUMN IF NOT EXISTS lease_until timestamptz;
ALTER TABLE review_queue ADD COLUMN IF NOT EXISTS resolved_by text;
CREATE INDEX IF NOT EXISTS review_queue_open_idx ON review_queue (created_at, id) WHERE resolved_at IS NULL;

-- What each worker process serves, written at its registry checks (the console's overview shows it).
CREATE TABLE IF NOT EXISTS worker_status (
    worker         text PRIMARY KEY,                     -- hostname:pid
    model_version  text,
    shadow_version text,
    seen_at        timestamptz NOT NULL DEFAULT now()
);
