"""The enrichment core shared by Celery tasks and batch mode.

listing ids → (skip what is already done) → three stages at once, joined by bounded queues:

  fetch + guard + decode   the I/O thread pool, up to two forward batches of images ahead of the model
  forward                  the calling thread: batch_size images per pass (torch releases the GIL), then
                           the listings they complete: combine images, fill missing tags / review queue,
                           shelf embedding (image + the listing's category, worker/tagging.py shelf_vector)
  write                    a writer thread on the caller's connection: the listings of each forward pass
                           in one Postgres transaction as soon as it ends (then, if enabled, heat maps of
                           its review items: worker/explanations.py); after the last one, the
                           online neighbours of the whole batch (one call: each reads every embedding
                           since the similar-items snapshot, so once per task, not once per pass)

so the model runs while the next photos decode and the last results are written, and memory stays flat
however many listings a task holds. `run` returns only after the writer has committed everything, so an
acks-late task is acknowledged after its rows are durable; a rerun after a crash skips the listings
already committed. Outcomes per listing: enriched, failed (permanent image problems, with reasons),
retry (transient source problems) or skipped (already done).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import psycopg
import torch

from core import metrics
from core.config import Settings
from core.images import ImageError, ImageLimits, ImageRejected, ImageUnavailable, fetch_bytes
from core.s3 import make_s3_client
from schemas.enrichment import Enrichment
from similar.online import write_online_neighbours
from worker.decode import Prepared, make_decoder
from worker.explanations import ReviewToExplain, store_explanations
from worker.store import ListingToEnrich, listings_to_enrich, write_enrichments
from worker.tagging import combine_images, decide, shelf_vector

log = logging.getLogger(__name__)

WRITE_QUEUE = 2  # forward passes whose rows may wait for the writer before the model waits for it


@dataclass
class Settled:
    """Listings settled by one forward pass, and those settled without the model: one transaction's rows."""
    rows: list[tuple[ListingToEnrich, Enrichment, np.ndarray]] = field(default_factory=list)
    failed: list[tuple[ListingToEnrich, str]] = field(default_factory=list)  # permanent, with reasons
    retry: dict[str, str] = field(default_factory=dict)  # listing id → reasons (transient)
    images: int = 0
    explain: list[ReviewToExplain] = field(default_factory=list)  # with ENRICH_EXPLAIN_REVIEW: for the heat maps

    def __bool__(self) -> bool:
        return bool(self.rows or self.failed or self.retry)


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

    def add(self, part: Settled) -> None:
        self.enriched += [enr for _, enr, _ in part.rows]
        self.failed.update((item.listing_id, reason) for item, reason in part.failed)
        self.retry.update(part.retry)
        self.images += part.images


@dataclass(eq=False)
class _InFlight:
    """A listing whose images are on their way through the model."""
    item: ListingToEnrich
    left: int  # images not through a forward pass yet
    errors: list[ImageError]
    outputs: list[tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]] = field(default_factory=list)  # per image
    first: torch.Tensor | None = None  # its first photo's tensor, kept only when review items get heat maps


