"""Per-process state of a worker: the model it serves and the database pool.

CUDA and fork don't mix, so nothing here is created at import time: a prefork child loads the
model in `worker_process_init`, a solo worker on first use.

The served model follows the registry's active alias. Before a task the worker asks which version is
active (at most every ENRICH_MODEL_CHECK_S seconds); a new one is fetched, verified and loaded in a
background thread while the old one keeps serving, and the swap happens when the next task starts.
A task holds one Enricher for its whole batch, so a batch never mixes versions.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from core import metrics
from core.config import Settings

log = logging.getLogger(__name__)
_lock = threading.RLock()  # enricher() reaches pool() while holding it
_pool = None


class _Slot:
    """One served model (the active one, or a shadow candidate): current, and the next one loading."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.enricher = None
        self.ready = None  # loaded in the background, waiting for the next task
        self.loading: threading.Thread | None = None
        self.wanted: str | None = None

    def swap_in_ready(self) -> None:
        if self.ready is None:
            return
        old, self.enricher, self.ready = self.enricher, self.ready, None
        if old is not None:
            old.close()
        log.info("now serving %s model %s", self.name, self.enricher.model_version)

    def load_in_background(self, settings: Settings, version: str) -> None:
        self.wanted = version

        def run() -> None:
            try:
                with pool(settings).connection() as conn:
                    model_dir = _registered_dir(settings, conn, version)
                loaded = _load(settings, model_dir)
                with _lock:
                    self.ready = loaded
            except Exception:  # noqa: BLE001 - keep serving the current model; the next check tries again
                log.exception("could not load %s model %s; still serving the current one", self.name, version)
                self.wanted = None

        self.loading = threading.Thread(target=run, name=f"load-{self.name}-{version}", daemon=True)
        self.loading.start()
        log.info("%s model is now %s: loading it in the background", self.name, version)

    def follow(self, settings: Settings, version: str | None) -> None:
        current = self.enricher.model_version if self.enricher is not None else None
        if version is None:
            if self.enricher is not None:
                self.enricher.close()
            self.enricher = self.ready = self.wanted = None
        elif version != current and version != self.wanted and not (self.loading and self.loading.is_alive()):
            self.load_in_background(settings, version)

    def close(self) -> None:
        if self.loading is not None:
            self.loading.join(60)
        for e in (self.enricher, self.ready):
            if e is not None:
                e.close()


_active = _Slot("active")
_shadow = _Slot("shadow")
_checked_at = 0.0


def _load(settings: Settings, model_dir: Path):
    from model.inference import load_predictor
    from worker.pipeline import Enricher

    t0 = time.perf_counter()
    predictor = load_predictor(model_dir, device=settings.device, mixed_precision=settings.mixed_precision)
    import torch

    log.info("model %s loaded from %s on %s, %s in %.1fs (torch intra-op threads: %d)", predictor.version,
             model_dir, predictor.device, predictor.amp_dtype or "fp32", time.perf_counter() - t0,
             torch.get_num_threads())
    return Enricher(predictor, settings)


def _registered_dir(settings: Settings, conn, version: str | None = None) -> Path:
    from model.artifacts import store_from_settings
    from model.registry import model_dir_for

    return model_dir_for(conn, version=version, store=store_from_settings(settings))


def active_model_dir(settings: Settings) -> Path:
    """ENRICH_MODEL_DIR if set, else the registry's active model (fetched and verified)."""
    if settings.model_dir is not None:
        return Path(settings.model_dir)
    with pool(settings).connection() as conn:
        return _registered_dir(settings, conn)


def _mark_served(before: str | None) -> None:
    now = _active.enricher.model_version
    if before is not None and before != now:
        metrics.MODEL_SERVED.labels(model_version=before).set(0)
    metrics.MODEL_SERVED.labels(model_version=now).set(1)


def _follow(settings: Settings) -> None:
    """Swap in models loaded in the background; start loading when the registry names new ones."""
    global _checked_at
    before = _active.enricher.model_version
    _active.swap_in_ready()
    _shadow.swap_in_ready()
    _mark_served(before)
    now = time.monotonic()
    if now - _checked_at < settings.model_check_s:
        return
    _checked_at = now
    from model.registry import active_version, shadow_version

    try:
        with pool(settings).connection() as conn:
            active, shadow = active_version(conn), shadow_version(conn)
            _report(conn)
    except Exception:  # noqa: BLE001 - a registry hiccup must not stop the worker; check again later
        log.warning("could not read the active model version", exc_info=True)
        return
    if active is not None:
        _active.follow(settings, active)
    _shadow.follow(settings, shadow)


def _report(conn) -> None:
    """What this process serves, for the console's overview."""
    conn.execute("INSERT INTO worker_status (worker, model_version, shadow_version, seen_at)"
                 " VALUES (%s, %s, %s, now()) ON CONFLICT (worker) DO UPDATE SET model_version ="
                 " EXCLUDED.model_version, shadow_version = EXCLUDED.shadow_version, seen_at = now()",
                 (f"{socket.gethostname()}:{os.getpid()}", _active.enricher.model_version,
                  _shadow.enricher.model_version if _shadow.enricher is not None else None))


def enricher(settings: Settings):
    """The Enricher the next batch runs on: loaded on first call, then following the active model."""
    global _checked_at
    with _lock:
        if _active.enricher is None:
            if settings.torch_threads:
                import torch

                torch.set_num_threads(settings.torch_threads)
            _active.enricher = _load(settings, active_model_dir(settings))
            _mark_served(None)
            _checked_at = 0.0 if settings.model_dir is None else time.monotonic()
        if settings.model_dir is None:
            _follow(settings)
        return _active.enricher


def shadow_enricher():
    """The shadow candidate's Enricher, when the registry names one and it is loaded; else None."""
    with _lock:
        return _shadow.enricher


def is_loaded() -> bool:
    return _active.enricher is not None


def pool(settings: Settings):
    global _pool
    with _lock:
        if _pool is None:
            from core.db import make_pool

            _pool = make_pool(settings, size=min(settings.db_pool_size, 2))
        return _pool


def reset() -> None:
    """Forget the models and the pool (tests)."""
    global _active, _shadow, _pool, _checked_at
    with _lock:
        _active.close()
        _shadow.close()
        if _pool is not None:
            _pool.close()
        _active, _shadow, _pool = _Slot("active"), _Slot("shadow"), None
        _checked_at = 0.0
