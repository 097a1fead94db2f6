"""Enrichment worker: Kafka intake, Celery tasks, the batched enrichment pipeline, the Postgres store."""
