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
import threading
import time
from pathlib import Path

from core import metrics
from core.config import Settings

log = logging.getLogger(__name__)
_lock = threading.RLock()  # enricher() reaches pool() while holding it
_enricher = None
_pool = None
_loading: threading.Thread | None = None
_ready = None  # an Enricher loaded in the background, waiting for the next task
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


def _active_dir(settings: Settings, conn, version: str | None = None) -> Path:
    from model.artifacts import store_from_settings
    from model.registry import model_dir_for

    return model_dir_for(conn, version=version, store=store_from_settings(settings))


def active_model_dir(settings: Settings) -> Path:
    """ENRICH_MODEL_DIR if set, else the registry's active model (fetched and verified)."""
    if settings.model_dir is not None:
        return Path(settings.model_dir)
    with pool(settings).connection() as conn:
        return _active_dir(settings, conn)


def _serve(new) -> None:
    global _enricher
    old, _enricher = _enricher, new
    if old is not None:
        metrics.MODEL_SERVED.labels(model_version=old.model_version).set(0)
        old.close()
    metrics.MODEL_SERVED.labels(model_version=new.model_version).set(1)


def _load_in_background(settings: Settings, version: str) -> None:
    def run() -> None:
        global _ready
        try:
            with pool(settings).connection() as conn:
                model_dir = _active_dir(settings, conn, version)
            loaded = _load(settings, model_dir)
            with _lock:
                _ready = loaded
        except Exception:  # noqa: BLE001 - keep serving the current model; the next check tries again
            log.exception("could not load model %s; still serving the current one", version)

    global _loading
    _loading = threading.Thread(target=run, name=f"load-{version}", daemon=True)
    _loading.start()
    log.info("active model is now %s: loading it in the background", version)


def _follow(settings: Settings) -> None:
    """Swap in a model loaded in the background; start loading when the registry names a new one."""
    global _ready, _checked_at
    if _ready is not None:
        _serve(_ready)
        log.info("now serving model %s", _ready.model_version)
        _ready = None
    now = time.monotonic()
    if now - _checked_at < settings.model_check_s or (_loading is not None and _loading.is_alive()):
        return
    _checked_at = now
    from model.registry import active_version

    try:
        with pool(settings).connection() as conn:
            version = active_version(conn)
    except Exception:  # noqa: BLE001 - a registry hiccup must not stop the worker; check again later
        log.warning("could not read the active model version", exc_info=True)
        return
    if version is not None and version != _enricher.model_version:
        _load_in_background(settings, version)


def enricher(settings: Settings):
    """The Enricher the next batch runs on: loaded on first call, then following the active model."""
    global _enricher, _checked_at
    with _lock:
        if _enricher is None:
            if settings.torch_threads:
                import torch

                torch.set_num_threads(settings.torch_threads)
            _serve(_load(settings, active_model_dir(settings)))
            _checked_at = time.monotonic()
        elif settings.model_dir is None:
            _follow(settings)
        return _enricher


def pool(settings: Settings):
    global _pool
    with _lock:
        if _pool is None:
            from core.db import make_pool

            _pool = make_pool(settings, size=min(settings.db_pool_size, 2))
        return _pool


def reset() -> None:
    """Forget the model and pool (tests)."""
    global _enricher, _pool, _ready, _loading, _checked_at
    with _lock:
        if _loading is not None:
            _loading.join(60)
        for e in (_enricher, _ready):
            if e is not None:
                e.close()
        if _pool is not None:
            _pool.close()
        _enricher = _pool = _ready = _loading = None
        _checked_at = 0.0
