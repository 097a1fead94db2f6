"""Worker fixtures: real images made with Pillow, a real (small, random-init) model on disk, settings."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.config import Settings
from harness.images import png_bytes
from harness.models import save_small_model

ROOT = Path(__file__).resolve().parents[2]
AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def wait_until(predicate, timeout: float = 90.0) -> None:
    """Poll until the asynchronous pipeline has caught up (a hang guard, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached")


def send_png(handler, colour) -> None:
    """Answer an http.server request with a small PNG of one colour."""
    body = png_bytes(colour)
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def make_settings(tmp_path: Path | None = None, **overrides) -> Settings:
    base = dict(allow_local_paths=True, allowed_hosts=["127.0.0.1", "localhost"], allow_private_networks=True,
                max_image_bytes=2 * 1024 * 1024, max_image_pixels=4_000_000, fetch_timeout_s=3.0, batch_size=8)
    if tmp_path is not None:
        base["data_dir"] = tmp_path
    base.update(overrides)
    return Settings(**base)


@pytest.fixture()
def use_celery():
    """Configure the Celery app with a test's Settings (as a process start would); reset it afterwards."""
    import importlib

    from core.celery_app import app, configure

    def use(settings: Settings) -> Settings:
        configure(settings)
        # every task module, as a worker start imports them: an in-process worker started earlier in the session
        # (with a role's narrower `include`) leaves Celery's loader marked initialised, and it imports none again
        for module in app.conf.include:
            importlib.import_module(module)
        return settings

    yield use
    configure(Settings())


def gate_handler():
    """A request handler class with fresh events: serves a PNG; while `hold` is set, each request waits until
    `gate` opens (so a batch is in flight when a test kills its worker), and `arrived` says one came."""

    class Gate(BaseHTTPRequestHandler):
        hold = threading.Event()
        arrived = threading.Event()
        gate = threading.Event()

        def do_GET(self) -> None:
            if type(self).hold.is_set():
                type(self).arrived.set()
                if not type(self).gate.wait(60):
                    return
            send_png(self, (200, 100, 0))

        def log_message(self, *args) -> None:
            pass

    return Gate


def serve_gated(handler) -> tuple[ThreadingHTTPServer, str]:
    """A loopback server for `handler` (see gate_handler) after checking RabbitMQ answers; returns it and its base
    URL. The caller shuts it down."""
    from kombu import Connection

    try:
        Connection(AMQP, connect_timeout=3).ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.fail(f"RabbitMQ not reachable at {AMQP}: {exc}")
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stop_all(procs, server) -> None:
    """Terminate the worker processes still running and shut the gated image server."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(20)
    server.shutdown()
    server.server_close()


def start_worker_process(env: dict, log: Path, *args: str) -> subprocess.Popen:
    """`enrich worker` as a real process (its stderr appended to `log`), for kill -9 tests."""
    return subprocess.Popen([sys.executable, "-m", "enrich.cli", "worker", *args, "--loglevel=INFO"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return save_small_model(tmp_path_factory.mktemp("model"), "test-small-v1", seed=0)


@pytest.fixture(scope="session")
def model_dir_v2(tmp_path_factory) -> Path:
    """A second version of the same architecture (other weights), for promotions."""
    return save_small_model(tmp_path_factory.mktemp("model-v2"), "test-small-v2", seed=1)


@pytest.fixture(scope="session")
def predictor(model_dir):
    from model.inference import load_predictor

    return load_predictor(model_dir, device="cpu")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/redirect-loopback"):
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
            return
        if self.path.startswith("/boom"):
            self.send_response(503)
            self.end_headers()
            return
        super().do_GET()


@pytest.fixture()
def http_dir(tmp_path):
    """A local HTTP server (real sockets) serving files from a temp directory: (base_url, dir)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **kw: _QuietHandler(*a, directory=str(root), **kw)  # noqa: E731
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()
