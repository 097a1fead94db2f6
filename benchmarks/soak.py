"""Soak: a steady producer for N minutes with seeded random faults, every process supervised.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--rate EV_PER_S] [--seed 1] [--fault-every 75]
                                        [--faults worker_kill,postgres_crash,...] [--out benchmarks/results/soak]

Run from anywhere (it puts the repository root on sys.path, as benchmarks/intake_throughput.py does) and
uses the fault suite's harness, harness/cluster.py, as is.

What runs (all private to this script, so it never disturbs other work on the machine):
  Postgres 15 (initdb on a free port, fsync off), a RabbitMQ node, Tansu (Kafka protocol, in memory) and
  moto (S3, serving a handful of real PNG/JPEG images from its first request after every start); a small
  real model (harness/models.py's save_small_model: the fault suite's small CNN, 32 px); a topic of
  4 partitions; `enrich consume` x2 (one group) and `enrich worker` x1 (solo pool, 1 torch thread).

Phases
  1. capacity: a burst of --burst good events produced at once; capacity = the slope of the enriched count
     between 10 % and 90 % of the burst (events/s, the worker being the bottleneck). --rate defaults to half
     of it. The burst's events count in the outcome (they must be enriched once too), not in the latency.
  2. soak: a producer thread sends good events at --rate for --minutes (a poison event after every
     --poison-every good ones, kinds cycling through the fault suite's SPRINKLE), each event carrying its
     produce time in its title. Meanwhile a fault thread injects faults at seeded random intervals
     (exponential gaps, mean --fault-every s, counted from the end of the previous fault; kinds in seeded
     shuffled rounds, so every kind comes up equally often), and the supervisor (main thread) restarts any
     `enrich consume` / `enrich worker` that exited, --restart-delay s later, as systemd or Kubernetes would.
     A sampler thread records every --sample-every s: consumer lag (sum over partitions of the end offset
     minus the group's committed offset), GPU queue depth, enriched / pending / failed counts, each
     process's RSS (psutil, the process and its children) and whether each consumer is paused.
  3. drain: faults stop with the producer; wait (bounded by --drain-timeout, or --stall s without progress)
     until every good listing is settled and the lag is 0. If listings are still pending then, one
     `enrich sweep --older-than 0` runs (what beat would do after ENRICH_PENDING_SWEEP_AFTER_S) and the
     wait repeats; the summary says how many needed it.
  4. outcome: cluster.outcome() (produced / enriched / dead-lettered / lost / doubled / pending from Postgres,
     its audit triggers and the DLQ topic), p50/p99 latency, lag and RSS figures, faults by kind; printed as
     a table and written to <out>/summary.json, <out>/samples.csv and <out>/soak.png.

Faults (--faults, default all; the numbers mark their code below):
  worker_kill                   (1) `enrich worker` kill -9 while its log says it is inside a task
  consumer_crash_before_commit  (2) a consumer stopped cleanly and started again with
                                    ENRICH_TEST_CRASH_BEFORE_COMMIT=N (N 1..3): it SIGKILLs itself after its
                                    Nth durably written batch, before the offset commit; then restarted plainly
  consumer_peer_kill            (3) one of the two consumers kill -9 while the other flows, or (every other
                                    time) while the other is paused for backpressure (the worker is SIGSTOPped
                                    until the survivor pauses, and SIGCONTed once the group has rebalanced);
                                    the killed one stays down 10-30 s so the survivor runs alone
  postgres_crash                (4) `pg_ctl -m immediate stop`, down 2-8 s, start (crash recovery)
  rabbit_kill                   (5) RabbitMQ node kill -9, down 1-5 s, restart on the same mnesia
  kafka_hang                    (6) Tansu SIGSTOP for --hang-s (30) s, then SIGCONT
  s3_down                       (7) the image host (moto) killed, down 10-20 s (longer than the retries at
                                    +1, +2, +4 s), started again
  poison_burst                  (8) one poison event of every kind (cluster.LISTING_POISON, the database
                                    refusals included) among the good ones; all must reach the DLQ

Figures and how they are defined
  latency   event → row: the produce time carried in the event (taken just before KafkaProducer.send) to
            listings.updated_at of the row in status 'enriched' (set by the worker's write transaction; now()
            is that transaction's start, a few ms before its commit). Soak-phase events only. "quiet" latency
            leaves out events produced from 10 s before a fault to 60 s after it.
  RSS       every process incarnation is its own series (a restarted process starts a new one). Warm-up =
            the first --warmup s (default 300, at most a sixth of the run) of each incarnation. An
            incarnation that lived at least --min-judged s past its warm-up is judged: growth = (RSS at its
            last sample - RSS at its first sample after warm-up) / the latter; the verdict holds when every
            judged incarnation grew <= 10 %. Start/end per process = first incarnation's first sample,
            last incarnation's last sample.
  lag       events: sum over the 4 partitions of (end offset - committed offset of the group).
It prints `lscpu | head` with the figures: compare only figures measured on one machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # cluster.Stack starts its processes with cwd=ROOT; relative --out paths are from here too

from harness import cluster  # noqa: E402 - after the path insert
from harness.models import save_small_model  # noqa: E402 - after the path insert

FAULT_KINDS = ("worker_kill", "consumer_crash_before_commit", "consumer_peer_kill", "postgres_crash",
               "rabbit_kill", "kafka_hang", "s3_down", "poison_burst")
CONSUMED = "enrich_events_consumed_total"
PAUSED = "enrich_intake_paused"


def now() -> float:
    return time.time()


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def lscpu_head() -> str:
    try:
        return subprocess.run("lscpu | head -20", shell=True, capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return ""


def cpu_model(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "?"


def tail_bytes(path: Path, n: int = 8192) -> str:
    """The last n bytes of a log (cheap enough to poll every few ms, unlike reading it whole)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def worker_mid_task(log_path: Path) -> bool:
    """cluster.worker_mid_task on the log's tail only: the last enrichment task line says 'received'."""
    lines = [ln for ln in tail_bytes(log_path, 4096).splitlines() if "enrich.listings[" in ln]
    return bool(lines) and lines[-1].rstrip().endswith("received")


def rss_mib(pid: int) -> float | None:
    """RSS of a process and its children (MiB): psutil where installed, else (or if it fails) /proc/<pid>/status
    VmRSS of the process alone. None: the process is gone."""
    try:
        import psutil

        p = psutil.Process(pid)
        total = p.memory_info().rss
        try:
            for c in p.children(recursive=True):
                try:
                    total += c.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return total / 2**20
    except Exception:
        pass
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# ------------------------------------------------------------------------------------------------ supervisor
@dataclass
class Slot:
    """One supervised process role (consume-a, consume-b, worker): its current incarnation and history."""

    name: str
    role: str                      # "consumer" or "worker"
    proc: cluster.Proc | None = None
    incarnation: int = 0
    started_at: float = 0.0
    arm: int | None = None         # next start gets ENRICH_TEST_CRASH_BEFORE_COMMIT=arm
    armed: int | None = None       # this incarnation's arm
    hold_until: float = 0.0        # not restarted before this (a fault keeps it down)
    expect_exit: str | None = None  # a fault is about to stop it: its exit is planned
    died_at: float | None = None
    exits: list = field(default_factory=list)


