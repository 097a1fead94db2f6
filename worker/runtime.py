"""Per-process state of a worker: the model (loaded once) and the database pool.

CUDA and fork don't mix, so nothing here is created at import time: a prefork child loads the
model in `worker_process_init`, a solo worker on first use.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from core.config import Settings

log = logging.getLogger(__name__)
_lock = threading.Lock()
_enricher = None
_pool = None


def active_model_dir(settings: Settings) -> Path:
    """ENRICH_MODEL_DIR if set, else the 'active' model in the registry table."""
    if settings.model_dir is not None:
        return Path(settings.model_dir)
    from core.db import connection, database_url
    from model.registry import model_dir_for

    with connection(database_url(settings)) as conn:
        return model_dir_for(conn)


def enricher(settings: Settings):
    """The process's Enricher; the model is loaded on first call only."""
    global _enricher
    with _lock:
        if _enricher is None:
            from model.inference import load_predictor
            from worker.pipeline import Enricher

            if settings.torch_threads:
                import torch

                torch.set_num_threads(settings.torch_threads)
            model_dir = active_model_dir(settings)
            predictor = load_predictor(model_dir, device=settings.device,
                                       mixed_precision=settings.mixed_precision)
            import torch

            log.info("model %s loaded from %s on %s, %s (torch intra-op threads: %d)", predictor.version, model_dir,
                     predictor.device, predictor.amp_dtype or "fp32", torch.get_num_threads())
            _enricher = Enricher(predictor, settings)
        return _enricher


def pool(settings: Settings):
    global _pool
    with _lock:
        if _pool is None:
            from core.db import make_pool

            _pool = make_pool(settings, size=min(settings.db_pool_size, 2))
        return _pool


def reset() -> None:
    """Forget the model and pool (tests, and after a promotion in a long-lived process)."""
    global _enricher, _pool
    with _lock:
        if _enricher is not None:
            _enricher.close()
        if _pool is not None:
            _pool.close()
        _enricher = _pool = None
