"""Kafka intake: validate → upsert in Postgres → enqueue → commit offsets (in that order).

At-least-once delivery with an exactly-once effect: offsets are committed only after the
database commit and the enqueue succeeded; a crash anywhere before that replays the events,
and the content-hash upsert turns the replay into a no-op (still-pending listings are enqueued
again; the task skips what is already done). Invalid or oversized events go to the dead-letter
topic with the reason in a header and the original bytes as the value, and intake carries on.

Under steady traffic a poll returns a few events at a time; the consumer thread lingers up to
ENRICH_INTAKE_LINGER_MS for a task's worth (ENRICH_TASK_LISTINGS) before it goes on, so tasks fill up.

Two stages: the consumer thread polls, validates and dead-letters a batch (`prepare`), then hands it
to a writer thread that upserts and enqueues it (`write`) while the next batch is fetched and
validated. Batches are written in order, and the consumer thread commits a batch's offsets once the
writer reports it done. A failed batch is replayed together with every batch handed over after it
(the consumer seeks back to the earliest of their offsets; the writer drops the later ones unwritten).

Only a transient failure is replayed for ever (worker/write_errors.py). Data the database refuses fails the
same way on every replay, so the writer then writes the batch one event at a time in savepoints, sends each
refused event to the dead-letter topic with the database's reason and commits past it; a failure of unknown
kind gets MAX_REPLAYS replays first.

Partitions assigned while the intake is paused are paused at once (Kafka does not carry a pause across a
rebalance), and whatever a poll returns while paused is fetched again later (a seek back), never dropped.

Several `enrich consume` processes share the partitions of one consumer group. Producers key listing events by
listing id, so all edits of a listing sit in one partition, in order, and one process writes them in that order.
Each process exports its lag per partition it holds (`enrich_intake_lag`: end offset - committed offset).
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition
from pydantic import ValidationError

from core import metrics
from core.config import Settings
from model.registry import taxonomy_of
from schemas.events import CorrectionEvent, ListingEvent
from worker.store import known_listings, record_correction, upsert_listings
from worker.write_errors import PERMANENT, TRANSIENT, Rejected, classify, one_by_one

log = logging.getLogger(__name__)

DEPTH_CHECK_S = 1.0  # the GPU queue's depth is asked for at most this often (a broker round trip each)
MAX_REPLAYS = 3  # replays of a batch failing for an unknown reason before its events are written one at a time
LAG_CHECK_S = 1.0  # partition end offsets are asked for at most this often (a broker round trip each)
LAG_TIMEOUT_MS = 2000  # a broker that does not answer in time leaves the lag as it was
HANDOVER_WAIT_S = 30.0  # a rebalance waits this long at most for the writer to finish the batches it holds


def parse_listing(raw: bytes | None, max_bytes: int) -> ListingEvent | Rejected:
    """Bytes from Kafka → a valid ListingEvent, or why not."""
    return _parse(raw, max_bytes, ListingEvent)


def parse_correction(raw: bytes | None, max_bytes: int) -> CorrectionEvent | Rejected:
    return _parse(raw, max_bytes, CorrectionEvent)


EventT = TypeVar("EventT", ListingEvent, CorrectionEvent)


def _parse(raw: bytes | None, max_bytes: int, model: type[EventT]) -> EventT | Rejected:
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


def make_consumer(settings: Settings, topic: str, group: str, **overrides: Any) -> KafkaConsumer:
    kwargs: dict[str, Any] = dict(
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


def make_producer(settings: Settings) -> KafkaProducer:
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
    records: list = field(default_factory=list)  # the Kafka record of each event (dead-lettered if refused)


@dataclass
class Stored:
    """What writing some events did: listings changed, ids to enqueue, events refused by a rule."""

    changed: int = 0
    pending: list[str] = field(default_factory=list)
    refused: dict[int, Rejected] = field(default_factory=dict)  # index in the batch → why


class _FollowPause(AsyncConsumerRebalanceListener):
    """Before partitions move, the batches in flight are finished and their offsets committed, so the next owner
    starts where this one stopped (read once, not replayed); events fetched but not handed over yet are left to
    it. Kafka does not keep a pause across a rebalance for newly assigned partitions: pause them at once.

    Async: the client runs these in its network loop, where only its non-blocking calls (commit_async) work."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    async def on_partitions_revoked(self, revoked) -> None:
        await self.intake._finish_inflight()
        self.intake._forget_partitions(revoked)
        self.intake._revoked = True
        log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

    async def on_partitions_lost(self, lost) -> None:
        # the group already gave them to others: nothing can be committed for them
        self.intake._forget_partitions(lost)
        self.intake._revoked = True
        log.info("partitions lost: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in lost))

    async def on_partitions_assigned(self, assigned) -> None:
        self.intake._forget_partitions(assigned, keep_lag=True)  # a peer may have committed since we held them
        if self.intake.paused and assigned:
            self.intake.consumer.pause(*assigned)
        log.info("partitions assigned%s: %s", " (paused)" if self.intake.paused else "",
                 sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class Intake:
    """One consumer-group member. `run()` loops until `stop()` (or SIGTERM via install_signal_handlers)."""

    def __init__(self, settings: Settings, conn_factory: Callable[[], psycopg.Connection],
                 enqueue: Callable[[list[str]], None], queue_depth: Callable[[], int] | None = None,
                 consumer=None, producer=None, task_batch: int | None = None, poll_timeout_ms: int = 500,
                 crash_before_commit: int | None = None) -> None:
        """``crash_before_commit`` (fault tests only): SIGKILL this process once its Nth batch is written and
        enqueued, before its offsets are committed."""
        self.settings = settings
        self.conn_factory = conn_factory
        self.enqueue = enqueue
        self.queue_depth = queue_depth
        self.consumer = consumer or make_consumer(settings, settings.listings_topic, settings.consumer_group)
        self.consumer.subscribe(sorted(self.consumer.subscription() or ()), listener=_FollowPause(self))
        self.producer = producer or make_producer(settings)
        self.task_batch = task_batch or settings.task_listings
        self.poll_timeout_ms = poll_timeout_ms
        self.stats = Stats()
        self.dlq_topic = settings.dlq_topic
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None  # used by one thread at a time: the writer in run()
        self.paused = False
        self._depth = 0
        self._depth_at = float("-inf")
        # the queue depth between two reads: the last read, plus the tasks this intake enqueued since, plus
        # those of the batches its writer still holds (an upper bound: one per task_batch events)
        self._tasks_sent = 0  # by the writer thread
        self._sent_at_read = 0
        self._attempts: dict[tuple[str, int, int], int] = {}  # (topic, partition, offset) → failed writes
        self._crash_before_commit = crash_before_commit
        # run()'s second stage: batches handed to the writer thread, and what it reported back
        self._todo: queue.Queue = queue.Queue(maxsize=1)  # one batch waits while one is written
        self._done: queue.Queue = queue.Queue()
        self._inflight: deque[Prepared] = deque()
        self._generation = 0
        # the lag gauge: the group's committed offset of each partition held (this member's commits, else asked
        # for once), and the partitions it has a series for
        self._committed: dict[TopicPartition, int] = {}
        self._lag_at = float("-inf")
        self._lag_series: set[TopicPartition] = set()
        self._revoked = False  # set by a rebalance: events fetched from partitions lost since are dropped

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
                self._report_lag()
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
                records = self._held(self._fill(records))
                if not records:
                    continue
                try:
                    prepared = self.prepare(records)
                except Exception:
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

    def _fill(self, records: list) -> list:
        """Wait up to ENRICH_INTAKE_LINGER_MS for more events until a task's worth has arrived: under steady
        traffic a poll returns a few events at a time, and a task's fixed cost would dominate tiny ones."""
        deadline = time.monotonic() + self.settings.intake_linger_ms / 1000
        while len(records) < self.task_batch and not self.stopping:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            more = self.consumer.poll(timeout_ms=left_ms, max_records=self.task_batch - len(records))
            records += [r for recs in more.values() for r in recs]
        return records

    def _held(self, records: list) -> list:
        """After a rebalance, drop the events fetched from partitions this member no longer holds: they are not
        written, and their new owner reads them from the committed offset."""
        if not self._revoked:
            return records
        self._revoked = False
        held = self.consumer.assignment()
        kept = [r for r in records if TopicPartition(r.topic, r.partition) in held]
        if len(kept) < len(records):
            log.info("%d fetched events left to the partitions' new owner", len(records) - len(kept))
        return kept

    def _backpressure(self) -> bool:
        """Pause fetching while the GPU queue is deeper than allowed (heartbeats continue)."""
        if self.queue_depth is None:
            return False
        if time.monotonic() - self._depth_at >= DEPTH_CHECK_S:
            sent = self._tasks_sent
            try:
                self._depth = self.queue_depth()
            except Exception:
                log.warning("queue depth unknown (broker unreachable?); pausing", exc_info=True)
                self._depth = self.settings.max_queue_depth + 1
            self._sent_at_read = sent
            self._depth_at = time.monotonic()
            metrics.QUEUE_DEPTH.set(self._depth)
        # between two reads, count what this intake enqueued since: the limit holds within one batch
        held = sum(-(-len(b.events) // self.task_batch) for b in self._inflight)
        depth = self._depth + self._tasks_sent - self._sent_at_read + held
        deep = depth > self.settings.max_queue_depth
        if deep and not self.paused:
            self.paused = True  # first, so a rebalance from here on pauses what it assigns
            self.consumer.pause(*self.consumer.assignment())
            metrics.INTAKE_PAUSED.set(1)
            log.info("GPU queue depth %d > %d: intake paused", depth, self.settings.max_queue_depth)
        elif not deep and self.paused:
            self.paused = False
            self.consumer.resume(*self.consumer.paused())
            metrics.INTAKE_PAUSED.set(0)
            log.info("GPU queue depth %d: intake resumed", depth)
        if self.paused:
            t0 = time.monotonic()
            self._settle()
            # keeps group membership alive; paused partitions return nothing, but a partition a rebalance
            # assigned before its pause may: fetch those records again once resumed
            self._put_back(self.consumer.poll(timeout_ms=200))
            self.stats.paused_s += time.monotonic() - t0
            return True
        return False

    def _put_back(self, batch: dict) -> None:
        """Seek back to the first of these records, so they are fetched again, and pause their partitions."""
        if not batch:
            return
        for tp, records in batch.items():
            self.consumer.seek(tp, records[0].offset)
        self.consumer.pause(*batch)
        log.info("%d records arrived while paused; fetched again after the pause",
                 sum(len(r) for r in batch.values()))

    def handle(self, records) -> None:
        """Validate, write, enqueue, then commit offsets for one polled batch, in the caller's thread."""
        prepared = self.prepare(records)
        self.write(prepared)
        self._commit(prepared)

    def prepare(self, records) -> Prepared:
        """Validate a polled batch; dead-letter what is invalid (flushed, so it exists before the commit)."""
        events, offsets, kept, dlq = [], [], [], 0
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
            kept.append(r)
        self.stats.consumed += len(records)
        for topic, n in per_topic.items():
            metrics.EVENTS_CONSUMED.labels(topic=topic).inc(n)
        if dlq:
            self.producer.flush(timeout=30)  # the DLQ copy must exist before the offset moves past it
        return Prepared(records[0].topic, events, offsets, first, nxt, self._generation, kept)

    @staticmethod
    def parse(raw: bytes | None, max_bytes: int) -> ListingEvent | CorrectionEvent | Rejected:
        return parse_listing(raw, max_bytes)

    def write(self, prepared: Prepared) -> None:
        """Store the batch in one transaction, dead-letter the events the store refused, then enqueue.

        A permanent failure (or one of unknown kind, after MAX_REPLAYS) writes the events one at a time
        instead, so the refused ones are found without giving up the rest."""
        if not prepared.events:
            return
        conn = self._db()
        everything = range(len(prepared.events))
        try:
            with conn.transaction():
                stored = self.store(conn, prepared, everything)
        except Exception as exc:
            kind = classify(exc)
            if kind == TRANSIENT:
                raise
            attempts = self._count_failure(prepared)
            if kind != PERMANENT and attempts <= MAX_REPLAYS:
                raise
            log.warning("batch of %d events failed (%s, %s after %d attempts): writing it one event at a time",
                        len(prepared.events), type(exc).__name__, kind, attempts)
            parts, refused = one_by_one(conn, len(prepared.events), lambda i: self.store(conn, prepared, [i]))
            stored = Stored(changed=sum(p.changed for p in parts), refused=refused)
            stored.pending = list(dict.fromkeys(i for p in parts for i in p.pending))
            for part in parts:
                stored.refused.update(part.refused)
        self._forget_failures(prepared)
        for i, why in sorted(stored.refused.items()):
            self._dead_letter(prepared.records[i], why)
        if stored.refused:
            self.producer.flush(timeout=30)  # the DLQ copy must exist before the offset moves past it
        self.stats.upserted += stored.changed
        for i in range(0, len(stored.pending), self.task_batch):
            chunk = stored.pending[i:i + self.task_batch]
            self.enqueue(chunk)
            self._tasks_sent += 1
            self.stats.enqueued += len(chunk)
            metrics.LISTINGS_ENQUEUED.inc(len(chunk))

    def store(self, conn: psycopg.Connection, prepared: Prepared, which) -> Stored:
        """Write the events at these indexes of the batch, in the caller's transaction."""
        result = upsert_listings(conn, [prepared.events[i] for i in which], topic=prepared.topic,
                                 offsets=[prepared.offsets[i] for i in which])
        for lid in result.deleted:
            log.info("listing %s deleted", lid, extra={"listing_id": lid})
        return Stored(changed=len(result.changed), pending=result.pending)

    def _count_failure(self, prepared: Prepared) -> int:
        """Count one more failed write of these events (writer thread); returns the most any of them has had."""
        if len(self._attempts) > 100_000:
            self._attempts.clear()  # a bound, not a policy: at worst a few more replays
        worst = 0
        for r in prepared.records:
            key = (r.topic, r.partition, r.offset)
            self._attempts[key] = self._attempts.get(key, 0) + 1
            worst = max(worst, self._attempts[key])
        return worst

    def _forget_failures(self, prepared: Prepared) -> None:
        if self._attempts:
            for r in prepared.records:
                self._attempts.pop((r.topic, r.partition, r.offset), None)

    def _maybe_crash(self) -> None:
        if self._crash_before_commit is not None:
            self._crash_before_commit -= 1
            if self._crash_before_commit <= 0:
                log.warning("fault injection: killed after a durable write, before its offset commit")
                os.kill(os.getpid(), signal.SIGKILL)

    @staticmethod
    def _offsets(prepared: Prepared) -> dict:
        return {tp: OffsetAndMetadata(off, "", -1) for tp, off in prepared.next.items()}

    def _commit(self, prepared: Prepared) -> None:
        self.consumer.commit(self._offsets(prepared))
        self._committed.update(prepared.next)
        self.stats.batches += 1

    # -------------------------------------------------------------------------------- lag gauge
    def _report_lag(self) -> None:
        """Set enrich_intake_lag for each partition held: its end offset minus the group's committed offset."""
        if time.monotonic() - self._lag_at < LAG_CHECK_S:
            return
        self._lag_at = time.monotonic()
        held = set(self.consumer.assignment())
        self._forget_partitions(self._lag_series - held)
        if not held:
            return
        try:
            ends = self.consumer.end_offsets(sorted(held), timeout_ms=LAG_TIMEOUT_MS)
            unknown = sorted(tp for tp in held if tp not in self._committed)
            for tp in unknown:
                off = self.consumer.committed(tp, timeout_ms=LAG_TIMEOUT_MS)
                if off is not None:
                    self._committed[tp] = off
            never = [tp for tp in unknown if tp not in self._committed]  # the group never committed there
            if never:
                self._committed.update(self.consumer.beginning_offsets(never, timeout_ms=LAG_TIMEOUT_MS))
        except Exception:
            log.debug("partition offsets unknown for now; lag not updated", exc_info=True)
            return
        for tp in held:
            done = self._committed.get(tp)
            if done is None or tp not in ends:
                continue
            # the high watermark of the last fetch too: some brokers answer an end offset short of the log end,
            # and a committed offset proves the log reaches it
            end = max(ends[tp], self._highwater(tp), done)
            metrics.INTAKE_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(end - done)
            self._lag_series.add(tp)

    def _highwater(self, tp: TopicPartition) -> int:
        try:
            return self.consumer.highwater(tp) or 0
        except Exception:
            return 0

    def _forget_partitions(self, partitions, keep_lag: bool = False) -> None:
        """Drop what is known of these partitions' offsets, and (unless keep_lag) their lag series."""
        for tp in partitions:
            self._committed.pop(tp, None)
            if not keep_lag and tp in self._lag_series:
                self._lag_series.discard(tp)
                try:
                    metrics.INTAKE_LAG.remove(tp.topic, str(tp.partition))
                except KeyError:
                    pass

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
            except Exception as exc:
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
                report = self._done.get_nowait()
            except queue.Empty:
                return
            done = self._settled(*report)
            if done is not None:
                try:
                    self._commit(done)
                except Exception:
                    log.warning("offset commit failed; those events will be replayed", exc_info=True)

    def _settled(self, prepared: Prepared, exc: BaseException | None, written: bool) -> Prepared | None:
        """Take one report of the writer: the batch whose offsets are to be committed now, if any."""
        self._inflight.popleft()  # reports come back in hand-over order
        if prepared.generation != self._generation:
            return None  # dropped after a rewind; replayed already
        if written:
            self._maybe_crash()
            return prepared
        if exc is not None:
            log.error("batch of %d events failed; rewinding to replay it and %d later batches",
                      len(prepared.offsets), len(self._inflight), exc_info=exc)
            self._failed_batches([prepared, *self._inflight])
        return None

    async def _finish_inflight(self) -> None:
        """Wait for the writer to finish the batches handed over, and commit them (in the client's network loop,
        before a rebalance moves their partitions)."""
        deadline = time.monotonic() + HANDOVER_WAIT_S
        while self._inflight:
            left = deadline - time.monotonic()
            try:
                # blocks the client's loop for one batch write at most: the group is rebalancing anyway
                report = self._done.get(timeout=max(left, 0.001))
            except queue.Empty:
                log.warning("%d batches still being written at a rebalance: the partitions' next owner may "
                            "replay them", len(self._inflight))
                return
            done = self._settled(*report)
            if done is not None:
                try:
                    await self.consumer.commit_async(self._offsets(done))
                    self._committed.update(done.next)
                    self.stats.batches += 1
                except Exception:
                    log.warning("offset commit before a rebalance failed; those events will be replayed",
                                exc_info=True)

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
        metrics.DEAD_LETTERS.labels(reason=why.reason).inc()
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
            except Exception:
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
        except Exception:
            log.warning("DLQ producer did not close cleanly", exc_info=True)
        self.consumer.close(autocommit=False)
        self._reset_db()
        log.info("intake stopped: %s", self.stats)


class CorrectionsIntake(Intake):
    """Corrections topic: CorrectionEvent → corrections table + listing_tags source=corrected."""

    def __init__(self, settings: Settings, conn_factory: Callable[[], psycopg.Connection], consumer=None,
                 producer=None, poll_timeout_ms: int = 500) -> None:
        consumer = consumer or make_consumer(settings, settings.corrections_topic,
                                             settings.consumer_group + "-corrections")
        super().__init__(settings, conn_factory, enqueue=lambda ids: None, consumer=consumer, producer=producer,
                         poll_timeout_ms=poll_timeout_ms)
        self.dlq_topic = settings.corrections_topic + ".dlq"
        self._warned_no_taxonomy = False

    @staticmethod
    def parse(raw: bytes | None, max_bytes: int) -> CorrectionEvent | Rejected:
        return parse_correction(raw, max_bytes)

    def store(self, conn: psycopg.Connection, prepared: Prepared, which) -> Stored:
        """Record the corrections at these indexes; refuse those to an unknown listing, or to a group or value
        the active model's taxonomy does not have (they would become wrong training labels)."""
        events = {i: prepared.events[i] for i in which}
        known = known_listings(conn, [ev.listing_id for ev in events.values()])
        taxonomy = taxonomy_of(conn)
        if taxonomy is None and not self._warned_no_taxonomy:
            log.warning("no active model: correction groups and values are not checked against a taxonomy")
            self._warned_no_taxonomy = True
        stored = Stored()
        for i, ev in events.items():
            why = correction_refusal(ev, known, taxonomy)
            if why is not None:
                stored.refused[i] = why
            else:
                stored.changed += record_correction(conn, ev)
        return stored


def correction_refusal(ev: CorrectionEvent, known: set[str], taxonomy) -> Rejected | None:
    """Why a correction cannot be taken (None: it can)."""
    if ev.listing_id not in known:
        return Rejected("unknown_listing", f"no listing {ev.listing_id!r}")
    if taxonomy is None:
        return None
    values = taxonomy.values_of(ev.group)
    if values is None:
        return Rejected("unknown_group", f"{ev.group!r} is not a group of taxonomy {taxonomy.name!r} "
                                         f"v{taxonomy.version}; groups: {', '.join(taxonomy.all_groups)}")
    if ev.new_value not in values:
        return Rejected("unknown_value", f"{ev.new_value!r} is not a value of {ev.group!r} in taxonomy "
                                         f"{taxonomy.name!r} v{taxonomy.version}")
    return None
