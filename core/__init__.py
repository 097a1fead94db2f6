"""Shared base: settings, database, image fetching and guards, S3, metrics, logs, the Celery app."""
