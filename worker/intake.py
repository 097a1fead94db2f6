"""Kafka intake: validate → upsert in Postgres → enqueue → commit offsets (in that order).

At-least-once delivery with an exactly-once effect: offsets are committed only after the
database commit and the enqueue succeeded; a crash anywhere before that replays the events,
and the content-hash upsert turns the replay into a no-op (still-pending listings are enqueued
again; the task skips what is already done). Invalid or oversized events go to the dead-letter
topic with the reason in a header and the original bytes as the value, and intake carries on.

Two stages: the consumer thread polls, validates and dead-letters a batch (`prepare`), then hands it
to a writer thread that upserts and enqueues it (`write`) while the next batch is fetched and
validated. Batches are written in order, and the consumer thread commits a batch's offsets once the
writer reports it done. A failed batch is replayed together with every batch handed over after it
(the consumer seeks back to the earliest of their offsets; the writer drops the later ones unwritten).
"""
from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from kafka.structs import OffsetAndMetadata, TopicPartition
from pydantic import ValidationError

from core.config import Settings
from schemas.events import CorrectionEvent, ListingEvent
from core import metrics
from worker.store import record_correction, upsert_listings

log = logging.getLogger(__name__)

DEPTH_CHECK_S = 1.0  # the GPU queue's depth is asked for at most this often (a broker round trip each)


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


def parse_listing(raw: bytes | None, max_bytes: int) -> ListingEvent | Rejected:
    """Bytes from Kafka → a valid ListingEvent, or why not."""
    return _parse(raw, max_bytes, ListingEvent)


def parse_correction(raw: bytes | None, max_bytes: int) -> CorrectionEvent | Rejected:
    return _parse(raw, max_bytes, CorrectionEvent)


def _parse(raw: bytes | None, max_bytes: int, model):
    if raw is None or len(raw) == 0:
        return Rejected("empty", "no value (tombstone or empty message)")
    if len(raw) > max_bytes:
        return Rejected("oversized", f"{len(raw)} bytes > {max_bytes}")
    try:
        return model.model_validate_json(raw)  # parses and validates in one pass (pydantic-core)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":  # not UTF-8 JSON at all
            return Rejected("not_json", errors[0]["msg"][:300])
        errs = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
        return Rejected("invalid", errs[:500])


def make_consumer(settings: Settings, topic: str, group: str, **overrides):
    from kafka import KafkaConsumer

    kwargs = dict(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,  # we commit after Postgres + enqueue, never before
        auto_offset_reset="earliest",
        max_poll_records=500,
        # a slow Postgres write must not look like a dead consumer
        max_poll_interval_ms=300_000,
        client_id=f"enrich-intake-{topic}",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
    )
    kwargs.update(overrides)
    return KafkaConsumer(topic, **kwargs)


def make_producer(settings: Settings):
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
                         client_id="enrich-dlq")


@dataclass
class Stats:
    consumed: int = 0
    dlq: int = 0
    upserted: int = 0
    enqueued: int = 0
    batches: int = 0
    paused_s: float = 0.0
    errors: int = 0
    dlq_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Prepared:
    """One polled batch after validation: the events to write, and the offsets it covers."""

    topic: str
    events: list                      # valid events, in partition order
    offsets: list[tuple[int, int]]    # (partition, offset) of each event
    first: dict                       # TopicPartition → first offset in the batch (a rewind goes there)
    next: dict                        # TopicPartition → offset after its last record (committed when done)
    generation: int = 0               # the rewind count when it was handed over; older ones are dropped


