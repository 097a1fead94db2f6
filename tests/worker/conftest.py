"""Worker fixtures: real images made with Pillow, a real (small, random-init) model on disk, settings."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.config import Settings

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


def png_bytes(colour=(200, 30, 30), size=(40, 48), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


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


def worker_process_env(pg_url: str, queue: str, **settings) -> dict[str, str]:
    """The environment of an `enrich worker` test process: this database, RabbitMQ, `queue` as its gpu queue,
    local paths and the loopback image server allowed, the CPU; ``settings`` as ENRICH_<NAME> values."""
    env = {**os.environ, "ENRICH_DATABASE_URL": pg_url, "ENRICH_CELERY_BROKER_URL": AMQP, "ENRICH_GPU_QUEUE": queue,
           "ENRICH_ALLOW_LOCAL_PATHS": "true", "ENRICH_ALLOWED_HOSTS": '["127.0.0.1"]',
           "ENRICH_ALLOW_PRIVATE_NETWORKS": "true", "ENRICH_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    env.update({f"ENRICH_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def start_worker_process(env: dict, log: Path, *args: str) -> subprocess.Popen:
    """`enrich worker` as a real process (its stderr appended to `log`), for kill -9 tests."""
    return subprocess.Popen([sys.executable, "-m", "enrich.cli", "worker", *args, "--loglevel=INFO"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"))


def save_small_model(out: Path, version: str, seed: int, colour_threshold: float = 0.0) -> Path:
    """A real model directory (small CNN, random init, fashion-mnist taxonomy) written by the model package."""
    import torch

    from model.checkpoint import save_model
    from model.network import build_model
    from schemas.taxonomy import load_taxonomy

    torch.manual_seed(seed)
    model = build_model("small_cnn", load_taxonomy("fashion-mnist"), pretrained=False)
    # thresholds 0: every missing group is filled, so provenance rules are checked on real outputs; each
    # later seed scores higher, so the registry's gate lets it replace an earlier one
    save_model(model, out, model_version=version, image_size=32,
               thresholds={"category": 0.0, "type": 0.0, "colour": colour_threshold},
               metrics={"test/top1": 0.1 * (seed + 1)})
    return out


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
