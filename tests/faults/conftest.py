"""Fault-suite fixtures. Every test here is marked `faults` and `integration`.

Tests share the session's Kafka-protocol broker, S3 server and Postgres server, with a topic, consumer group,
bucket and database of their own (make_stack); a fault that kills or hangs a service gets a private instance of
it (lab.private_pg() and the like, harness/cluster.py). RabbitMQ is a node of the suite's own (fault_amqp),
not the shared one: Celery names every `enrich worker` on a host alike (celery@<host>), and a second worker on
the same broker dies at start (RESOURCE_LOCKED on its remote-control queue), so a worker of another test run
on the shared broker would kill ours, and ours theirs.

A test marked `early(scenario)` has its scenario run in the background lane from the start of the fault tests
(the test itself is moved to the end and asserts on what the scenario returned), so the faults that mostly wait
(a broker hung 30 s, a node or server restarting, an image host down) overlap the others. For the same reason
lane scenarios start a RabbitMQ node of their own.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import cluster
from harness.models import save_small_model
from tests.conftest import PG_ADMIN_URL

HERE = Path(__file__).resolve().parent


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "early(scenario): run the scenario in the fault suite's background lane")


def _here(item) -> bool:
    return HERE in Path(item.path).resolve().parents


def pytest_collection_modifyitems(items) -> None:
    ours = [i for i, item in enumerate(items) if _here(item)]
    for i in ours:
        items[i].add_marker(pytest.mark.faults)
        items[i].add_marker(pytest.mark.integration)
    # tests that collect a background scenario's result go last, so the lane overlaps the others
    tests = [items[i] for i in ours]
    for i, item in zip(ours, [t for t in tests if not t.get_closest_marker("early")]
                       + [t for t in tests if t.get_closest_marker("early")], strict=True):
        items[i] = item


@pytest.fixture(scope="session")
def fault_model_dir(tmp_path_factory) -> Path:
    """The small real model the workers serve (ENRICH_MODEL_DIR)."""
    return save_small_model(tmp_path_factory.mktemp("fault-model"), "fault-small-v1", seed=0)


@pytest.fixture(scope="session")
def fault_amqp() -> str:
    """The URL of the suite's RabbitMQ node (one worker at a time uses it: the foreground tests run in turn)."""
    base = cluster.service_dir()
    rabbit = cluster.PrivateRabbit(base)
    try:
        rabbit.start()
        yield rabbit.url
    finally:
        rabbit.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def _make_lab(fault_model_dir, kafka_bootstrap, s3_endpoint, fault_amqp):
    return lambda: cluster.Lab(fault_model_dir, kafka_bootstrap, s3_endpoint, fault_amqp, PG_ADMIN_URL)


@pytest.fixture(scope="session", autouse=True)
def lane(request, _make_lab):
    """The background lane, running the scenarios of the selected `early` tests."""
    scenarios = [m.args[0] for item in request.session.items if _here(item) for m in item.iter_markers("early")]
    lane = cluster.Lane(scenarios, _make_lab)
    yield lane
    lane.close()


@pytest.fixture()
def lab(_make_lab):
    with _make_lab() as lab:
        yield lab


@pytest.fixture()
def make_stack(lab):
    """make_stack(pg_url=, kafka=, amqp=, s3=, **settings) → a Stack on the shared services unless told
    otherwise; its processes, database, queue and topics are removed afterwards."""
    return lab.stack