class Supervisor:
    def __init__(self, stack: cluster.Stack, restart_delay: float) -> None:
        self.stack = stack
        self.restart_delay = restart_delay
        self.slots: list[Slot] = []
        self.lock = threading.RLock()
        self.unplanned: list[dict] = []
        self.current_fault: dict | None = None   # set by the fault thread while a fault runs
        self.starts: dict[tuple[str, int], float] = {}  # (slot, incarnation) → start time
        self.t0 = now()

    def add(self, name: str, role: str) -> Slot:
        slot = Slot(name, role)
        self.slots.append(slot)
        self.start(slot)
        return slot

    def start(self, slot: Slot) -> None:
        settings = {}
        slot.armed = None
        if slot.arm is not None:
            settings["test_crash_before_commit"] = slot.arm
            slot.armed, slot.arm = slot.arm, None
        if slot.role == "consumer":
            slot.proc = self.stack.consumer(slot.name, **settings)
        else:
            slot.proc = self.stack.worker(slot.name, **settings)
        slot.incarnation += 1
        slot.started_at = now()
        self.starts[(slot.name, slot.incarnation)] = slot.started_at
        slot.died_at = None
        slot.expect_exit = None
        log(f"started {slot.name}#{slot.incarnation} pid {slot.proc.pid}"
            + (f" (armed: crash before commit after batch {slot.armed})" if slot.armed else ""))

    def consumers(self) -> list[Slot]:
        return [s for s in self.slots if s.role == "consumer"]

    def worker(self) -> Slot:
        return next(s for s in self.slots if s.role == "worker")

    def tick(self) -> None:
        """Restart what died (after restart_delay and any hold), noting why it died."""
        with self.lock:
            for slot in self.slots:
                if slot.proc is None or slot.proc.alive:
                    continue
                t = now()
                if slot.died_at is None:
                    slot.died_at = t
                    rc = slot.proc.returncode
                    planned = slot.expect_exit
                    if slot.armed and rc == -signal.SIGKILL:
                        planned = f"crash before commit after batch {slot.armed}"
                        self.on_armed_crash(slot, t)
                    record = {"t": t, "slot": slot.name, "incarnation": slot.incarnation, "rc": rc,
                              "lived_s": round(t - slot.started_at, 1), "planned": planned}
                    slot.exits.append(record)
                    if planned is None:
                        record["during_fault"] = (self.current_fault or {}).get("kind")
                        record["log_tail"] = slot.proc.tail(15)
                        self.unplanned.append(record)
                        log(f"UNPLANNED exit of {slot.name}#{slot.incarnation} rc={rc} after "
                            f"{record['lived_s']} s (during fault: {record['during_fault']})\n"
                            + "\n".join("    " + ln for ln in record["log_tail"].splitlines()[-6:]))
                    else:
                        log(f"{slot.name}#{slot.incarnation} exited rc={rc} ({planned})")
                if t >= max(slot.died_at + self.restart_delay, slot.hold_until):
                    self.start(slot)

    on_armed_crash = staticmethod(lambda slot, t: None)  # replaced by the fault injector

    def rss(self) -> dict[str, tuple[int, float | None]]:
        with self.lock:
            return {s.name: (s.incarnation, rss_mib(s.proc.pid) if s.proc and s.proc.alive else None)
                    for s in self.slots}


