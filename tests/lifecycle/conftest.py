"""The lifecycle tests reuse the worker fixtures (Celery configured per test)."""
from tests.worker.conftest import use_celery  # noqa: F401 - a fixture