class Intake:
    """One consumer-group member. `run()` loops until `stop()` (or SIGTERM via install_signal_handlers)."""

    def __init__(self, settings: Settings, conn_factory: Callable[[], psycopg.Connection],
                 enqueue: Callable[[list[str]], None], queue_depth: Callable[[], int] | None = None,
                 consumer=None, producer=None, task_batch: int | None = None, poll_timeout_ms: int = 500) -> None:
        self.settings = settings
        self.conn_factory = conn_factory
        self.enqueue = enqueue
        self.queue_depth = queue_depth
        self.consumer = consumer or make_consumer(settings, settings.listings_topic, settings.consumer_group)
        self.producer = producer or make_producer(settings)
        self.task_batch = task_batch or settings.task_listings
        self.poll_timeout_ms = poll_timeout_ms
        self.stats = Stats()
        self.dlq_topic = settings.dlq_topic
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None  # used by one thread at a time: the writer in run()
        self._paused = False
        self._depth = 0
        self._depth_at = float("-inf")
        # run()'s second stage: batches handed to the writer thread, and what it reported back
        self._todo: queue.Queue = queue.Queue(maxsize=1)  # one batch waits while one is written
        self._done: queue.Queue = queue.Queue()
        self._inflight: deque[Prepared] = deque()
        self._generation = 0

    # ------------------------------------------------------------------------------------ control
    def stop(self, *_args) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _db(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.conn_factory()
        return self._conn

    # --------------------------------------------------------------------------------------- loop
    def run(self, max_events: int | None = None, idle_exit_s: float | None = None) -> Stats:
        """Consume until stopped. max_events / idle_exit_s end the loop early (benchmarks, tests).

        Batches in flight when the loop ends are finished (and their offsets committed) first.
        """
        started = last_data = time.monotonic()
        writer = threading.Thread(target=self._write_loop, name="intake-writer", daemon=True)
        writer.start()
        try:
            while not self.stopping:
                self._settle()
                if self._backpressure():
                    continue
                batch = self.consumer.poll(timeout_ms=self.poll_timeout_ms)
                records = [r for recs in batch.values() for r in recs]
                if not records:
                    now = time.monotonic()
                    if not self.consumer.assignment() and now - started < 60:
                        last_data = now  # idle means "assigned and nothing to read", not "still joining"
                    if idle_exit_s is not None and now - last_data > idle_exit_s and not self._inflight:
                        break
                    continue
                last_data = time.monotonic()
                try:
                    prepared = self.prepare(records)
                except Exception:  # noqa: BLE001 - replay the batch, never skip it
                    self._failed(records, "could not be validated or dead-lettered")
                    continue
                self._hand_over(prepared)
                if max_events is not None and self.stats.consumed >= max_events:
                    break
        finally:
            try:
                while writer.is_alive():  # the writer finishes what it holds, then stops
                    try:
                        self._todo.put(None, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                writer.join()
                self._settle()
            finally:
                self.close()
        return self.stats

    def _backpressure(self) -> bool:
        """Pause fetching while the GPU queue is deeper than allowed (heartbeats continue)."""
        if self.queue_depth is None:
            return False
        if time.monotonic() - self._depth_at >= DEPTH_CHECK_S:
            try:
                self._depth = self.queue_depth()
            except Exception:  # noqa: BLE001 - broker hiccup: treat as full and wait
                log.warning("queue depth unknown (broker unreachable?); pausing", exc_info=True)
                self._depth = self.settings.max_queue_depth + 1
            self._depth_at = time.monotonic()
            metrics.QUEUE_DEPTH.set(self._depth)
        depth = self._depth
        deep = depth > self.settings.max_queue_depth
        if deep and not self._paused:
            self.consumer.pause(*self.consumer.assignment())
            self._paused = True
            metrics.INTAKE_PAUSED.set(1)
            log.info("GPU queue depth %d > %d: intake paused", depth, self.settings.max_queue_depth)
        elif not deep and self._paused:
            self.consumer.resume(*self.consumer.paused())
            self._paused = False
            metrics.INTAKE_PAUSED.set(0)
            log.info("GPU queue depth %d: intake resumed", depth)
        if self._paused:
            t0 = time.monotonic()
            self._settle()
            self.consumer.poll(timeout_ms=200)  # keeps group membership alive; paused partitions return nothing
            self.stats.paused_s += time.monotonic() - t0
            return True
        return False

    def handle(self, records) -> None:
        """Validate, write, enqueue, then commit offsets for one polled batch, in the caller's thread."""
        prepared = self.prepare(records)
        self.write(prepared)
        self._commit(prepared)

    def prepare(self, records) -> Prepared:
        """Validate a polled batch; dead-letter what is invalid (flushed, so it exists before the commit)."""
        events, offsets, dlq = [], [], 0
        first: dict = {}
        nxt: dict = {}
        per_topic: dict[str, int] = {}
        max_bytes = self.settings.max_event_bytes
        for r in records:
            per_topic[r.topic] = per_topic.get(r.topic, 0) + 1
            tp = TopicPartition(r.topic, r.partition)
            first.setdefault(tp, r.offset)
            nxt[tp] = r.offset + 1
            parsed = self.parse(r.value, max_bytes)
            if isinstance(parsed, Rejected):
                self._dead_letter(r, parsed)
                dlq += 1
                continue
            events.append(parsed)
            offsets.append((r.partition, r.offset))
        self.stats.consumed += len(records)
        for topic, n in per_topic.items():
            metrics.EVENTS_CONSUMED.labels(topic=topic).inc(n)
        if dlq:
            self.producer.flush(timeout=30)  # the DLQ copy must exist before the offset moves past it
        return Prepared(records[0].topic, events, offsets, first, nxt, self._generation)

    @staticmethod
    def parse(raw: bytes | None, max_bytes: int) -> ListingEvent | CorrectionEvent | Rejected:
        return parse_listing(raw, max_bytes)

    def write(self, prepared: Prepared) -> None:
        """Upsert the batch's listings in one transaction, then enqueue those still pending."""
        if not prepared.events:
            return
        conn = self._db()
        with conn.transaction():
            result = upsert_listings(conn, prepared.events, topic=prepared.topic, offsets=prepared.offsets)
        self.stats.upserted += len(result.changed)
        for i in range(0, len(result.pending), self.task_batch):
            chunk = result.pending[i:i + self.task_batch]
            self.enqueue(chunk)
            self.stats.enqueued += len(chunk)
            metrics.LISTINGS_ENQUEUED.inc(len(chunk))
        for lid in result.deleted:
            log.info("listing %s deleted", lid, extra={"listing_id": lid})

    def _commit(self, prepared: Prepared) -> None:
        self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in prepared.next.items()})
        self.stats.batches += 1

    # ------------------------------------------------------------------------- the writer thread
    def _write_loop(self) -> None:
        """Write handed-over batches in order; after a failure, drop the rest of that generation
        unwritten (the consumer thread replays them all)."""
        failed_generation = None
        while (prepared := self._todo.get()) is not None:
            if prepared.generation == failed_generation:
                self._done.put((prepared, None, False))
                continue
            try:
                self.write(prepared)
            except Exception as exc:  # noqa: BLE001 - reported to the consumer thread, which replays
                failed_generation = prepared.generation
                self._reset_db()
                self._done.put((prepared, exc, False))
            else:
                self._done.put((prepared, None, True))

    def _hand_over(self, prepared: Prepared) -> None:
        self._inflight.append(prepared)
        while True:
            try:
                self._todo.put(prepared, timeout=0.2)
                return
            except queue.Full:
                self._settle()  # commit what is done meanwhile

    def _settle(self) -> None:
        """Commit the offsets of batches the writer finished; rewind on a failed one (consumer thread)."""
        while True:
            try:
                prepared, exc, written = self._done.get_nowait()
            except queue.Empty:
                return
            self._inflight.popleft()  # reports come back in hand-over order
            if prepared.generation != self._generation:
                continue  # dropped after a rewind; replayed already
            if written:
                try:
                    self._commit(prepared)
                except Exception:  # noqa: BLE001 - e.g. partitions revoked: their new owner replays them
                    log.warning("offset commit failed; those events will be replayed", exc_info=True)
            elif exc is not None:
                log.error("batch of %d events failed; rewinding to replay it and %d later batches",
                          len(prepared.offsets), len(self._inflight), exc_info=exc)
                self._failed_batches([prepared, *self._inflight])

    def _failed(self, records, why: str) -> None:
        first: dict = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        log.exception("batch of %d events %s; rewinding to replay it", len(records), why)
        self._failed_batches([*self._inflight, Prepared("", [], [], first, {})])

    def _failed_batches(self, batches: list[Prepared]) -> None:
        """Seek back to the earliest offset of these batches (every one not committed yet) and drop
        those still handed over, then wait a moment before the replay."""
        self.stats.errors += 1
        first: dict = {}
        for b in batches:
            for tp, off in b.first.items():
                first[tp] = min(first.get(tp, off), off)
        self._generation += 1
        self._rewind(first)
        self._stop.wait(1.0)

    def _dead_letter(self, record, why: Rejected) -> None:
        self.stats.dlq += 1
        self.stats.dlq_reasons[why.reason] = self.stats.dlq_reasons.get(why.reason, 0) + 1
        metrics.EVENTS_DLQ.labels(reason=why.reason).inc()
        headers = [("dlq_reason", why.reason.encode()), ("dlq_detail", why.detail.encode()[:1000]),
                   ("source_topic", record.topic.encode()), ("source_partition", str(record.partition).encode()),
                   ("source_offset", str(record.offset).encode())]
        log.warning("event at %s[%d]@%d to DLQ: %s: %s", record.topic, record.partition, record.offset,
                    why.reason, why.detail)
        self.producer.send(self.dlq_topic, key=record.key, value=record.value or b"", headers=headers)

    def _rewind(self, first: dict) -> None:
        for tp, off in first.items():
            try:
                self.consumer.seek(tp, off)
            except Exception:  # noqa: BLE001 - partition revoked meanwhile: the new owner replays it
                log.warning("could not rewind %s", tp)

    def _reset_db(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        try:
            self.producer.flush(timeout=10)
            self.producer.close(timeout=10)
        except Exception:  # noqa: BLE001 - shutting down
            log.warning("DLQ producer did not close cleanly", exc_info=True)
        self.consumer.close(autocommit=False)
        self._reset_db()
        log.info("intake stopped: %s", self.stats)


class CorrectionsIntake(Intake):
    """Corrections topic: CorrectionEvent → corrections table + listing_tags source=corrected."""

    def __init__(self, settings: Settings, conn_factory: Callable[[], psycopg.Connection], consumer=None,
                 producer=None, poll_timeout_ms: int = 500) -> None:
        consumer = consumer or make_consumer(settings, settings.corrections_topic, settings.consumer_group + "-corrections")
        super().__init__(settings, conn_factory, enqueue=lambda ids: None, consumer=consumer, producer=producer,
                         poll_timeout_ms=poll_timeout_ms)
        self.dlq_topic = settings.corrections_topic + ".dlq"

    @staticmethod
    def parse(raw: bytes | None, max_bytes: int) -> CorrectionEvent | Rejected:
        return parse_correction(raw, max_bytes)

    def write(self, prepared: Prepared) -> None:
        if not prepared.events:
            return
        conn = self._db()
        with conn.transaction():
            self.stats.upserted += sum(record_correction(conn, ev) for ev in prepared.events)
