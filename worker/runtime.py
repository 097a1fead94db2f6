"""Per-process state of a worker: the model it serves, the database pool, and the timer that keeps both
the model and the process's `worker_status` row up to date.

CUDA and fork don't mix, so nothing here is created at import time: every process that runs tasks calls
`start` from Celery's worker_process_init (at start for solo, after the fork for each prefork child); code
that calls `enricher()` outside such a worker starts on first use.

Each worker process runs a timer thread (`check` every ENRICH_MODEL_CHECK_S). In a process that serves a
model (its queues include the gpu or backfill queue) it asks the registry which versions are active and in
shadow; a new one is fetched, verified and loaded in a background thread while the old one keeps serving,
and swapped in as soon as the load finishes and no task holds the current one. Every process, model or not,
writes its `worker_status` row (queues, and the versions it serves: NULL for cpu and train workers, which
never load a model).

A task holds one Enricher (and the shadow's) from its first `enricher()` call to its end (`task_finished`,
from Celery's task_postrun), so a batch never mixes versions and an Enricher is never closed under a task.
A task that starts while a version the worker has already seen is loading waits for that load.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from psycopg_pool import ConnectionPool

from core import metrics
from core.config import Settings
from core.db import make_pool
from model.artifacts import store_from_settings
from model.registry import active_version, model_dir_for, shadow_version

if TYPE_CHECKING:
    from worker.pipeline import Enricher  # imports torch: see _load

log = logging.getLogger(__name__)
_lock = threading.RLock()  # enricher() reaches pool() while holding it
_pool: ConnectionPool | None = None
_LOAD_WAIT_S = 300.0  # a task waits this long at most for a load it has seen, then runs on the current model
_MIN_CHECK_S = 0.1


class _Slot:
    """One served model (the active one, or a shadow candidate): current, and the next one loading."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.enricher: Enricher | None = None
        self.wanted: str | None = None  # the version the registry names, when it is not the one served
        # `wanted`, loaded in the background, waiting until no task holds the current one
        self.ready: Enricher | None = None
        self.drop = False  # the registry names none any more: let the current one go at the next switch
        self.loading: threading.Thread | None = None

    @property
    def version(self) -> str | None:
        return self.enricher.model_version if self.enricher is not None else None

    def is_loading(self) -> bool:
        return self.loading is not None and self.loading.is_alive()

    def switch(self) -> bool:
        """Serve the loaded model (or none, when dropped); call only while no task holds one. True if it changed."""
        if self.ready is None and not self.drop:
            return False
        old, self.enricher, self.ready, self.wanted, self.drop = self.enricher, self.ready, None, None, False
        if old is not None:
            old.close()
        log.info("now serving %s model %s", self.name, self.version or "none")
        return True

    def _discard_ready(self) -> None:
        if self.ready is not None:
            self.ready.close()
            self.ready = None

    def follow(self, settings: Settings, version: str | None) -> None:
        """Aim at `version` (None: no model, for the shadow): load it in the background when it is new."""
        if version == self.version:  # back to the one served (or still none): forget what was on its way
            self.wanted, self.drop = None, False
            self._discard_ready()
            return
        self.wanted, self.drop = version, version is None
        if self.ready is not None and self.ready.model_version != version:
            self._discard_ready()
        if version is not None and self.ready is None and not self.is_loading():
            self.load_in_background(settings, version)

    def load_in_background(self, settings: Settings, version: str) -> None:
        def run() -> None:
            try:
                with pool(settings).connection() as conn:
                    model_dir = _registered_dir(settings, conn, version)
                loaded = _load(settings, model_dir)
            except Exception:
                log.exception("could not load %s model %s; still serving the current one", self.name, version)
                return
            with _lock:
                if self.wanted != version:  # the registry moved on (or back) while it loaded
                    loaded.close()
                    return
                self.ready = loaded
                if _held is None:
                    _switch()
                else:
                    log.info("%s model %s is ready; served when the running task ends", self.name, version)

        self.loading = threading.Thread(target=run, name=f"load-{self.name}-{version}", daemon=True)
        self.loading.start()
        log.info("%s model is now %s: loading it in the background", self.name, version)

    def close(self) -> None:
        for e in (self.enricher, self.ready):
            if e is not None:
                e.close()


