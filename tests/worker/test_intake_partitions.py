"""Several `enrich consume` processes on one 4-partition topic: edits of a listing keep their order (producers key
events by listing id), a consumer joining mid-stream loses and re-reads nothing, and each process exports the lag of
the partitions it holds (`enrich_intake_lag`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kombu import Connection

from harness.net import free_port, scrape_metrics
from tests.worker.conftest import wait_until
from tests.worker.test_intake import _drain
from tests.worker.test_intake_pipeline import _committed

ROOT = Path(__file__).resolve().parents[2]
REDIS = "redis://127.0.0.1:6379/0"
PARTITIONS = 4
LISTINGS, EDITS = 40, 5


class Consumer:
    """`enrich consume` as a real process, its /metrics on a free port."""

    def __init__(self, env: dict, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "enrich.cli", "consume", "--metrics-port", str(self.port)],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"))

    def samples(self, name: str) -> dict[str, float]:
        """label text → value of each sample of metric `name` ({} while the process does not answer)."""
        body = scrape_metrics(self.port) or ""
        out = {}
        for line in body.splitlines():
            m = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
            if m:
                out[m.group(1) or ""] = float(m.group(2))
        return out

    def consumed(self) -> float:
        return sum(self.samples("enrich_events_consumed_total").values())

    def lag(self) -> dict[int, float]:
        """partition → enrich_intake_lag of the partitions this process holds."""
        out = {}
        for labels, value in self.samples("enrich_intake_lag").items():
            m = re.search(r'partition="(\d+)"', labels)
            assert m is not None, labels
            out[int(m.group(1))] = value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def check_alive(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return True


class Scenario:
    """A fresh 4-partition topic, consumer group and GPU queue (on Redis, where nobody consumes the tasks)."""

    def __init__(self, kafka: str, pg_url: str, tmp_path: Path, **settings) -> None:
        tag = uuid.uuid4().hex[:8]
        self.kafka, self.tmp_path = kafka, tmp_path
        self.topic, self.group, self.queue = f"listings-{tag}", f"g-{tag}", f"gpu-{tag}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "ENRICH_DATABASE_URL": pg_url,
                    "ENRICH_KAFKA_BOOTSTRAP": kafka, "ENRICH_LISTINGS_TOPIC": self.topic,
                    "ENRICH_DLQ_TOPIC": self.topic + ".dlq", "ENRICH_CONSUMER_GROUP": self.group,
                    "ENRICH_CELERY_BROKER_URL": REDIS, "ENRICH_GPU_QUEUE": self.queue,
                    "ENRICH_KAFKA_SESSION_TIMEOUT_MS": "6000", "ENRICH_KAFKA_HEARTBEAT_INTERVAL_MS": "500"}
        self.env.update({f"ENRICH_{k.upper()}": str(v) for k, v in settings.items()})
        self.consumers: list[Consumer] = []
        admin = KafkaAdminClient(bootstrap_servers=kafka)
        try:
            admin.create_topics([NewTopic(self.topic, PARTITIONS, 1)])
        finally:
            admin.close()

    def consumer(self) -> Consumer:
        c = Consumer(self.env, self.tmp_path / f"consume-{len(self.consumers)}.log")
        self.consumers.append(c)
        return c

    def close(self) -> None:
        for c in self.consumers:
            c.stop()

        with Connection(REDIS) as conn:
            conn.SimpleQueue(self.queue).clear()


def _edit(lid: str, n: int) -> bytes:
    return json.dumps({"listing_id": lid, "seller_id": "s1", "title": f"edit {n}",
                       "images": [f"/x/{lid}-{n}.png"]}).encode()


def edits(prefix: str) -> list[tuple[str, bytes]]:
    """(listing id, event) of EDITS successive edits of LISTINGS listings, edit rounds interleaved."""
    return [(f"{prefix}{i}", _edit(f"{prefix}{i}", n)) for n in range(EDITS) for i in range(LISTINGS)]


def produce(kafka: str, topic: str, events: list[tuple[str, bytes]], keyed: bool = True,
            per_second: float | None = None) -> None:
    """Send in order, each keyed by its listing id (as producers must), or unkeyed (the producer then spreads
    the events over the partitions)."""
    producer = KafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=5)
    try:
        for i, (lid, value) in enumerate(events):
            producer.send(topic, key=lid.encode() if keyed else None, value=value)
            if per_second and i % 20 == 19:
                producer.flush()
                time.sleep(20 / per_second)
        producer.flush()
    finally:
        producer.close()


def both_hold_two(a: Consumer, b: Consumer) -> bool:
    """Each process exports the lag of 2 partitions, together all 4: the group settled on 2 + 2."""
    la, lb = a.lag(), b.lag()
    return len(la) == 2 and len(lb) == 2 and set(la) | set(lb) == set(range(PARTITIONS))


def assert_last_edits_won(db, prefix: str) -> None:
    rows = dict(db.execute("SELECT listing_id, event->>'title' FROM listings WHERE listing_id LIKE %s",
                           (prefix + "%",)).fetchall())
    assert len(rows) == LISTINGS
    stale = {lid: title for lid, title in rows.items() if title != f"edit {EDITS - 1}"}
    assert not stale, f"listings left on an older edit: {stale}"


def assert_one_partition_per_listing(kafka: str, topic: str) -> None:
    """Every edit of a listing sits in one partition: only there does Kafka keep their order."""
    where: dict[str, set[int]] = {}
    for m in _drain(kafka, topic, LISTINGS * EDITS):
        where.setdefault(json.loads(m.value)["listing_id"], set()).add(m.partition)
    spread = {lid: sorted(ps) for lid, ps in where.items() if len(ps) > 1}
    assert not spread, f"edits of one listing in several partitions (events not keyed by listing id): {spread}"


def test_edits_keep_their_order_across_two_consumers(kafka_bootstrap, pg_url, db, tmp_path):
    s = Scenario(kafka_bootstrap, pg_url, tmp_path)
    try:
        a, b = s.consumer(), s.consumer()
        wait_until(lambda: a.check_alive() and b.check_alive() and both_hold_two(a, b), 120)
        produce(kafka_bootstrap, s.topic, edits("k"))
        wait_until(lambda: a.consumed() + b.consumed() >= LISTINGS * EDITS, 120)
        wait_until(lambda: sum(_committed(kafka_bootstrap, s.topic, s.group).values()) == LISTINGS * EDITS, 60)
        assert a.consumed() > 0 and b.consumed() > 0, "both processes take a share"
        assert_one_partition_per_listing(kafka_bootstrap, s.topic)
        assert_last_edits_won(db, "k")
    finally:
        s.close()


def test_second_consumer_joining_mid_stream_loses_and_rereads_nothing(kafka_bootstrap, pg_url, db, tmp_path):
    """Every event is read once by the two processes together (a replay after the rebalance would read some
    twice), every listing ends on its last edit, and the group's committed offsets reach the end."""
    s = Scenario(kafka_bootstrap, pg_url, tmp_path, task_listings=8)
    events = edits("j")
    try:
        a = s.consumer()
        wait_until(lambda: a.check_alive() and len(a.lag()) == PARTITIONS, 120)
        producer = threading.Thread(target=produce, args=(kafka_bootstrap, s.topic, events),
                                    kwargs={"per_second": 25})
        producer.start()
        wait_until(lambda: a.consumed() >= 40, 60)
        b = s.consumer()  # joins while events keep arriving
        wait_until(lambda: b.check_alive() and both_hold_two(a, b), 120)
        producer.join()
        wait_until(lambda: sum(_committed(kafka_bootstrap, s.topic, s.group).values()) == len(events), 120)
        time.sleep(1.5)  # a re-read would show in the counters by now (lag checks and commits run every second)
        assert b.consumed() > 0, "the second process took partitions over mid-stream"
        assert a.consumed() + b.consumed() == len(events), (a.consumed(), b.consumed())
        assert_last_edits_won(db, "j")
        assert db.execute("SELECT count(*) FROM listings WHERE listing_id LIKE 'j%'").fetchone()[0] == LISTINGS
    finally:
        s.close()


