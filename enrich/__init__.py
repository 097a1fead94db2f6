"""Application shell shared by worker/ and training/: settings, database access, the `enrich` CLI."""