_active = _Slot("active")
_shadow = _Slot("shadow")
_in_task = False  # a Celery task is running in this process (task_started … task_finished)
_held: Enricher | None = None  # the Enricher the running task got: the same one until the task ends
_queues: list[str] | None = None  # what this process consumes, for worker_status (None: not told)
_timer: threading.Thread | None = None
_stop = threading.Event()


def _load(settings: Settings, model_dir: Path) -> Enricher:
    # lazy: torch, and the modules that import it, load only in processes that serve a model (gpu, backfill)
    import faiss
    import torch

    from model.inference import load_predictor
    from worker.pipeline import Enricher

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
        faiss.omp_set_num_threads(settings.torch_threads)  # the online neighbour search's threads
    t0 = time.perf_counter()
    predictor = load_predictor(model_dir, device=settings.device, mixed_precision=settings.mixed_precision)
    log.info("model %s loaded from %s on %s, %s in %.1fs (torch intra-op threads: %d)", predictor.version,
             model_dir, predictor.device, predictor.amp_dtype or "fp32", time.perf_counter() - t0,
             torch.get_num_threads())
    return Enricher(predictor, settings)


def _registered_dir(settings: Settings, conn: psycopg.Connection, version: str | None = None) -> Path:
    return model_dir_for(conn, version=version, store=store_from_settings(settings))


def active_model_dir(settings: Settings) -> Path:
    """ENRICH_MODEL_DIR if set, else the registry's active model (fetched and verified)."""
    if settings.model_dir is not None:
        return Path(settings.model_dir)
    with pool(settings).connection() as conn:
        return _registered_dir(settings, conn)


def _mark_served(before: str | None, now: str | None) -> None:
    if before is not None and before != now:
        metrics.MODEL_SERVED.labels(model_version=before).set(0)
    if now is not None:
        metrics.MODEL_SERVED.labels(model_version=now).set(1)


def _switch() -> None:
    """Serve what finished loading (lock held, no task holding an Enricher)."""
    before = _active.version
    if _active.switch():
        _mark_served(before, _active.version)
    _shadow.switch()


def serves_model(settings: Settings, queues: list[str]) -> bool:
    """Whether a worker consuming `queues` runs enrichment (gpu) or the backfill: only those load a model."""
    return bool({settings.gpu_queue, settings.backfill_queue} & set(queues))


def start(settings: Settings, queues: list[str]) -> None:
    """Set up this worker process (Celery's worker_process_init: at start for solo, after the fork for prefork).

    A process whose queues need a model gets it from the timer's first check, loaded in the background (a
    prefork child must answer its parent within seconds); a task that comes first waits for that load.
    ENRICH_MODEL_DIR, a local directory, is loaded at once. Processes that serve no model never load one.
    """
    global _queues
    _queues = list(queues)
    if serves_model(settings, _queues) and settings.model_dir is not None:
        try:
            enricher(settings)
        except Exception:
            log.exception("model could not be loaded at worker start")
    _start_timer(settings)


def stop(settings: Settings) -> None:
    """Stop the timer and take this process out of worker_status (the worker shuts down)."""
    if _timer is None:  # never started here (a prefork worker's parent process)
        return
    _stop.set()
    if _timer is not None and _timer is not threading.current_thread():
        _timer.join(30)
    try:
        with pool(settings).connection() as conn:
            conn.execute("DELETE FROM worker_status WHERE worker = %s", (_worker_name(),))
    except Exception:
        log.warning("could not remove this worker from worker_status", exc_info=True)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _start_timer(settings: Settings) -> None:
    global _timer
    with _lock:
        if _timer is not None and _timer.is_alive():
            return
        _stop.clear()
        _timer = threading.Thread(target=_run_timer, args=(settings, _stop), name="registry-check", daemon=True)
        _timer.start()


