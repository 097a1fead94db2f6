"""Fault-suite fixtures: every test here is marked `faults` and `integration`.

Faults that kill a service get a private instance of it (private_pg, private_rabbit, private_kafka,
private_s3); the others share the session's Kafka-protocol broker, S3 server, Postgres server and RabbitMQ
with a topic, consumer group, GPU queue, bucket and database of their own (make_stack).
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL
from tests.faults import cluster

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def fault_model_dir(tmp_path_factory) -> Path:
    """The small real model the workers serve (ENRICH_MODEL_DIR)."""
    from tests.worker.conftest import save_small_model

    return save_small_model(tmp_path_factory.mktemp("fault-model"), "fault-small-v1", seed=0)


@pytest.fixture()
def fault_dir():
    """A folder for this test's private services and process logs; removed afterwards."""
    path = cluster.service_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def fault_images() -> dict:
    return cluster.image_objects(f"fault-{uuid.uuid4().hex[:8]}")


@pytest.fixture()
def private_pg(fault_dir):
    pg = cluster.PrivatePostgres(fault_dir)
    try:
        pg.start()
        pg.create_database()
        yield pg
    finally:
        pg.close()


@pytest.fixture()
def private_rabbit(fault_dir):
    rabbit = cluster.PrivateRabbit(fault_dir)
    try:
        rabbit.start()
        yield rabbit
    finally:
        rabbit.close()


@pytest.fixture()
def private_kafka(fault_dir):
    kafka = cluster.PrivateKafka(fault_dir)
    try:
        kafka.start()
        yield kafka
    finally:
        kafka.close()


@pytest.fixture()
def private_s3(fault_dir, fault_images):
    s3 = cluster.PrivateS3(fault_dir, fault_images)
    try:
        s3.start()
        yield s3
    finally:
        s3.close()


@pytest.fixture()
def make_stack(fault_dir, fault_model_dir, fault_images, kafka_bootstrap, s3_endpoint):
    """make_stack(pg_url=, kafka=, amqp=, s3=, **settings) → a Stack on the shared services unless told
    otherwise (a fresh database, the images uploaded to the shared S3). Its processes are stopped and its
    database, queue and topics removed afterwards."""
    from tests.worker.conftest import AMQP

    made: list[tuple[cluster.Stack, bool]] = []

    def make(pg_url: str | None = None, kafka: str | None = None, amqp: str | None = None, s3: str | None = None,
             **settings) -> cluster.Stack:
        own_db = pg_url is None
        if own_db:
            pg_url = cluster.create_database(PG_ADMIN_URL)
        if s3 is None:
            s3 = s3_endpoint
            cluster.upload(s3, fault_images)
        stack = cluster.Stack(pg_url, kafka or kafka_bootstrap, amqp or AMQP, s3, fault_model_dir, fault_dir,
                              images=cluster.image_uris(fault_images), settings=settings)
        made.append((stack, own_db))
        return stack

    yield make
    for stack, own_db in made:
        stack.close()
        if stack.amqp == AMQP:
            cluster.delete_queue(stack.amqp, stack.queue)
        if stack.kafka == kafka_bootstrap:
            cluster.delete_topics(stack.kafka, [stack.topic, stack.dlq_topic, stack.corrections_topic,
                                                stack.corrections_dlq_topic])
        if own_db:
            cluster.drop_database(stack.pg_url)
