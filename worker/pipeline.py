"""The enrichment core shared by Celery tasks and batch mode.

listing ids → (skip what is already done) → fetch + guard + decode images on a thread pool →
batched forward passes → combine images per listing → fill missing tags / review queue →
one Postgres transaction → online neighbours. Outcomes per listing: enriched, failed (permanent
image problems, with reasons), retry (transient source problems) or skipped (already done).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import psycopg

from core.config import Settings
from schemas.enrichment import Enrichment
from core import metrics
from core.images import ImageError, ImageLimits, ImageRejected, ImageUnavailable, decode_image, fetch_bytes
from core.s3 import make_s3_client
from worker.store import ListingToEnrich, listings_to_enrich, write_enrichments
from worker.tagging import combine_images, decide

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    enriched: list[Enrichment] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)   # listing id → reasons (permanent)
    retry: dict[str, str] = field(default_factory=dict)    # listing id → reasons (transient)
    skipped: list[str] = field(default_factory=list)       # already enriched for this model version
    images: int = 0

    @property
    def enriched_ids(self) -> list[str]:
        return [e.listing_id for e in self.enriched]


class Enricher:
    """Holds the model and the I/O clients of one process; `run(conn, ids)` enriches one batch."""

    def __init__(self, predictor, settings: Settings, io_threads: int = 8) -> None:
        self.predictor = predictor
        self.settings = settings
        self.limits = ImageLimits.from_settings(settings)
        self._s3 = None
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="image-io")

    @property
    def model_version(self) -> str:
        return self.predictor.version

    def _s3_client(self):
        if self._s3 is None:
            self._s3 = make_s3_client(self.settings)
        return self._s3

    def _load(self, uri: str):
        """One image → preprocessed CHW tensor, or the ImageError that stopped it."""
        t0 = time.perf_counter()
        try:
            s3 = self._s3_client() if uri.startswith("s3://") else None
            data = fetch_bytes(uri, self.settings, s3_client=s3)
            img = decode_image(data, self.limits, target_size=self.predictor.manifest.image_size, uri=uri)
            return self.predictor.preprocess(img)
        except ImageError as exc:
            metrics.IMAGES_REJECTED.labels(reason=exc.reason).inc()
            return exc
        finally:
            metrics.FETCH_LATENCY.observe(time.perf_counter() - t0)

    def submit_images(self, items: list[ListingToEnrich]) -> list[list[Future]]:
        """Start fetching + decoding every image of the batch on the I/O pool (order kept)."""
        return [[self._pool.submit(self._load, uri) for uri in item.event.images] for item in items]

    def forward(self, tensors: list) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """One forward pass over a list of preprocessed CHW tensors."""
        import torch

        chunk = torch.stack(tensors)
        if getattr(self.predictor, "device", None) is not None and self.predictor.device.type == "cuda":
            chunk = chunk.pin_memory()  # lets the host→GPU copy run asynchronously
        t0 = time.perf_counter()
        pred = self.predictor.predict(chunk)
        metrics.MODEL_LATENCY.observe(time.perf_counter() - t0)
        metrics.BATCH_SIZE.observe(len(tensors))
        return pred.category, pred.groups, pred.embedding

    def infer(self, items: list[ListingToEnrich], accept_partial: bool = False) -> tuple[BatchOutcome, list]:
        """Images + model + rules, no database. Returns the outcome and rows for write_enrichments.

        Pipelined: all images are submitted to the I/O pool first, and each forward pass starts as
        soon as batch_size images are ready, so decoding the next chunk overlaps the model.
        """
        out = BatchOutcome()
        futures = self.submit_images(items)
        bs = self.settings.batch_size
        good: list[tuple[ListingToEnrich, int]] = []
        waiting: list = []
        chunks: list[tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]] = []
        for item, futs in zip(items, futures):
            results = [f.result() for f in futs]
            tensors = [r for r in results if not isinstance(r, ImageError)]
            errors = [r for r in results if isinstance(r, ImageError)]
            transient = [e for e in errors if isinstance(e, ImageUnavailable)]
            if transient and not accept_partial:
                out.retry[item.listing_id] = "; ".join(str(e) for e in transient)
                continue
            if not tensors:
                out.failed[item.listing_id] = "no usable image: " + "; ".join(str(e) for e in errors)
                continue
            for e in errors:
                log.info("image skipped for listing %s: %s", item.listing_id, e,
                         extra={"listing_id": item.listing_id, "reason": e.reason})
            good.append((item, len(tensors)))
            waiting.extend(tensors)
            while len(waiting) >= bs:
                chunks.append(self.forward(waiting[:bs]))
                waiting = waiting[bs:]
        if waiting:
            chunks.append(self.forward(waiting))
        out.images = sum(n for _, n in good)
        rows = []
        if chunks:
            cat = np.concatenate([c[0] for c in chunks])
            groups = {g: np.concatenate([c[1][g] for c in chunks]) for g in chunks[0][1]}
            emb = np.concatenate([c[2] for c in chunks])
            m = self.predictor.manifest
            start = 0
            for item, n in good:
                sl = slice(start, start + n)
                start += n
                c, g, e = combine_images(cat[sl], {k: v[sl] for k, v in groups.items()}, emb[sl])
                enr = decide(item.event, m.taxonomy, m.model_version, c, g, m.thresholds, m.label_thresholds,
                             self.settings.default_threshold)
                rows.append((item, enr, e))
                out.enriched.append(enr)
        return out, rows

    def run(self, conn: psycopg.Connection, listing_ids: list[str], accept_partial: bool = False,
            neighbours: bool = True) -> BatchOutcome:
        """Enrich a batch of listings: one transaction for all writes, then online neighbours (unless
        `neighbours` is False: the catalogue backfill, whose model gets whole shelves from the reindex)."""
        items = listings_to_enrich(conn, list(dict.fromkeys(listing_ids)), self.model_version)
        conn.commit()  # end the read transaction: image fetching may take a while
        todo = {i.listing_id for i in items}
        out, rows = self.infer(items, accept_partial=accept_partial)
        out.skipped = [i for i in dict.fromkeys(listing_ids) if i not in todo]
        by_id = {i.listing_id: i for i in items}
        with conn.transaction():
            write_enrichments(conn, rows, [(by_id[i], reason) for i, reason in out.failed.items()])
        self._after_commit(conn, out, neighbours)
        return out

    def _after_commit(self, conn: psycopg.Connection, out: BatchOutcome, neighbours: bool = True) -> None:
        for enr in out.enriched:
            for tag in enr.tags.values():
                metrics.TAGS_WRITTEN.labels(source=tag.source.value).inc()
            for r in enr.review:
                metrics.REVIEW_ITEMS.labels(group=r.group).inc()
            log.debug("enriched listing %s", enr.listing_id, extra={"listing_id": enr.listing_id})
        for lid, reason in out.failed.items():
            log.warning("listing %s failed: %s", lid, reason, extra={"listing_id": lid})
        for lid, reason in out.retry.items():
            log.info("listing %s will be retried: %s", lid, reason, extra={"listing_id": lid})
        metrics.LISTINGS_DONE.labels(outcome="enriched").inc(len(out.enriched))
        metrics.LISTINGS_DONE.labels(outcome="failed").inc(len(out.failed))
        metrics.LISTINGS_DONE.labels(outcome="retry").inc(len(out.retry))
        metrics.LISTINGS_DONE.labels(outcome="skipped").inc(len(out.skipped))
        if out.enriched and neighbours:
            write_neighbours(conn, out.enriched_ids, self.model_version, self.settings)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def write_neighbours(conn: psycopg.Connection, listing_ids: list[str], model_version: str,
                     settings: Settings) -> int:
    """Online top-K for fresh listings. Best effort: the nightly reindex fills anything missed here."""
    from similar.online import write_online_neighbours

    try:
        with conn.transaction():
            return write_online_neighbours(conn, listing_ids, model_version, settings=settings)
    except Exception:  # noqa: BLE001 - tags are committed; neighbours must not fail the batch
        log.exception("online neighbours failed for %d listings", len(listing_ids))
        return 0


__all__ = ["BatchOutcome", "Enricher", "ImageRejected", "write_neighbours"]