def _run_timer(settings: Settings, stop: threading.Event) -> None:
    while True:
        check(settings)
        if stop.wait(max(settings.model_check_s, _MIN_CHECK_S)):
            return


def check(settings: Settings) -> None:
    """One tick of the timer: follow the registry (model-serving processes), then report to worker_status."""
    serving = _queues is None or serves_model(settings, _queues)  # None: started by a task, so it serves one
    try:
        versions = None
        with pool(settings).connection() as conn:
            if serving and settings.model_dir is None:
                versions = active_version(conn), shadow_version(conn)
        if versions is not None:
            with _lock:
                active, shadow = versions
                if active is not None:  # no active model: keep serving the current one
                    _active.follow(settings, active)
                _shadow.follow(settings, shadow)
                if _held is None:
                    _switch()
        with pool(settings).connection() as conn:
            _report(conn, serving)
    except Exception:
        log.warning("registry check failed; trying again in %.0fs", settings.model_check_s, exc_info=True)


def _report(conn: psycopg.Connection, serving: bool) -> None:
    """What this process consumes and serves, for the console's overview."""
    with _lock:
        active, shadow = (_active.version, _shadow.version) if serving else (None, None)
    conn.execute("INSERT INTO worker_status (worker, queues, model_version, shadow_version, seen_at)"
                 " VALUES (%s, %s, %s, %s, now()) ON CONFLICT (worker) DO UPDATE SET queues = EXCLUDED.queues,"
                 " model_version = EXCLUDED.model_version, shadow_version = EXCLUDED.shadow_version, seen_at = now()",
                 (_worker_name(), ",".join(_queues) if _queues else None, active, shadow))


def task_started() -> None:
    """A task begins in this process (Celery's task_prerun)."""
    global _in_task
    with _lock:
        _in_task = True


def task_finished() -> None:
    """The task ends: it lets its Enricher go, and whatever finished loading meanwhile is served now."""
    global _in_task, _held
    with _lock:
        _in_task, _held = False, None
        _switch()


def _wait_for_seen_load() -> None:
    """A load of a version the timer has seen is under way: wait for it, so this task runs on the new model."""
    with _lock:
        loading, wanted = (_active.loading, _active.wanted) if _active.is_loading() else (None, None)
    if loading is not None and wanted is not None:
        log.info("waiting for model %s to load before this task", wanted)
        loading.join(_LOAD_WAIT_S)


def enricher(settings: Settings) -> Enricher:
    """The Enricher the current task runs on: the same one until the task ends; loaded on first use."""
    global _held
    with _lock:
        if _held is not None:
            return _held
    if settings.model_dir is None:
        _wait_for_seen_load()  # outside the lock: the loading thread takes it to hand its model over
    with _lock:
        if _held is not None:
            return _held
        _switch()
        if _active.enricher is None:
            _active.enricher = _load(settings, active_model_dir(settings))
            _mark_served(None, _active.version)
        current = _active.enricher
        if _in_task:
            _held = current
    if settings.model_dir is None:
        _start_timer(settings)  # a worker started in-process (tests) has had no `start`
    return current


def shadow_enricher() -> Enricher | None:
    """The shadow candidate's Enricher, when the registry names one and it is loaded; else None."""
    with _lock:
        return _shadow.enricher


def is_loaded() -> bool:
    return _active.enricher is not None


def pool(settings: Settings) -> ConnectionPool:
    global _pool
    with _lock:
        if _pool is None:
            _pool = make_pool(settings, size=min(settings.db_pool_size, 2))
        return _pool


def reset() -> None:
    """Stop the timer, forget the models and the pool (tests)."""
    global _active, _shadow, _pool, _in_task, _held, _queues, _timer
    _stop.set()
    for thread in (_timer, _active.loading, _shadow.loading):
        if thread is not None:
            thread.join(60)  # outside the lock: a finishing load takes it
    with _lock:
        _active.close()
        _shadow.close()
        _mark_served(_active.version, None)
        if _pool is not None:
            _pool.close()
        _active, _shadow, _pool = _Slot("active"), _Slot("shadow"), None
        _in_task, _held, _queues, _timer = False, None, None, None
