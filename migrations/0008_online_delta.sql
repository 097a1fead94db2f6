-- Online neighbours top up an in-memory delta per worker with only the embeddings written since their
-- last look. Time stamps cannot say that (a transaction commits after its now()); the writing
-- transaction's id compared against the reader's pg_snapshot can. Re-runnable.

-- '1' (frozen, visible to every snapshot) for the rows already there: a constant default adds the column
-- without rewriting the table. Rows written from now on carry their transaction's id.
ALTER TABLE embeddings ADD COLUMN IF NOT EXISTS written_xid xid8 NOT NULL DEFAULT '1';
ALTER TABLE embeddings ALTER COLUMN written_xid SET DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS embeddings_written_idx ON embeddings (model_version, written_xid);

