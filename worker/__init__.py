"""Worker: Kafka intake, Celery tasks, image fetching, batched inference, Postgres store, similar items."""