def test_lag_per_partition_is_exported_and_follows_rebalances(kafka_bootstrap, pg_url, db, tmp_path):
    """A known backlog per partition while the intake is paused (a deep GPU queue), 0 once drained; after a
    second process joins, each exports only the partitions it holds."""
    s = Scenario(kafka_bootstrap, pg_url, tmp_path, max_queue_depth=10)
    backlog = {0: 3, 1: 5, 2: 7, 3: 9}

    try:
        with Connection(REDIS) as conn:
            queue = conn.SimpleQueue(s.queue)
            for i in range(20):  # deeper than allowed: the intake starts paused
                queue.put({"filler": i})
            queue.close()
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=0)
        for p, n in backlog.items():
            for i in range(n):  # one record per request: the broker's end offset is then exact before any fetch
                producer.send(s.topic, key=f"p{p}-{i}".encode(), value=_edit(f"p{p}-{i}", 0), partition=p)
                producer.flush()
        producer.close()
        a = s.consumer()
        wait_until(lambda: a.check_alive() and a.lag() == backlog, 120)
        assert a.consumed() == 0, "paused: the backlog is measured, not read"
        with Connection(REDIS) as conn:
            conn.SimpleQueue(s.queue).clear()  # the GPU queue drained: the intake resumes
        wait_until(lambda: a.check_alive() and a.lag() == dict.fromkeys(backlog, 0), 120)
        assert db.execute("SELECT count(*) FROM listings WHERE listing_id LIKE 'p%'").fetchone()[0] == 24

        b = s.consumer()
        wait_until(lambda: b.check_alive() and both_hold_two(a, b), 120)
        assert set(a.lag().values()) == {0} and set(b.lag().values()) == {0}
    finally:
        s.close()