class Enricher:
    """Holds the model and the I/O clients of one process; `run(conn, ids)` enriches one batch."""

    def __init__(self, predictor, settings: Settings, io_threads: int = 8) -> None:
        self.predictor = predictor
        self.settings = settings
        self.limits = ImageLimits.from_settings(settings)
        self.decoder = make_decoder(predictor, self.limits)
        self._s3 = None
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="image-io")

    @property
    def model_version(self) -> str:
        return self.predictor.version

    def _s3_client(self):
        if self._s3 is None:
            self._s3 = make_s3_client(self.settings)
        return self._s3

    def _load(self, uri: str) -> Prepared | ImageError:
        """One image → the decoder's prepared form (a CHW tensor, or JPEG bytes for the batch step), or the
        ImageError that stopped it."""
        t0 = time.perf_counter()
        try:
            s3 = self._s3_client() if uri.startswith("s3://") else None
            return self.decoder.prepare(fetch_bytes(uri, self.settings, s3_client=s3), uri)
        except ImageError as exc:
            metrics.IMAGES_REJECTED.labels(reason=exc.reason).inc()
            return exc
        finally:
            metrics.FETCH_LATENCY.observe(time.perf_counter() - t0)

    def _fetched(self, items: list[ListingToEnrich]) -> Iterator[tuple[ListingToEnrich, list[Prepared | ImageError]]]:
        """Each listing with its images' results, in order. Fetching and decoding run ahead on the I/O pool
        by at most two forward batches of images: enough to keep the model fed, bounded in memory."""
        ahead = 2 * self.settings.batch_size
        window: deque[tuple[ListingToEnrich, list[Future[Prepared | ImageError]]]] = deque()
        queued = 0
        todo = iter(items)
        while True:
            while queued < ahead and (item := next(todo, None)) is not None:
                futures = [self._pool.submit(self._load, uri) for uri in item.event.images]
                window.append((item, futures))
                queued += len(futures)
            if not window:
                return
            item, futures = window.popleft()
            queued -= len(futures)
            yield item, [f.result() for f in futures]

    def forward(self, tensors: list[torch.Tensor]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """One forward pass over a list of preprocessed CHW tensors."""
        chunk = torch.stack(tensors)
        if chunk.device.type == "cpu" and getattr(self.predictor, "device", None) is not None \
                and self.predictor.device.type == "cuda":
            chunk = chunk.pin_memory()  # lets the host→GPU copy run asynchronously
        t0 = time.perf_counter()
        pred = self.predictor.predict(chunk)
        metrics.MODEL_LATENCY.observe(time.perf_counter() - t0)
        metrics.BATCH_SIZE.observe(len(tensors))
        return pred.category, pred.groups, pred.embedding

    def settle(self, items: list[ListingToEnrich], accept_partial: bool = False) -> Iterator[Settled]:
        """Images + model + rules, no database: after each forward pass, the listings it completed (with
        those settled without the model since the last one). Listings come out in the order of `items`."""
        bs = self.settings.batch_size
        part = Settled()
        waiting: list[tuple[_InFlight, Prepared]] = []
        for item, results in self._fetched(items):
            ready = [r for r in results if not isinstance(r, ImageError)]
            errors = [r for r in results if isinstance(r, ImageError)]
            transient = [e for e in errors if isinstance(e, ImageUnavailable)]
            if transient and not accept_partial:
                part.retry[item.listing_id] = "; ".join(str(e) for e in transient)
            elif not ready:
                part.failed.append((item, "no usable image: " + "; ".join(str(e) for e in errors)))
            else:
                listing = _InFlight(item, len(ready), errors)
                waiting += [(listing, p) for p in ready]
            while len(waiting) >= bs:
                self._predict(waiting[:bs], part)
                waiting = waiting[bs:]
                if part:
                    yield part
                    part = Settled()
        if waiting:
            self._predict(waiting, part)
        if part:
            yield part

    def _predict(self, batch: list[tuple[_InFlight, Prepared]], part: Settled) -> None:
        """One forward pass; the listings whose last image it held are decided into `part`."""
        owners: list[_InFlight] = []
        tensors: list[torch.Tensor] = []
        for (listing, _), x in zip(batch, self.decoder.finish([p for _, p in batch]), strict=True):
            if isinstance(x, ImageError):  # a JPEG only the batch step could decode, and could not
                metrics.IMAGES_REJECTED.labels(reason=x.reason).inc()
                listing.errors.append(x)
                listing.left -= 1
            else:
                owners.append(listing)
                tensors.append(x)
        if tensors:
            cat, groups, emb = self.forward(tensors)
            for j, listing in enumerate(owners):
                listing.outputs.append((cat[j], {g: v[j] for g, v in groups.items()}, emb[j]))
                listing.left -= 1
                if listing.first is None and self.settings.explain_review:
                    listing.first = tensors[j]
        for listing in dict.fromkeys(listing for listing, _ in batch):
            if listing.left == 0:
                self._decide(listing, part)

    def _decide(self, listing: _InFlight, part: Settled) -> None:
        item = listing.item
        if not listing.outputs:
            part.failed.append((item, "no usable image: " + "; ".join(str(e) for e in listing.errors)))
            return
        for error in listing.errors:
            log.info("image skipped for listing %s: %s", item.listing_id, error,
                     extra={"listing_id": item.listing_id, "reason": error.reason})
        cat = np.stack([o[0] for o in listing.outputs])
        groups = {g: np.stack([o[1][g] for o in listing.outputs]) for g in listing.outputs[0][1]}
        emb = np.stack([o[2] for o in listing.outputs])
        m = self.predictor.manifest
        c, g, e = combine_images(cat, groups, emb)
        enr = decide(item.event, m.taxonomy, m.model_version, c, g, m.thresholds, m.label_thresholds,
                     self.settings.default_threshold)
        part.rows.append((item, enr, shelf_vector(enr, m.taxonomy, e, c, m.shelf_category_weight)))
        part.images += len(listing.outputs)
        if enr.review and listing.first is not None:
            part.explain.append(ReviewToExplain(item.listing_id, listing.first, enr.review))

    def infer(self, items: list[ListingToEnrich], accept_partial: bool = False
              ) -> tuple[BatchOutcome, list[tuple[ListingToEnrich, Enrichment, np.ndarray]]]:
        """Images + model + rules, no database. Returns the outcome and rows for write_enrichments."""
        out = BatchOutcome()
        rows: list[tuple[ListingToEnrich, Enrichment, np.ndarray]] = []
        for part in self.settle(items, accept_partial=accept_partial):
            out.add(part)
            rows += part.rows
        return out, rows

    def run(self, conn: psycopg.Connection, listing_ids: list[str], accept_partial: bool = False,
            neighbours: bool = True) -> BatchOutcome:
        """Enrich a batch of listings: one transaction per forward pass's listings, then online neighbours
        (unless `neighbours` is False: the catalogue backfill, whose model gets whole shelves from the
        reindex). Returns after every write is committed."""
        ids = list(dict.fromkeys(listing_ids))
        items = listings_to_enrich(conn, ids, self.model_version)
        conn.commit()  # end the read transaction: image fetching may take a while
        todo = {i.listing_id for i in items}
        out = BatchOutcome(skipped=[i for i in ids if i not in todo])
        metrics.LISTINGS_DONE.labels(outcome="skipped").inc(len(out.skipped))
        with _Writer(self, conn, neighbours) as writer:
            for part in self.settle(items, accept_partial=accept_partial):
                writer.put(part)
                out.add(part)
        return out

    def write(self, conn: psycopg.Connection, part: Settled) -> None:
        """One transaction for the part's rows and failures, then metrics and logs."""
        with conn.transaction():
            write_enrichments(conn, part.rows, part.failed)
        if part.explain:  # after the commit: a heat map never holds back or fails the tags
            store_explanations(conn, self.predictor, part.explain, self.settings)
        for _, enr, _ in part.rows:
            for tag in enr.tags.values():
                metrics.TAGS_WRITTEN.labels(source=tag.source.value).inc()
            for r in enr.review:
                metrics.REVIEW_ITEMS.labels(group=r.group).inc()
            log.debug("enriched listing %s", enr.listing_id, extra={"listing_id": enr.listing_id})
        for item, reason in part.failed:
            log.warning("listing %s failed: %s", item.listing_id, reason, extra={"listing_id": item.listing_id})
        for lid, reason in part.retry.items():
            log.info("listing %s will be retried: %s", lid, reason, extra={"listing_id": lid})
        metrics.LISTINGS_DONE.labels(outcome="enriched").inc(len(part.rows))
        metrics.LISTINGS_DONE.labels(outcome="failed").inc(len(part.failed))
        metrics.LISTINGS_DONE.labels(outcome="retry").inc(len(part.retry))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Writer:
    """The write stage: a thread that owns `conn`, writes each part put to it (`Enricher.write`) and, after
    the last, the online neighbours of every listing it wrote.

    `put` blocks while WRITE_QUEUE parts wait, so the model never runs far ahead of the database, and
    raises the writer's error once it had one (the batch fails and is retried as a whole; committed
    listings are skipped then). Leaving the `with` block waits until every part put is committed.
    """

    def __init__(self, enricher: Enricher, conn: psycopg.Connection, neighbours: bool) -> None:
        self._enricher, self._conn, self._neighbours = enricher, conn, neighbours
        self._queue: queue.Queue[Settled | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="enrich-writer", daemon=True)

    def __enter__(self) -> _Writer:
        self._thread.start()
        return self

    def put(self, part: Settled) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(part)

    def _loop(self) -> None:
        written: list[str] = []
        while (part := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining, so that `put` never blocks on a writer that stopped writing
            try:
                self._enricher.write(self._conn, part)
                written += [item.listing_id for item, _, _ in part.rows]
            except BaseException as exc:
                self._error = exc
        if written and self._neighbours and self._error is None:
            e = self._enricher
            write_neighbours(self._conn, written, e.model_version, e.settings)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc is None and self._error is not None:
            raise self._error


def write_neighbours(conn: psycopg.Connection, listing_ids: list[str], model_version: str,
                     settings: Settings) -> int:
    """Online top-K for fresh listings. Best effort: the nightly reindex fills anything missed here."""
    try:
        with conn.transaction():
            return write_online_neighbours(conn, listing_ids, model_version, settings=settings)
    except Exception:
        log.exception("online neighbours failed for %d listings", len(listing_ids))
        return 0


__all__ = ["BatchOutcome", "Enricher", "ImageRejected", "write_neighbours"]
