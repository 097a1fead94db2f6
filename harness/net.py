"""Loopback helpers for tests and benchmarks that start their own servers."""
from __future__ import annotations

import socket
import time
import urllib.request

from core.celery_app import app


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{host}:{port} did not open in {timeout}s")


def scrape_metrics(port: int) -> str | None:
    """A process's Prometheus `/metrics` text on a loopback port; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def take_queued_tasks(queue: str) -> list[dict]:
    """Every task message waiting on a Celery queue of the configured broker, taken off it (acked):
    [{"task": name, "args": [...], "kwargs": {...}}] in queue order."""
    out = []
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(queue)
        while True:
            try:
                msg = q.get(timeout=1)
            except q.Empty:
                break
            out.append({"task": msg.headers.get("task"), "args": msg.payload[0], "kwargs": msg.payload[1]})
            msg.ack()
        q.close()
    return out
