"""Kafka intake with 1 and with 2 `enrich consume` processes (one consumer group) on a 4-partition topic.

    python benchmarks/intake_scaling.py [--events 150000] [--consumers 1,2]

Real parts, one machine, one run:
  1. starts a Kafka-protocol broker (Tansu, in memory), creates a 4-partition topic and produces N listing events
     to it once, each keyed by its listing id as producers must (benchmarks/intake_throughput.py's events);
  2. for each process count k: a fresh migrated database and a fresh consumer group; k `enrich consume`
     subprocesses start paused (the GPU queue is filled past ENRICH_MAX_QUEUE_DEPTH with placeholder tasks) until
     the group is stable with k members holding all 4 partitions, so no join or rebalance falls inside the timing;
     then the placeholders are purged and every process resumes within a second;
  3. timed from the first listing row in Postgres to the N-th (every event durably written; the row count is
     read every 0.25 s); CPU seconds of the consumer processes (psutil, user + system) and of the Postgres
     backends serving their connections over the same interval; the intake's enrichment tasks pile up in the
     Celery broker (no worker) and are deleted with the queue at the end.
Prints events/s, CPU per event (consumers; Postgres backends; the broker) for each k, the ratios, and writes
benchmarks/results/intake_scaling.json. RabbitMQ's own CPU is not counted (the service is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from intake_throughput import make_events, start_tansu  # noqa: E402 - after the path insert

from harness.net import free_port  # noqa: E402

PARTITIONS = 4
HOLD_DEPTH = 5000  # ENRICH_MAX_QUEUE_DEPTH: above the tasks a run enqueues, below the placeholders


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def scrape(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            body = r.read().decode()
    except OSError:
        return 0.0
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", body, re.M))


def lag_partitions(port: int) -> set[int]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            body = r.read().decode()
    except OSError:
        return set()
    return {int(p) for p in re.findall(r'^enrich_intake_lag\{[^}]*partition="(\d+)"', body, re.M)}


def fill_queue(env: dict, n: int) -> None:
    """n placeholder tasks on the GPU queue, sent as the intake sends its own (same queue declaration)."""
    from core.celery_app import configure, send_enrich
    from core.config import Settings

    settings = Settings(celery_broker_url=env["ENRICH_CELERY_BROKER_URL"], gpu_queue=env["ENRICH_GPU_QUEUE"])
    configure(settings)
    for i in range(n):
        send_enrich([f"placeholder-{i}"], settings)


def purge_queue(broker: str, queue: str, delete: bool = False) -> None:
    from kombu import Connection

    with Connection(broker) as conn:
        channel = conn.default_channel
        if delete:
            channel.queue_delete(queue)
        else:
            channel.queue_purge(queue)


def run_k(k: int, args, base_env: dict, pg_admin: psycopg.Connection, tansu: psutil.Process, n: int) -> dict:
    from migrations import apply_all

    tag = uuid.uuid4().hex[:6]
    dbname = f"bench_scale_{k}_{tag}"
    pg_admin.execute(f'CREATE DATABASE "{dbname}"')
    pg_url = psycopg.conninfo.make_conninfo(args.pg_admin, dbname=dbname)
    with psycopg.connect(pg_url) as conn:
        apply_all(conn)
    queue = f"gpu-scale-{k}-{tag}"
    env = {**base_env, "ENRICH_DATABASE_URL": pg_url, "ENRICH_GPU_QUEUE": queue,
           "ENRICH_CONSUMER_GROUP": f"scale-{k}-{tag}", "ENRICH_MAX_QUEUE_DEPTH": str(HOLD_DEPTH)}
    fill_queue(env, HOLD_DEPTH + 1)
    procs, ports, logs = [], [], []
    watch = psycopg.connect(pg_url, autocommit=True)
    try:
        for i in range(k):
            port = free_port()
            log = Path(args.logs) / f"consume-k{k}-{i}.log"
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "enrich.cli", "consume", "--metrics-port", str(port)],
                                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w")))
            ports.append(port)
        # paused until each process exports the lag of its share and together they hold all 4 partitions
        deadline = time.monotonic() + 180
        while True:
            held = [lag_partitions(p) for p in ports]
            if all(held) and sum(len(h) for h in held) == PARTITIONS and set().union(*held) == set(range(PARTITIONS)):
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"consumers did not settle on the partitions: {held}\n"
                                 + "\n".join(log.read_text()[-2000:] for log in logs))
            time.sleep(0.5)
        time.sleep(2)  # a last rebalance round, if any, is over
        assert sum(scrape(p, "enrich_events_consumed_total") for p in ports) == 0, "read while paused"
        mine = watch.execute("SELECT pg_backend_pid()").fetchone()[0]

        def backends() -> list[psutil.Process]:
            pids = [r[0] for r in watch.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
                                                (dbname, mine)).fetchall()]
            out = []
            for pid in pids:
                try:
                    out.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    pass
            return out

        consumers = [psutil.Process(p.pid) for p in procs]
        load_before = os.getloadavg()
        purge_queue(args.broker, queue)
        released = time.monotonic()
        count = 0
        while count == 0:
            count = watch.execute("SELECT count(*) FROM listings").fetchone()[0]
            time.sleep(0.01)
        # the first rows: start the clock and the CPU counters (the backends exist by now)
        t0 = time.monotonic()
        pg0 = backends()
        c0, p0, b0, first_rows = cpu_s(consumers), {b.pid: cpu_s([b]) for b in pg0}, cpu_s([tansu]), count
        while count < n:
            time.sleep(0.25)
            count = watch.execute("SELECT count(*) FROM listings").fetchone()[0]
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a consumer exited:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
        t1 = time.monotonic()
        pg1 = backends()
        c1, b1 = cpu_s(consumers), cpu_s([tansu])
        pg_cpu = sum(cpu_s([b]) - p0.get(b.pid, 0.0) for b in pg1)
        load_after = os.getloadavg()
        time.sleep(1.5)  # the last commits and metric updates
        consumed = [scrape(p, "enrich_events_consumed_total") for p in ports]
        events = n - first_rows  # the rows written inside the timed interval
        wall = t1 - t0
        out = {"consumers": k, "events": n, "timed_events": events, "wall_s": round(wall, 2),
               "events_per_s": round(events / wall), "start_delay_s": round(t0 - released, 2),
               "consumer_cpu_s": round(c1 - c0, 2), "consumer_cpu_us_per_event": round((c1 - c0) / events * 1e6, 1),
               "postgres_cpu_s": round(pg_cpu, 2), "postgres_cpu_us_per_event": round(pg_cpu / events * 1e6, 1),
               "broker_cpu_us_per_event": round((b1 - b0) / events * 1e6, 1),
               "consumed_per_process": consumed, "reread": sum(consumed) - n,
               "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after]}
        print(f"k={k}: {out['events_per_s']} events/s over {wall:.1f} s; consumers "
              f"{out['consumer_cpu_us_per_event']} µs CPU/event, Postgres backends {out['postgres_cpu_us_per_event']} "
              f"µs/event; consumed per process {consumed}; load {out['loadavg_after']}", flush=True)
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        watch.close()
        purge_queue(args.broker, queue, delete=True)
        pg_admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=150_000, help="listing events on the topic (default: 150000)")
    ap.add_argument("--consumers", default="1,2", help="process counts to run, in order (default: 1,2)")
    ap.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//",
                    help="Celery broker the intake enqueues to (default: local RabbitMQ)")
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="Postgres admin URL; a scratch database per run is created and dropped")
    ap.add_argument("--logs", default="/tmp", help="folder for the consumers' logs (default: /tmp)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "intake_scaling.json")
    args = ap.parse_args()

    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    tansu, bootstrap = start_tansu()
    topic = f"listings-scale-{uuid.uuid4().hex[:6]}"
    pg_admin = psycopg.connect(args.pg_admin, autocommit=True)
    runs = []
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
        admin.close()
        t = time.monotonic()
        events = make_events(args.events)
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
        for key, value in events:  # key = listing id: every edit of a listing on one partition
            producer.send(topic, key=key, value=value)
        producer.flush()
        producer.close()
        print(f"{args.events} events on {topic} ({PARTITIONS} partitions) in {time.monotonic() - t:.0f} s", flush=True)
        base_env = {**os.environ, "PYTHONPATH": str(ROOT), "ENRICH_KAFKA_BOOTSTRAP": bootstrap,
                    "ENRICH_LISTINGS_TOPIC": topic, "ENRICH_DLQ_TOPIC": topic + ".dlq",
                    "ENRICH_CELERY_BROKER_URL": args.broker, "ENRICH_KAFKA_SESSION_TIMEOUT_MS": "6000",
                    "ENRICH_KAFKA_HEARTBEAT_INTERVAL_MS": "500"}
        for k in (int(x) for x in args.consumers.split(",")):
            runs.append(run_k(k, args, base_env, pg_admin, psutil.Process(tansu.pid), args.events))
    finally:
        tansu.terminate()
        tansu.wait(10)
        pg_admin.close()

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print()
    print(f"machine: {os.cpu_count()} CPUs, {model}; {args.events} events, {PARTITIONS} partitions")
    print(f"{'consumers':>9} {'events/s':>9} {'wall s':>7} {'consumer µs/ev':>15} {'postgres µs/ev':>15} "
          f"{'broker µs/ev':>13} {'re-read':>7}")
    for r in runs:
        print(f"{r['consumers']:>9} {r['events_per_s']:>9} {r['wall_s']:>7} {r['consumer_cpu_us_per_event']:>15} "
              f"{r['postgres_cpu_us_per_event']:>15} {r['broker_cpu_us_per_event']:>13} {r['reread']:>7}")
    result = {"events": args.events, "partitions": PARTITIONS, "cpus": os.cpu_count(), "cpu_model": model,
              "runs": runs}
    if len(runs) >= 2:
        base, last = runs[0], runs[-1]
        result["ratio_events_per_s"] = round(last["events_per_s"] / base["events_per_s"], 3)
        result["ratio_consumer_cpu_per_event"] = round(last["consumer_cpu_us_per_event"]
                                                       / base["consumer_cpu_us_per_event"], 3)
        print(f"ratio {last['consumers']} ÷ {base['consumers']} processes: {result['ratio_events_per_s']} events/s, "
              f"{result['ratio_consumer_cpu_per_event']} consumer CPU per event")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