# ------------------------------------------------------------------------------------------------ producer
class Producer(threading.Thread):
    """Good events at a fixed rate (each carrying its produce time), a poison event every `poison_every`
    good ones, extra poison handed over by the fault thread. Failed sends are sent again (same bytes)."""

    def __init__(self, bootstrap: str, topic: str, uris: list[str], prefix: str) -> None:
        super().__init__(name="producer", daemon=True)
        from kafka import KafkaProducer

        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                      client_id="soak-producer", max_request_size=4 * 1024 * 1024,
                                      delivery_timeout_ms=300_000)
        self.topic, self.uris, self.prefix = topic, uris, prefix
        self.lock = threading.Lock()
        self.sent_at: dict[str, float] = {}      # good key → produce time (the time in its title)
        self.acked: set[str] = set()             # good keys the broker acknowledged
        self.poison: dict[str, str] = {}         # poison key → expected dlq_reason (acked ones)
        self.poison_sent_at: dict[str, float] = {}
        self.failed_sends = 0
        self.extra: list[tuple[str, bytes | None, str]] = []   # (key, value, expected reason) from faults
        self._retry: list[tuple[str, bytes | None, str | None]] = []
        self._halt = threading.Event()
        self.seq = 0
        self.rate = 0.0
        self.duration = 0.0
        self.poison_every = 0
        self.error: str | None = None

    # -- sending
    def _send(self, key: str, value: bytes | None, reason: str | None) -> None:
        def ok(_meta, key=key, reason=reason):
            with self.lock:
                if reason is None:
                    self.acked.add(key)
                else:
                    self.poison[key] = reason

        def err(exc, key=key, value=value, reason=reason):
            with self.lock:
                self.failed_sends += 1
                self._retry.append((key, value, reason))

        self.producer.send(self.topic, key=key.encode(), value=value).add_callback(ok).add_errback(err)

    def good(self, n: int, prefix: str | None = None) -> list[str]:
        """Send n good events now (the capacity burst); returns their keys."""
        keys = []
        for _ in range(n):
            keys.append(self._good(prefix or self.prefix))
        self.producer.flush(120)
        return keys

    def _good(self, prefix: str) -> str:
        i = self.seq
        self.seq += 1
        key = f"{prefix}-{i:07d}"
        t = now()
        value = cluster.encode(cluster.listing_event(key, [self.uris[i % len(self.uris)]],
                                                     title=f"soak {key} produced_at={t:.6f}"))
        with self.lock:
            self.sent_at[key] = t
        self._send(key, value, None)
        return key

    def add_poison(self, kinds) -> list[str]:
        keys = []
        with self.lock:
            for kind in kinds:
                key = f"{self.prefix}-poison-{kind}-{uuid.uuid4().hex[:8]}"
                self.extra.append((key, cluster.poison_listing(kind, key, self.uris[0]),
                                   cluster.LISTING_POISON[kind]))
                keys.append(key)
        return keys

    def start_soak(self, rate: float, duration: float, poison_every: int) -> None:
        self.rate, self.duration, self.poison_every = rate, duration, poison_every
        self.start()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            self.error = traceback.format_exc()
            log(f"PRODUCER FAILED:\n{self.error}")

    def _run(self) -> None:
        t0 = now()
        i = 0
        n_poison = 0
        while not self._halt.is_set():
            target = t0 + i / self.rate
            if target - t0 >= self.duration:
                break
            delay = target - now()
            if delay > 0:
                time.sleep(min(delay, 0.5))
                continue
            self._good(self.prefix)
            i += 1
            if self.poison_every and i % self.poison_every == 0:
                kind = cluster.SPRINKLE[n_poison % len(cluster.SPRINKLE)]
                n_poison += 1
                key = f"{self.prefix}-poison-{kind}-{i:07d}"
                with self.lock:
                    self.poison_sent_at[key] = now()
                self._send(key, cluster.poison_listing(kind, key, self.uris[0]), cluster.LISTING_POISON[kind])
            with self.lock:
                extra, self.extra = self.extra, []
                retry, self._retry = self._retry, []
            for key, value, reason in extra:
                self.poison_sent_at[key] = now()
                self._send(key, value, reason)
            for key, value, reason in retry:
                self._send(key, value, reason)
        self.flush_all()

    def flush_all(self, timeout: float = 600.0) -> None:
        """Flush, sending again whatever failed, until everything is acknowledged (bounded)."""
        deadline = now() + timeout
        while True:
            with self.lock:
                extra, self.extra = self.extra, []
                retry, self._retry = self._retry, []
            for key, value, reason in extra + retry:
                self._send(key, value, reason)
            try:
                self.producer.flush(60)
            except Exception as exc:
                log(f"producer flush: {exc!r}")
            with self.lock:
                if not self._retry and not self.extra:
                    return
            if now() > deadline:
                log("producer: giving up on unacknowledged sends")
                return
            time.sleep(1)

    def close(self) -> None:
        try:
            self.producer.close(10)
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------ sampler
class Sampler(threading.Thread):
    """Every `every` s: lag, queue depth, enriched/pending/failed, RSS per process, consumers paused."""

    def __init__(self, stack: cluster.Stack, sup: Supervisor, every: float) -> None:
        super().__init__(name="sampler", daemon=True)
        self.stack, self.sup, self.every = stack, sup, every
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self._consumer = None
        self._admin = None
        self._tps: list = []
        self._positions: dict[int, int] = {}

    def stop(self) -> None:
        self._halt.set()

    def _clients(self):
        from kafka import KafkaConsumer
        from kafka.admin import KafkaAdminClient
        from kafka.structs import TopicPartition

        if self._consumer is None:
            consumer = KafkaConsumer(bootstrap_servers=self.stack.kafka, group_id=None, enable_auto_commit=False,
                                     client_id="soak-lag", request_timeout_ms=4000, max_poll_records=20000)
            parts = consumer.partitions_for_topic(self.stack.topic) or set()
            if not parts:
                consumer.close()
                raise RuntimeError("topic has no partitions yet")
            self._tps = [TopicPartition(self.stack.topic, p) for p in sorted(parts)]
            consumer.assign(self._tps)
            for tp in self._tps:  # where the previous tail reader had got to (a new one after a broker hang)
                consumer.seek(tp, self._positions.get(tp.partition, 0))
            self._consumer = consumer
        if self._admin is None:
            self._admin = KafkaAdminClient(bootstrap_servers=self.stack.kafka, client_id="soak-lag-admin",
                                           request_timeout_ms=4000)
        return self._consumer, self._admin

    def _drop_clients(self) -> None:
        for c in (self._consumer, self._admin):
            try:
                if c is not None:
                    c.close()
            except Exception:
                pass
        self._consumer = self._admin = None

    def end_offsets(self, consumer) -> dict[int, int]:
        """partition → true end offset. Tansu 0.6 answers ListOffsets(latest) (KafkaConsumer.end_offsets) with less
        than the log end after a multi-record batch (seen: 4,838 against 5,110 records), so this tails the topic
        and takes its position, or the high watermark of the last fetch response, whichever is further. Caught up
        with the last fetch's high watermark ends the tail: under steady production a quiet poll never comes."""
        for _ in range(50):
            consumer.poll(timeout_ms=100)
            if all(consumer.position(tp) >= (consumer.highwater(tp) or 0) for tp in self._tps):
                break
        out = {}
        for tp in self._tps:
            pos = consumer.position(tp)
            self._positions[tp.partition] = pos
            out[tp.partition] = max(pos, consumer.highwater(tp) or 0)
        return out

    def lag(self) -> tuple[int | None, int | None, int | None]:
        """(lag, end offsets sum, committed sum) of the group over the topic's partitions."""
        try:
            consumer, admin = self._clients()
            # the end first: read after the committed offsets, the events produced while the tail is read
            # would count as lag
            end = self.end_offsets(consumer)
            got = admin.list_group_offsets(self.stack.group).get(self.stack.group, {})
            committed = {tp.partition: om.offset for tp, om in got.items()
                         if tp.topic == self.stack.topic and om.offset >= 0}
            # a committed offset proves the log reaches it (produced and committed after the end was read)
            end = {p: max(e, committed.get(p, 0)) for p, e in end.items()}
            end_sum = sum(end.values())
            com_sum = sum(committed.get(p, 0) for p in end)
            return end_sum - com_sum, end_sum, com_sum
        except Exception:
            self._drop_clients()
            return None, None, None

    def db_counts(self) -> dict:
        import psycopg

        try:
            with psycopg.connect(self.stack.pg_url, autocommit=True, connect_timeout=3) as conn:
                rows = conn.execute("SELECT status, count(*) FROM listings GROUP BY status").fetchall()
            return dict(rows)
        except Exception:
            return {}

    def sample(self) -> dict:
        t = now()
        rss = self.sup.rss()  # first: the lag below can take seconds while the broker is hung
        lag, end, com = self.lag()
        try:
            depth = cluster.queue_depth(self.stack.amqp, self.stack.queue)
        except Exception:
            depth = None
        counts = self.db_counts()
        s = {"t": t, "lag": lag, "end": end, "committed": com, "queue_depth": depth,
             "enriched": counts.get("enriched") if counts else None,
             "pending": counts.get("pending") if counts else None,
             "failed": counts.get("failed") if counts else None}
        for name, (inc, mib) in rss.items():
            s[f"rss:{name}"] = mib
            s[f"inc:{name}"] = inc
        for slot in self.sup.consumers():
            p = slot.proc
            s[f"paused:{slot.name}"] = p.metric(PAUSED) if p is not None and p.alive else None
        return s

    def run(self) -> None:
        while not self._halt.is_set():
            t = now()
            try:
                self.samples.append(self.sample())
            except Exception:
                log(f"sampler: {traceback.format_exc(limit=2)}")
            self._halt.wait(max(0.0, self.every - (now() - t)))
        self._drop_clients()


# ------------------------------------------------------------------------------------------------ faults
def bring_back(start, what: str, tries: int = 4) -> int:
    """Start a service again, retrying (a failed start would stall the rest of the run); returns the tries used."""
    for attempt in range(1, tries + 1):
        try:
            start()
            return attempt
        except Exception as exc:
            log(f"{what} did not start (try {attempt}): {exc!r}")
            if attempt == tries:
                raise
            time.sleep(3)
    return tries


