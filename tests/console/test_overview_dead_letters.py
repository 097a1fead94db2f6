"""The overview's dead-letters tile reads the real Kafka-protocol broker through kafka-python (every partition)."""
from __future__ import annotations

import uuid

import pytest
from kafka import KafkaProducer

from core.config import Settings
from harness.cluster import create_topic
from tests.console.conftest import sign_in


@pytest.fixture()
def console_settings(pg_url, tmp_path, kafka_bootstrap):
    return Settings(database_url=pg_url, data_dir=tmp_path / "data", kafka_bootstrap=kafka_bootstrap,
                    dlq_topic=f"dlq-{uuid.uuid4().hex[:8]}", console_secret_key="test-secret-key-" + "x" * 32,
                    celery_broker_url="redis://127.0.0.1:6379/6")


def test_the_dead_letters_tile_counts_the_topic(browser, console_url, console_settings):
    create_topic(console_settings.kafka_bootstrap, console_settings.dlq_topic, partitions=2)
    producer = KafkaProducer(bootstrap_servers=console_settings.kafka_bootstrap)
    for n in range(3):
        producer.send(console_settings.dlq_topic, f'{{"reason": "test {n}"}}'.encode(), partition=n % 2).get(10)
    producer.close()
    page = sign_in(browser, console_url, "reviewer")
    tile = page.locator(".card", has_text="Dead letters")
    assert tile.locator(".stat").inner_text().strip() == "3"
    assert "Kafka not reachable" not in tile.inner_text()
