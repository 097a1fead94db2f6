-- Console sessions the server can end: the cookie carries a random session id, this table its sha256 (a read
-- of the table gives no usable cookie). Logout, a password change and disabling the account end sessions;
-- an idle timeout and an absolute lifetime are checked on every request. Re-runnable (IF NOT EXISTS).

CREATE TABLE IF NOT EXISTS console_sessions (
    id_hash     text PRIMARY KEY,
    user_name   text NOT NULL REFERENCES console_users (name) ON DELETE CASCADE,
    address     text,                                   -- where the sign-in came from
    created_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    end_reason  text                                    -- logout, password changed, account disabled, ...
);
CREATE INDEX IF NOT EXISTS console_sessions_user_idx ON console_sessions (user_name, address);