class Faults(threading.Thread):
    def __init__(self, args, rng: random.Random, sup: Supervisor, producer: Producer, pg, rabbit, kafka, s3,
                 kinds: list[str]) -> None:
        super().__init__(name="faults", daemon=True)
        self.args, self.rng, self.sup, self.producer = args, rng, sup, producer
        self.pg, self.rabbit, self.kafka, self.s3 = pg, rabbit, kafka, s3
        self.kinds = kinds
        self.log: list[dict] = []
        self._halt = threading.Event()
        self._round: list[str] = []
        self._peer_variant = 0
        self.error: str | None = None
        sup.on_armed_crash = self._armed_crash

    def stop(self) -> None:
        self._halt.set()

    def _armed_crash(self, slot: Slot, t: float) -> None:
        for rec in reversed(self.log):
            if (rec["kind"] == "consumer_crash_before_commit" and rec.get("slot") == slot.name
                    and "crashed_at" not in rec and "end" in rec and t >= rec["start"]):  # after the fault ended
                rec["crashed_at"] = t
                rec["note"] += f"; it SIGKILLed itself {t - rec['start']:.1f} s after the fault began"
                break

    def next_kind(self) -> str:
        if not self._round:
            self._round = list(self.kinds)
            self.rng.shuffle(self._round)
        return self._round.pop()

    def run(self) -> None:
        try:
            while True:
                gap = self.rng.expovariate(1.0 / self.args.fault_every)
                if self._halt.wait(gap):
                    return
                kind = self.next_kind()
                rec = {"kind": kind, "start": now(), "note": ""}
                self.log.append(rec)
                self.sup.current_fault = rec
                log(f"FAULT {len(self.log)}: {kind}")
                try:
                    getattr(self, kind)(rec)
                except Exception:
                    rec["error"] = traceback.format_exc(limit=4)
                    log(f"fault {kind} failed: {rec['error']}")
                finally:
                    rec["end"] = now()
                    self.sup.current_fault = None
                    log(f"FAULT {len(self.log)} done: {kind} ({rec['end'] - rec['start']:.1f} s) {rec['note']}")
        except Exception:
            self.error = traceback.format_exc()

    # (1)
    def worker_kill(self, rec: dict) -> None:
        slot = self.sup.worker()
        deadline = now() + 30
        while now() < deadline:
            p = slot.proc
            if p is not None and p.alive and worker_mid_task(p.log):
                break
            time.sleep(0.01)
        with self.sup.lock:
            p = slot.proc
            if p is None or not p.alive:
                rec["note"] = "worker not running: nothing killed"
                return
            mid = worker_mid_task(p.log)
            slot.expect_exit = "fault: worker kill -9" + (" mid-task" if mid else " (idle)")
            p.kill9()
        rec["note"] = (f"killed {slot.name}#{slot.incarnation} "
                       + ("mid-task" if mid else "while idle (no task in 30 s)"))
        rec["slot"] = slot.name

    # (2)
    def consumer_crash_before_commit(self, rec: dict) -> None:
        slot = self.rng.choice(self.sup.consumers())
        n = self.rng.randint(1, 3)
        with self.sup.lock:
            slot.arm = n
            slot.expect_exit = "fault: clean stop before an armed restart"
            p = slot.proc
            inc0 = slot.incarnation
        if p is not None and p.alive:
            p.terminate(30)
        rec["slot"] = slot.name
        rec["note"] = f"{slot.name} restarted with ENRICH_TEST_CRASH_BEFORE_COMMIT={n}"

        def crashed() -> list:
            return [e for e in slot.exits if e["incarnation"] > inc0 and e["planned"]
                    and "crash before commit" in e["planned"]]

        # the fault lasts until the armed incarnation has killed itself and the supervisor has seen it (bounded)
        deadline = now() + 120
        while now() < deadline and not self._halt.is_set():
            with self.sup.lock:
                if crashed():
                    break
            time.sleep(0.2)
        with self.sup.lock:
            done = crashed()
            if done:
                rec["crashed_at"] = done[-1]["t"]
                rec["note"] += f"; it SIGKILLed itself {done[-1]['t'] - rec['start']:.1f} s after the fault began"
            else:
                rec["note"] += "; it had not crashed when the fault ended (see exits)"

    # (3)
    def consumer_peer_kill(self, rec: dict) -> None:
        victim, survivor = self.rng.sample(self.sup.consumers(), 2)
        variant = "paused" if self._peer_variant % 2 else "flowing"
        self._peer_variant += 1
        worker = self.sup.worker()
        stopped = None
        if variant == "paused":
            # hold the worker, so the GPU queue fills and the survivor pauses for backpressure
            with self.sup.lock:
                if worker.proc is not None and worker.proc.alive:
                    stopped = worker.proc
                    os.kill(stopped.pid, signal.SIGSTOP)
        want = 1 if variant == "paused" else 0
        deadline = now() + 60
        state = None
        while now() < deadline:
            p = survivor.proc
            state = p.metric(PAUSED) if p is not None and p.alive else None
            if state == want:
                break
            time.sleep(0.2)
        try:
            with self.sup.lock:
                victim.hold_until = now() + self.rng.uniform(10, 30)
                victim.expect_exit = "fault: peer kill -9"
                if victim.proc is not None and victim.proc.alive:
                    victim.proc.kill9()
            rec["slot"] = victim.name
            rec["note"] = (f"killed {victim.name}; {survivor.name} {variant} (paused metric {state}); "
                           f"{victim.name} held down {victim.hold_until - now():.0f} s")
            if stopped is not None:
                # keep the worker held until the survivor has the victim's partitions (session timeout 6 s)
                deadline = now() + 20
                while now() < deadline:
                    try:
                        if cluster.group_members(self.sup.stack.kafka, self.sup.stack.group) == ("Stable", 1):
                            break
                    except Exception:
                        pass
                    time.sleep(0.5)
                paused = survivor.proc.metric(PAUSED) if survivor.proc else None
                rec["note"] += f"; survivor paused {paused} after the rebalance"
        finally:
            if stopped is not None:
                try:
                    os.kill(stopped.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        # the fault lasts until the victim is back
        while now() < victim.hold_until + self.args.restart_delay + 2 and not self._halt.is_set():
            time.sleep(0.5)

    # (4)
    def postgres_crash(self, rec: dict) -> None:
        down = self.rng.uniform(2, 8)
        self.pg.crash()
        time.sleep(down)
        bring_back(self.pg.start, "Postgres")
        rec["note"] = f"down {down:.1f} s"

    # (5)
    def rabbit_kill(self, rec: dict) -> None:
        down = self.rng.uniform(1, 5)
        self.rabbit.kill9()
        t = now()
        time.sleep(down)
        bring_back(self.rabbit.start, "RabbitMQ")
        rec["note"] = f"down {now() - t:.1f} s (restart included)"

    # (6)
    def kafka_hang(self, rec: dict) -> None:
        self.kafka.hang(self.args.hang_s)
        rec["note"] = f"SIGSTOP {self.args.hang_s:.0f} s"

    # (7)
    def s3_down(self, rec: dict) -> None:
        down = self.rng.uniform(10, 20)
        self.s3.kill9()
        t = now()
        time.sleep(down)
        bring_back(self.s3.start, "moto")
        rec["note"] = f"down {now() - t:.1f} s"

    # (8)
    def poison_burst(self, rec: dict) -> None:
        keys = self.producer.add_poison(list(cluster.LISTING_POISON))
        rec["note"] = f"{len(keys)} poison events, one of each kind"
        rec["keys"] = keys


# ------------------------------------------------------------------------------------------------ analysis
def enriched_times(pg_url: str, ids: list[str]) -> dict[str, float]:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute("SELECT listing_id, extract(epoch FROM updated_at) FROM listings"
                            " WHERE status = 'enriched' AND listing_id = ANY(%s)", (ids,)).fetchall()
    return {r[0]: float(r[1]) for r in rows}


def fault_context(t: float, faults: list[dict]) -> dict:
    """The last fault that began before t, and the first one after."""
    before = [f for f in faults if f["start"] <= t]
    after = [f for f in faults if f["start"] > t]
    out = {}
    if before:
        out["fault_before"] = {"n": faults.index(before[-1]) + 1, "kind": before[-1]["kind"],
                               "seconds_before": round(t - before[-1]["start"], 1)}
    if after:
        out["fault_after"] = {"n": faults.index(after[0]) + 1, "kind": after[0]["kind"],
                              "seconds_after": round(after[0]["start"] - t, 1)}
    return out


def investigate(pg_url: str, ids: list[str], sent_at: dict[str, float], faults: list[dict], logs: list[Path],
                limit: int = 50) -> list[dict]:
    """What Postgres and the logs say about these listings (lost, pending or doubled ones)."""
    import psycopg

    out = []
    with psycopg.connect(pg_url, autocommit=True, connect_timeout=10) as conn:
        for lid in ids[:limit]:
            row = conn.execute("SELECT status, error, extract(epoch FROM received_at), extract(epoch FROM updated_at),"
                               " enriched_hash IS NOT DISTINCT FROM content_hash FROM listings WHERE listing_id = %s",
                               (lid,)).fetchone()
            ev = conn.execute("SELECT event_id, kafka_partition, kafka_offset, extract(epoch FROM processed_at)"
                              " FROM processed_events WHERE event_id LIKE %s", (lid + ":%",)).fetchall()
            writes = conn.execute("SELECT what, tag_group, extract(epoch FROM at) FROM fault_writes"
                                  " WHERE listing_id = %s ORDER BY at", (lid,)).fetchall()
            t = sent_at.get(lid)
            info = {"listing_id": lid, "produced_at": t,
                    "row": None if row is None else {"status": row[0], "error": row[1], "received_at": row[2],
                                                     "updated_at": row[3], "current": row[4]},
                    "processed_events": [{"event_id": e[0], "partition": e[1], "offset": e[2], "at": e[3]} for e in ev],
                    "writes": [{"what": w[0], "group": w[1], "at": float(w[2])} for w in writes]}
            if t is not None:
                info.update(fault_context(t, faults))
            if len(writes) > 1:
                info["second_write_context"] = fault_context(float(writes[-1][2]), faults)
            info["log_lines"] = {}
            for path in logs:
                try:
                    hits = [ln for ln in path.read_text(errors="replace").splitlines() if lid in ln][:6]
                except OSError:
                    hits = []
                if hits:
                    info["log_lines"][path.name] = hits
            out.append(info)
    return out


def rss_series(samples: list[dict], slots: list[Slot]) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """slot → incarnation → [(t, MiB)]."""
    out: dict[str, dict[int, list]] = {}
    for slot in slots:
        series: dict[int, list] = {}
        for s in samples:
            rss = s.get(f"rss:{slot.name}")
            if rss is not None:
                series.setdefault(s[f"inc:{slot.name}"], []).append((s["t"], rss))
        out[slot.name] = series
    return out


def rss_verdict(series, starts: dict[tuple[str, int], float], warmup: float, min_judged: float, t_soak: float,
                limit_pct: float = 10.0) -> dict:
    """Per slot: RSS at the soak's start (first sample from t_soak on: the processes have loaded their model and
    run the capacity burst) and at the end (last sample); per incarnation: growth after its warm-up."""
    judged, per_slot = [], {}
    for name, incs in series.items():
        incs_sorted = sorted(incs)
        pts = [p for inc in incs_sorted for p in incs[inc]]
        first = next((p for p in pts if p[0] >= t_soak), None)
        last = pts[-1] if pts else None
        per_slot[name] = {"start_mib": round(first[1], 1) if first else None,
                          "end_mib": round(last[1], 1) if last else None,
                          "incarnations": len(incs), "judged": []}
        for inc in incs_sorted:
            pts = incs[inc]
            born = starts.get((name, inc), pts[0][0])
            after = [(t, r) for t, r in pts if t - born >= warmup]
            entry = {"incarnation": inc, "lived_s": round(pts[-1][0] - born), "first_mib": round(pts[0][1], 1),
                     "last_mib": round(pts[-1][1], 1), "peak_mib": round(max(r for _, r in pts), 1)}
            if after and after[-1][0] - after[0][0] >= min_judged:
                base, end = after[0][1], after[-1][1]
                entry.update(after_warmup_mib=round(base, 1), judged_span_s=round(after[-1][0] - after[0][0]),
                             growth_pct=round(100 * (end - base) / base, 2))
                judged.append((name, inc, entry["growth_pct"]))
            per_slot[name]["judged"].append(entry)
    worst = max((g for _, _, g in judged), default=None)
    return {"per_slot": per_slot, "judged": len(judged), "worst_growth_pct": worst,
            "ok": (worst is not None and worst <= limit_pct), "warmup_s": warmup, "min_judged_s": min_judged}


def plot(path: Path, samples: list[dict], faults: list[dict], names: list[str], t_soak: float, title: str) -> None:
    """Lag and GPU queue, RSS per process (a new line per incarnation), enriched vs. produced; faults shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def m(t):
        return (t - t_soak) / 60

    def col(key):
        return [s[key] if s.get(key) is not None else float("nan") for s in samples]

    fig, axes = plt.subplots(3, 1, figsize=(13, 11), sharex=True)
    ts = [m(s["t"]) for s in samples]
    ax = axes[0]
    ax.plot(ts, col("lag"), lw=1, label="consumer lag (events, left; gaps: the broker did not answer)")
    ax.set_ylabel("lag (events)")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    q = ax.twinx()
    q.plot(ts, col("queue_depth"), lw=1, alpha=0.6, color="tab:orange", label="GPU queue depth (tasks, right)")
    q.set_ylabel("queued tasks")
    q.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    qlines = q.get_legend_handles_labels()
    ax.legend(lines[0] + qlines[0], lines[1] + qlines[1], loc="upper left", fontsize=8)
    ax = axes[1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, name in enumerate(names):
        incs: dict[int, list] = {}
        for s in samples:
            if s.get(f"rss:{name}") is not None:
                incs.setdefault(int(s[f"inc:{name}"]), []).append((m(s["t"]), s[f"rss:{name}"]))
        for j, (_inc, pts) in enumerate(sorted(incs.items())):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colours[k % len(colours)], lw=1.2,
                    label=name if j == 0 else None)
            ax.plot([pts[0][0]], [pts[0][1]], marker="o", ms=3, color=colours[k % len(colours)])
    ax.set_ylabel("RSS (MiB)")
    ax.legend(loc="upper left", fontsize=8, title="a dot: a (re)start", title_fontsize=7)
    ax = axes[2]
    ax.plot(ts, col("enriched"), lw=1.2, label="enriched (all listings)")
    ax.plot(ts, col("end"), lw=1, ls="--", label="events in the topic (good + poison)")
    ax.set_ylabel("count")
    ax.set_xlabel("minutes since the soak began (negative: the capacity burst)")
    ax.legend(loc="upper left", fontsize=8)
    kinds = [k for k in FAULT_KINDS if any(f["kind"] == k for f in faults)]
    cmap = plt.get_cmap("Dark2")
    fc = {k: cmap(i % 8) for i, k in enumerate(kinds)}
    for ax in axes:
        for f in faults:
            end = max(f.get("end") or f["start"], f["start"] + 4)
            ax.axvspan(m(f["start"]), m(end), color=fc[f["kind"]], alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=fc[k], alpha=0.45) for k in kinds]
    fig.legend(handles, kinds, loc="lower center", ncol=4, fontsize=8, title="faults (shaded while injected)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(folder: Path) -> None:
    """Draw <folder>/soak.png again from its samples.csv and summary.json (times there are relative)."""
    summary = json.loads((folder / "summary.json").read_text())
    samples = []
    with (folder / "samples.csv").open() as f:
        for row in csv.DictReader(f):
            samples.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
    t_soak = summary.get("t_soak")
    if t_soak is None:  # summaries written before t_soak was stored: from the first fault's start and t_min
        f0 = summary["faults"]["log"][0]
        t_soak = f0["start"] - f0["t_min"] * 60
    faults = [{**f, "start": f["start"] - t_soak, "end": (f.get("end") or f["start"]) - t_soak}
              for f in summary["faults"]["log"]]
    plot(folder / "soak.png", samples, faults, list(summary["restarts"]), 0.0, summary.get("plot_title", ""))
    print(f"written: {folder / 'soak.png'}")


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Soak the pipeline (Kafka → enrich consume → Postgres → Celery/RabbitMQ → enrich worker) at a "
                    "fixed rate with seeded random faults and supervised restarts, on private services; prints "
                    "produced / enriched / dead-lettered / lost / doubled, event→row latency, lag and RSS, and "
                    "writes summary.json, samples.csv and soak.png. See the module docstring for definitions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=30, help="how long the producer runs")
    p.add_argument("--rate", type=float, default=None,
                   help="good events/s; default: half the capacity measured by the burst (the slope of the "
                        "enriched count between 10%% and 90%% of --burst events produced at once)")
    p.add_argument("--burst", type=int, default=1000, help="events of the capacity burst")
    p.add_argument("--seed", type=int, default=1, help="seed of fault times, kinds and their parameters")
    p.add_argument("--fault-every", type=float, default=75,
                   help="mean seconds between faults (exponential gaps, from the end of the previous fault)")
    p.add_argument("--faults", default=",".join(FAULT_KINDS),
                   help="comma-separated fault kinds to inject (none: 'none'); all: " + ", ".join(FAULT_KINDS))
    p.add_argument("--hang-s", type=float, default=30, help="seconds the Kafka broker is hung (SIGSTOP)")
    p.add_argument("--consumers", type=int, default=2, help="enrich consume processes (one group)")
    p.add_argument("--workers", type=int, default=1, help="enrich worker processes (solo pool each)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the listings topic")
    p.add_argument("--max-queue-depth", type=int, default=8,
                   help="ENRICH_MAX_QUEUE_DEPTH: the intakes pause above this many queued tasks")
    p.add_argument("--task-listings", type=int, default=16, help="ENRICH_TASK_LISTINGS (listing ids per task)")
    p.add_argument("--batch-size", type=int, default=16, help="ENRICH_BATCH_SIZE (images per forward pass)")
    p.add_argument("--poison-every", type=int, default=200, help="a poison event after every N good ones (0: none)")
    p.add_argument("--restart-delay", type=float, default=2.0,
                   help="seconds before the supervisor restarts a dead process")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=300,
                   help="RSS warm-up of each process incarnation (s; at most a sixth of the run)")
    p.add_argument("--min-judged", type=float, default=120,
                   help="an incarnation's RSS growth is judged only over at least this many s after its warm-up")
    p.add_argument("--drain-timeout", type=float, default=1800,
                   help="most seconds to wait for the backlog after the producer stops")
    p.add_argument("--stall", type=float, default=240, help="give up draining after this many seconds without progress")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak", help="results folder")
    p.add_argument("--replot", type=Path, default=None, metavar="DIR",
                   help="only draw DIR/soak.png again from DIR/samples.csv and DIR/summary.json, then exit")
    p.add_argument("--keep", action="store_true",
                   help="keep the private services' folder (logs, data) even when the run is clean")
    args = p.parse_args(argv)
    args.kinds = [] if args.faults.strip() in ("", "none") else [k.strip() for k in args.faults.split(",") if k.strip()]
    bad = [k for k in args.kinds if k not in FAULT_KINDS]
    if bad:
        p.error(f"unknown fault kinds {bad}; choose from {', '.join(FAULT_KINDS)}")
    if args.consumers < 2 and "consumer_peer_kill" in args.kinds:
        p.error("consumer_peer_kill needs --consumers >= 2")
    return args


def wait_drained(pg_url: str, good: list[str], sampler: Sampler, sup: Supervisor, timeout: float, stall: float) -> bool:
    """Until every good listing is settled and the group's lag is 0; restarts keep going meanwhile."""
    start = last_change = now()
    last = None
    while True:
        sup.tick()
        n = cluster.settled_count(pg_url, good)
        lag = sampler.samples[-1]["lag"] if sampler.samples else None  # the sampler thread owns its clients
        state = (n, lag)
        if n == len(good) and lag == 0:
            return True
        if state != last:
            last, last_change = state, now()
        if int(now() - start) % 30 == 0:
            log(f"draining: {n}/{len(good)} settled, lag {lag}")
        if now() - start > timeout or now() - last_change > stall:
            log(f"drain stopped: {n}/{len(good)} settled, lag {lag}, after {now() - start:.0f} s")
            return False
        time.sleep(1)


def _interrupt(*_args) -> None:
    """SIGTERM stops the soak like Ctrl-C, so its processes and private services are cleaned up."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.replot is not None:
        replot(args.replot if args.replot.is_absolute() else ROOT / args.replot)
        return 0
    out: Path = args.out if args.out.is_absolute() else ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    cpu = lscpu_head()
    print(cpu, flush=True)
    rng = random.Random(args.seed)
    base = cluster.service_dir("enrich-soak-")
    log(f"private services and logs under {base}")
    pg = rabbit = kafka = s3 = stack = sup = sampler = faults = producer = None
    problems = True
    summary: dict = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "cpu": cpu,
                     "cpu_model": cpu_model(cpu), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                           for k, v in vars(args).items()},
                     "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    try:
        model_dir = save_small_model(base / "model", "soak-small-v1", seed=0)
        objects = cluster.image_objects(f"soak-{uuid.uuid4().hex[:8]}")
        pg = cluster.PrivatePostgres(base)
        pg.start()
        pg.create_database()
        cluster.install_refusals(pg.url)
        rabbit = cluster.PrivateRabbit(base)
        rabbit.start()
        kafka = cluster.PrivateKafka(base)
        kafka.start()
        s3 = cluster.PrivateS3(base, objects)
        s3.start()
        log(f"services up: pg {pg.port}, rabbit {rabbit.port}, kafka {kafka.port}, s3 {s3.port}")
        stack = cluster.Stack(pg.url, kafka.bootstrap, rabbit.url, s3.url, model_dir, base,
                              images=cluster.image_uris(objects),
                              settings=dict(max_queue_depth=args.max_queue_depth, task_listings=args.task_listings,
                                            batch_size=args.batch_size, retry_backoff_s=1, task_max_retries=8,
                                            fetch_timeout_s=3))
        cluster.create_topic(stack.kafka, stack.topic, args.partitions)
        producer = Producer(stack.kafka, stack.topic, stack.images, "soak")
        sup = Supervisor(stack, args.restart_delay)
        for i in range(args.workers):
            sup.add("worker" if args.workers == 1 else f"worker-{i + 1}", "worker")
        for i in range(args.consumers):
            sup.add(f"consume-{chr(ord('a') + i)}", "consumer")
        sampler = Sampler(stack, sup, args.sample_every)
        sampler.start()
        # ready: the group is stable with every consumer, the worker says "ready"
        deadline = now() + 180
        while True:
            sup.tick()
            try:
                state = cluster.group_members(stack.kafka, stack.group)
            except Exception:
                state = None
            ready = all("ready." in tail_bytes(s.proc.log, 1 << 16) for s in sup.slots if s.role == "worker")
            if state == ("Stable", args.consumers) and ready:
                break
            if now() > deadline:
                raise RuntimeError(f"processes not ready in 180 s: group {state}, workers ready {ready}")
            time.sleep(0.5)
        log("all processes ready")

        # 1. capacity burst
        t_burst = now()
        burst_ids = producer.good(args.burst, prefix="burst")
        log(f"burst of {len(burst_ids)} produced in {now() - t_burst:.1f} s")
        points = []
        deadline = now() + 600
        while now() < deadline:
            sup.tick()
            n = cluster.settled_count(stack.pg_url, burst_ids) or 0
            points.append((now(), n))
            if n >= len(burst_ids):
                break
            time.sleep(0.25)
        lo = next((t for t, n in points if n >= 0.1 * len(burst_ids)), None)
        hi = next((t for t, n in points if n >= 0.9 * len(burst_ids)), None)
        if lo is None or hi is None or hi <= lo:
            raise RuntimeError(f"the capacity burst did not finish: {points[-1] if points else None}")
        capacity = 0.8 * len(burst_ids) / (hi - lo)
        rate = args.rate or capacity / 2
        summary["capacity"] = {"events": len(burst_ids), "events_per_s": round(capacity, 1),
                               "measured": "slope of the settled count between 10% and 90% of a burst produced at once",
                               "burst_wall_s": round(points[-1][0] - t_burst, 1)}
        log(f"capacity {capacity:.1f} events/s (10-90 % of the burst in {hi - lo:.1f} s); "
            f"soak rate {rate:.1f} events/s")

        # 2. soak
        duration = args.minutes * 60
        warmup = min(args.warmup, duration / 6)
        t_soak = now()
        sup.t0 = t_soak
        producer.start_soak(rate, duration, args.poison_every)
        faults = Faults(args, rng, sup, producer, pg, rabbit, kafka, s3, args.kinds)
        if args.kinds:
            faults.start()
        last_print = 0.0
        while producer.is_alive():
            sup.tick()
            if now() - last_print >= 60:
                last_print = now()
                s = sampler.samples[-1] if sampler.samples else {}
                rss = ", ".join(f"{k[4:]}={v:.0f}" for k, v in s.items() if k.startswith("rss:") and v)
                log(f"t+{(now() - t_soak) / 60:.1f} min: produced {len(producer.acked)}, enriched {s.get('enriched')}, "
                    f"lag {s.get('lag')}, queue {s.get('queue_depth')}, RSS MiB {rss}, faults {len(faults.log)}")
            time.sleep(0.5)
        t_produced = now()
        log(f"producer done: {len(producer.acked)} good events acknowledged in {(t_produced - t_soak) / 60:.1f} min")
        faults.stop()
        while faults.is_alive():  # the fault in progress ends first (its services come back)
            sup.tick()
            time.sleep(0.5)

        # 3. drain
        producer.flush_all()
        good = list(dict.fromkeys(burst_ids + sorted(producer.acked - set(burst_ids))))
        drained = wait_drained(stack.pg_url, good, sampler, sup, args.drain_timeout, args.stall)
        t_drained = now()
        swept = None
        pre_sweep = cluster.outcome(stack.pg_url, good, "soak (before any sweep)")
        if pre_sweep.pending:
            log(f"{len(pre_sweep.pending)} still pending: one `enrich sweep --older-than 0`, as beat would later")
            env = stack.env()
            done = subprocess.run([sys.executable, "-m", "enrich.cli", "sweep", "--older-than", "0"], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=300)
            swept = {"pending_before": len(pre_sweep.pending), "ids": pre_sweep.pending[:50],
                     "output": (done.stdout + done.stderr)[-2000:],
                     "detail": investigate(stack.pg_url, pre_sweep.pending, producer.sent_at, faults.log,
                                           [s.proc.log for s in sup.slots], limit=20)}
            drained = wait_drained(stack.pg_url, good, sampler, sup, 300, 120) and drained
        sampler.stop()
        sampler.join(30)

        # 4. outcome
        res = cluster.outcome(stack.pg_url, good, "soak", stack.kafka, stack.dlq_topic, dict(producer.poison))
        soak_ids = [k for k in good if k.startswith("soak-")]
        done_at = enriched_times(stack.pg_url, soak_ids)
        lat = [done_at[k] - producer.sent_at[k] for k in soak_ids if k in done_at]
        windows = [(f["start"] - 10, f.get("end", f["start"]) + 60) for f in faults.log]
        quiet = [done_at[k] - producer.sent_at[k] for k in soak_ids if k in done_at
                 and not any(a <= producer.sent_at[k] <= b for a, b in windows)]
        lags = [s["lag"] for s in sampler.samples if s["lag"] is not None and t_soak <= s["t"] <= t_produced]
        series = rss_series(sampler.samples, sup.slots)
        verdict = rss_verdict(series, sup.starts, warmup, min(args.min_judged, duration / 6), t_soak)
        by_kind: dict[str, int] = {}
        for f in faults.log:
            by_kind[f["kind"]] = by_kind.get(f["kind"], 0) + 1
        logs = [base / f"{s.name}.log" for s in sup.slots]

        def detail(ids: list) -> list:
            return investigate(stack.pg_url, ids, producer.sent_at, faults.log, logs) if ids else []

        lost_detail, doubled_detail, pending_detail = detail(res.lost), detail(res.doubled), detail(res.pending)
        dlq_doubled_detail = []
        for key in res.dlq_doubled:
            t = producer.poison_sent_at.get(key)
            dlq_doubled_detail.append({"key": key, "produced_at": t, **(fault_context(t, faults.log) if t else {})})
        problems = bool(res.lost or res.doubled or res.pending or res.dlq_missing or res.dlq_good or res.dlq_wrong
                        or not drained or producer.error)
        summary.update({
            "rate_events_per_s": round(rate, 2), "soak_minutes": round((t_produced - t_soak) / 60, 2),
            "drain_s": round(t_drained - t_produced, 1), "drained": drained,
            "produced": {"good": res.produced, "good_burst": len(burst_ids), "good_soak": len(soak_ids),
                         "poison": len(producer.poison), "failed_sends_resent": producer.failed_sends},
            "enriched": res.enriched, "dead_lettered": res.dlq_count, "lost": len(res.lost),
            "doubled": len(res.doubled), "pending": len(res.pending),
            "dlq_missing": res.dlq_missing, "dlq_wrong": res.dlq_wrong, "dlq_doubled": res.dlq_doubled,
            "dlq_doubled_detail": dlq_doubled_detail,
            "dlq_good": res.dlq_good, "outcome_problems": res.problems(),
            "needed_sweep": swept,
            "latency_s": {"n": len(lat), "p50": pct(lat, 0.5), "p90": pct(lat, 0.9), "p99": pct(lat, 0.99),
                          "max": max(lat) if lat else None,
                          "quiet": {"n": len(quiet), "p50": pct(quiet, 0.5), "p99": pct(quiet, 0.99)},
                          "measure": "event's produce time (in its title) → listings.updated_at of the enriched row"},
            "lag_events": {"max": max(lags) if lags else None, "mean": statistics.fmean(lags) if lags else None,
                           "p50": pct(lags, 0.5), "p99": pct(lags, 0.99),
                           "at_end_of_production": lags[-1] if lags else None},
            "rss": verdict,
            "faults": {"by_kind": by_kind, "total": len(faults.log),
                       "log": [{**f, "t_min": round((f["start"] - t_soak) / 60, 2)} for f in faults.log]},
            "exits": {s.name: s.exits for s in sup.slots}, "unplanned_exits": sup.unplanned,
            "restarts": {s.name: s.incarnation - 1 for s in sup.slots},
            "lost_detail": lost_detail, "doubled_detail": doubled_detail, "pending_detail": pending_detail,
            "producer_error": producer.error, "fault_thread_error": faults.error,
            "service_dir": str(base), "t_soak": t_soak,
        })
        summary["verdict"] = {"lost_0": not res.lost, "doubled_0": not res.doubled,
                              "rss_growth_le_10pct": verdict["ok"], "poison_all_in_dlq": not res.dlq_missing}
        with (out / "samples.csv").open("w", newline="") as f:
            keys = sorted({k for s in sampler.samples for k in s}, key=lambda k: (k != "t", k))
            w = csv.DictWriter(f, keys)
            w.writeheader()
            for s in sampler.samples:
                w.writerow({**s, "t": round(s["t"] - t_soak, 2)})
        title = (f"soak {args.minutes:g} min at {rate:.1f} ev/s (capacity {capacity:.1f}), seed {args.seed}, "
                 f"{len(faults.log)} faults; {cpu_model(cpu)}; produced {res.produced}, lost {len(res.lost)}, "
                 f"doubled {len(res.doubled)}")
        summary["plot_title"] = title
        plot(out / "soak.png", sampler.samples, faults.log, [s.name for s in sup.slots], t_soak, title)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print_summary(summary)
        print(f"\nwritten: {out / 'summary.json'}, {out / 'samples.csv'}, {out / 'soak.png'}")
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for thing in (faults, producer, sampler):
            if thing is not None:
                try:
                    thing.stop()
                except Exception:
                    pass
        if kafka is not None and kafka.proc is not None:
            try:
                kafka.resume()  # interrupted in a hang: processes stop faster against a live broker
            except Exception:
                pass
        if producer is not None:
            producer.close()
        if stack is not None:
            stack.close()
        for svc in (s3, kafka, rabbit, pg):
            if svc is not None:
                try:
                    if svc is kafka:
                        svc.resume()
                    svc.close()
                except Exception:
                    pass
        if problems or args.keep:
            print(f"kept {base} (process logs *.log, service data)")
        else:
            shutil.rmtree(base, ignore_errors=True)


def print_summary(s: dict) -> None:
    lat, lag, rss = s["latency_s"], s["lag_events"], s["rss"]

    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    rows = [
        ("CPU", s["cpu_model"]),
        ("capacity (burst)", f"{s['capacity']['events_per_s']} events/s ({s['capacity']['events']} events)"),
        ("soak rate", f"{s['rate_events_per_s']} events/s for {s['soak_minutes']} min, drained in {s['drain_s']} s"),
        ("produced", f"{s['produced']['good']} good ({s['produced']['good_burst']} burst + "
                     f"{s['produced']['good_soak']} soak) + {s['produced']['poison']} poison"),
        ("enriched", s["enriched"]),
        ("dead-lettered", f"{s['dead_lettered']} (poison missing from the DLQ: {len(s['dlq_missing'])}, "
                          f"good events in it: {len(s['dlq_good'])})"),
        ("lost", s["lost"]),
        ("doubled", s["doubled"]),
        ("pending at the end", s["pending"]),
        ("needed the sweep", 0 if not s["needed_sweep"] else s["needed_sweep"]["pending_before"]),
        ("latency p50 / p90 / p99 / max", f"{f(lat['p50'])} / {f(lat['p90'])} / {f(lat['p99'])} / {f(lat['max'])} s "
                                          f"(n={lat['n']})"),
        ("latency away from faults p50 / p99", f"{f(lat['quiet']['p50'])} / {f(lat['quiet']['p99'])} s "
                                               f"(n={lat['quiet']['n']})"),
        ("consumer lag p50 / p99 / max",
         f"{f(lag['p50'], '.0f')} / {f(lag['p99'], '.0f')} / {f(lag['max'], '.0f')} events"),
        ("faults", ", ".join(f"{k} {v}" for k, v in sorted(s["faults"]["by_kind"].items())) or "none"),
        ("restarts", ", ".join(f"{k} {v}" for k, v in s["restarts"].items())),
        ("unplanned exits", len(s["unplanned_exits"])),
    ]
    print("\n" + "=" * 100)
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(f"\nRSS (MiB) per process; warm-up {rss['warmup_s']:.0f} s per incarnation, judged over >= "
          f"{rss['min_judged_s']:.0f} s after it:")
    for name, d in rss["per_slot"].items():
        print(f"  {name}: start {d['start_mib']}, end {d['end_mib']}, {d['incarnations']} incarnation(s)")
        for e in d["judged"]:
            g = f"after warm-up {e['after_warmup_mib']} → {e['last_mib']} ({e['growth_pct']:+.1f} % over " \
                f"{e['judged_span_s']} s)" if "growth_pct" in e else "not judged (too short)"
            print(f"    #{e['incarnation']}: lived {e['lived_s']} s, first {e['first_mib']}, peak {e['peak_mib']}; {g}")
    v = s["verdict"]
    print(f"\nlost == 0: {'YES' if v['lost_0'] else 'NO'}   doubled == 0: {'YES' if v['doubled_0'] else 'NO'}   "
          f"RSS growth <= 10 % after warm-up: {'YES' if v['rss_growth_le_10pct'] else 'NO'} "
          f"(worst {rss['worst_growth_pct']} %, {rss['judged']} incarnations judged)   "
          f"poison all in DLQ: {'YES' if v['poison_all_in_dlq'] else 'NO'}")
    if s["outcome_problems"]:
        print("problems:\n  " + "\n  ".join(s["outcome_problems"]))
    for what in ("lost_detail", "doubled_detail", "pending_detail"):
        for d in s[what][:10]:
            print(f"{what[:-7]}: {d['listing_id']} row={d['row']} before={d.get('fault_before')} "
                  f"after={d.get('fault_after')} events={d['processed_events']}")
    print("\nfaults:")
    for i, fl in enumerate(s["faults"]["log"], 1):
        print(f"  {i:>2}. t+{fl['t_min']:5.2f} min {fl['kind']:<30} {fl.get('note', '')}"
              + (" ERROR" if fl.get("error") else ""))
    print("=" * 100)


if __name__ == "__main__":
    sys.exit(main())
