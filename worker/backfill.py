"""Bringing the catalogue to the active model after a promotion or a rollback: every listing whose current
enrichment another version wrote is rewritten under the active one.

Celery task "enrich.backfill"(model_version) on queue "backfill", run by the GPU workers
(`enrich worker -Q gpu,backfill`). One task runs one chunk of ENRICH_TASK_LISTINGS listings and then
sends its successor, so live enrichment tasks get the worker between chunks:

  1. the version is no longer the registry's active model → its `backfills` row becomes 'cancelled'
     and the chain stops (the promotion or rollback that replaced it enqueued its own backfill);
  2. a fresh request (`send_backfill`: promote, rollback, `enrich backfill`) (re)starts the row:
     status 'running', total = live listings, done = total − what is still to do;
  3. live traffic first: while enrichment tasks wait on the GPU queue (or this worker still serves
     another model and is loading the new one in the background) the task sends itself again with a
     countdown of ENRICH_BACKFILL_PAUSE_S and returns;
  4. the next chunk, after the task's cursor (listing-id order), of listings whose current enrichment
     is not the version's — `worker.store.listings_to_enrich`'s rule (TODO_SQL): not deleted, and
     `listings.enriched_by` (the version that wrote the listing's rows) is another version or the
     content changed since, unless it failed on this very content — runs through the worker's Enricher
     without online neighbours (the reindex builds the version's shelves whole); `done` grows and the
     successor continues after the chunk;
  5. nothing left after the cursor: another pass from the start while listings are still to do
     (enriched meanwhile by a worker still serving the old model, or whose image host was down), at
     most MAX_PASSES and only while passes make progress; then the row is 'done', "enrich.reindex" is
     sent for the version (queue "cpu": it builds the shelves and switches readers to them), and
     models beyond ENRICH_KEEP_MODEL_VERSIONS lose their embeddings and shelves.

The rule is "who wrote it", not "is there an embedding of the version": after a rollback the restored
version's embeddings were kept (ENRICH_KEEP_MODEL_VERSIONS) while the rolled-back version rewrote the
listings' tags and review items, and a promotion whose earlier backfill was interrupted (then rolled
back, or edits since) finds embeddings of its own that no longer describe what the listings carry.
So a rollback's backfill rewrites every listing the rolled-back version wrote (the catalogue after its
own backfill, and the listings it enriched live), and a repeated promotion's backfill every listing
another version wrote.

What a chunk writes is `Enricher.run`'s, in one transaction per forward pass: the version's embeddings,
predicted tags rewritten under it (seller tags come from the event, corrected tags are kept), open
review items re-scored, `enriched_by` = the version. Readers after a rollback: the restored version's
kept shelves serve at once (`similar.common.SHELF_MODEL_SQL`; a version rolled back to from further
than ENRICH_KEEP_MODEL_VERSIONS has none, and the last active model's serve until its reindex); the
rolled-back version's online rows and heat maps are keyed by its version and no longer read (the
console shows a heat map beside a review item of the same version, and the backfill replaces the open
ones); listings only the rolled-back version saw join the restored version's shelves with the reindex
sent when the backfill is done.

Crash safety. Tasks ack late: a worker killed mid-chunk leaves the message unacked and the broker
hands it to another worker, which skips what was committed (those listings carry the version now) and
goes on. A successor is sent only after the chunk is committed and the chunk lock released, so a
kill between sending it and acking leaves two messages of the chain at worst. Copies never do a
chunk twice at once: each takes "the next listings still to do", under a session advisory lock
per version; a copy that finds the lock taken steps aside for a pause. The first copy to find
nothing left marks the row 'done' (an UPDATE … WHERE status = 'running'), so the reindex is sent once.
A chain that died anyway (retries spent on a database outage, a broker down while sending the
successor) leaves a 'running' row that stops moving: `enrich backfill` sends a fresh request, which
starts from the first listing still to do.

Progress: the `backfills` row (total, done, updated_at), `enrich_backfill_remaining{model_version}`,
`enrich backfill --wait`.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, LiteralString

import psycopg
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval
from psycopg.abc import Params
from psycopg.rows import class_row

from core import metrics
from core.celery_app import BACKFILL_TASK, REINDEX_TASK, app, queue_depth, task_settings
from core.config import Settings
from core.db import connect, database_url
from core.rows import fetch_required_value, fetch_values
from model.registry import active_version
from similar.nightly import prune_models
from worker import runtime

if TYPE_CHECKING:
    from worker.pipeline import Enricher  # imports torch, which cpu and train workers never load

log = get_task_logger(__name__)
_log = logging.getLogger(__name__)

MAX_PASSES = 3
_LOCK_NAMESPACE = "enrich.backfill"

# What `worker.store.listings_to_enrich` would still work on for a model version, as a WHERE clause
# over listings `l` (one parameter: the model version): live listings whose current enrichment is not the
# version's, a failure on this very content counting as done (see there why). IS NOT DISTINCT FROM, not =:
# a NULL enriched_hash or enriched_by (never enriched) must leave the listing to do, not drop it.
# Kept equal to it by a test.
TODO_SQL = (
    "l.status <> 'deleted'"
    " AND NOT (l.status <> 'pending' AND l.enriched_hash IS NOT DISTINCT FROM l.content_hash"
    "          AND (l.status = 'failed' OR l.enriched_by IS NOT DISTINCT FROM %s))"
)


# ---------------------------------------------------------------------------------------------
# progress rows

@dataclass(frozen=True)
class Progress:
    """A `backfills` row."""

    model_version: str
    status: str
    total: int
    done: int
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done)


_PROGRESS_COLUMNS = "model_version, status, total, done, started_at, updated_at, finished_at"


def _progress_rows(conn: psycopg.Connection, query: LiteralString, params: Params | None = None) -> list[Progress]:
    with conn.cursor(row_factory=class_row(Progress)) as cur:
        return cur.execute(query, params).fetchall()


def _progress_row(conn: psycopg.Connection, query: LiteralString, params: Params | None = None) -> Progress | None:
    rows = _progress_rows(conn, query, params)
    return rows[0] if rows else None


def progress(conn: psycopg.Connection, model_version: str) -> Progress | None:
    return _progress_row(conn, f"SELECT {_PROGRESS_COLUMNS} FROM backfills WHERE model_version = %s",
                         (model_version,))


def all_progress(conn: psycopg.Connection) -> list[Progress]:
    """Every backfill, the latest first."""
    return _progress_rows(conn, f"SELECT {_PROGRESS_COLUMNS} FROM backfills ORDER BY started_at DESC, model_version")


def _count_live(conn: psycopg.Connection) -> int:
    return int(fetch_required_value(conn, "SELECT count(*) FROM listings WHERE status <> 'deleted'"))


def count_todo(conn: psycopg.Connection, model_version: str) -> int:
    """Listings whose current enrichment is not the version's (one scan of the catalogue)."""
    return int(fetch_required_value(conn, f"SELECT count(*) FROM listings l WHERE {TODO_SQL}", (model_version,)))


def next_chunk(conn: psycopg.Connection, model_version: str, after: str | None, limit: int) -> list[str]:
    """The next `limit` listing ids after `after` (id order) whose current enrichment is not the version's."""
    if after is None:
        return fetch_values(conn, f"SELECT l.listing_id FROM listings l WHERE {TODO_SQL} "
                                  "ORDER BY l.listing_id LIMIT %s", (model_version, limit))
    return fetch_values(conn, f"SELECT l.listing_id FROM listings l WHERE l.listing_id > %s AND {TODO_SQL}"
                                  " ORDER BY l.listing_id LIMIT %s", (after, model_version, limit))


def _publish(p: Progress | None, model_version: str) -> None:
    remaining = 0 if p is None or p.status != "running" else p.remaining
    metrics.BACKFILL_REMAINING.labels(model_version=model_version).set(remaining)


def start(conn: psycopg.Connection, model_version: str) -> Progress:
    """(Re)start the version's row: 'running', total = live listings, done = total − still to do."""
    with conn.transaction():
        total = _count_live(conn)
        todo = count_todo(conn, model_version)
        [p] = _progress_rows(  # an upsert returns its one row
            conn,
            "INSERT INTO backfills (model_version, status, total, done) VALUES (%s, 'running', %s, %s)"
            " ON CONFLICT (model_version) DO UPDATE SET status = 'running', total = EXCLUDED.total,"
            " done = EXCLUDED.done, updated_at = now(), finished_at = NULL,"
            " started_at = CASE WHEN backfills.status = 'running' THEN backfills.started_at ELSE now() END"
            f" RETURNING {_PROGRESS_COLUMNS}",
            (model_version, total, max(0, total - todo)),
        )
    _publish(p, model_version)
    _log.info("backfill of %s: %d of %d listings to rewrite", model_version, p.remaining, p.total)
    return p


def cancel(conn: psycopg.Connection, model_version: str) -> bool:
    """Mark a running backfill cancelled (its model is no longer active). True if it was running."""
    row = conn.execute("UPDATE backfills SET status = 'cancelled', updated_at = now(), finished_at = now()"
                       " WHERE model_version = %s AND status = 'running' RETURNING model_version",
                       (model_version,)).fetchone()
    metrics.BACKFILL_REMAINING.labels(model_version=model_version).set(0)
    return row is not None


def touch(conn: psycopg.Connection, model_version: str) -> Progress | None:
    """A heartbeat while the chain waits (what `enrich backfill` reads to tell a live chain from a dead one)."""
    return _progress_row(conn, "UPDATE backfills SET updated_at = now() WHERE model_version = %s"
                         f" AND status = 'running' RETURNING {_PROGRESS_COLUMNS}", (model_version,))


def _advance(conn: psycopg.Connection, model_version: str, n: int) -> Progress | None:
    return _progress_row(conn, "UPDATE backfills SET done = least(total, done + %s), updated_at = now()"
                         f" WHERE model_version = %s AND status = 'running' RETURNING {_PROGRESS_COLUMNS}",
                         (n, model_version))


def finish(conn: psycopg.Connection, model_version: str) -> Progress | None:
    """Mark the backfill done with exact figures; the returned row only for the call that did it."""
    with conn.transaction():
        total = _count_live(conn)
        todo = count_todo(conn, model_version)
        p = _progress_row(
            conn,
            "UPDATE backfills SET status = 'done', total = %s, done = %s, updated_at = now(), finished_at = now()"
            f" WHERE model_version = %s AND status = 'running' RETURNING {_PROGRESS_COLUMNS}",
            (total, max(0, total - todo), model_version),
        )
    metrics.BACKFILL_REMAINING.labels(model_version=model_version).set(0)
    if p is None:
        return None
    if todo:
        _log.warning("backfill of %s done with %d listing(s) not rewritten under it (image host down "
                     "through %d passes?); they are rewritten when next edited, or by `enrich backfill`",
                     model_version, todo, MAX_PASSES)
    return p


# ---------------------------------------------------------------------------------------------
# one chunk

@dataclass
class Cursor:
    """Where a chain is: after this listing id, in this pass, having written `progress` listings in it."""

    after: str | None = None
    pass_no: int = 1
    progress: int = 0

    @classmethod
    def from_json(cls, d: dict | None) -> Cursor:
        return cls(**d) if d else cls()

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Step:
    """What `run_chunk` did. kind: 'chunk' (one chunk written), 'pass' (start again from the first id),
    'finished' (nothing left that more passes would do), 'busy' (another copy holds the chunk lock)."""

    kind: str
    cursor: Cursor
    enriched: int = 0
    failed: int = 0
    retry: int = 0
    skipped: int = 0
    progress: Progress | None = None
    ids: list[str] = field(default_factory=list)


def _lock_key(conn: psycopg.Connection, model_version: str) -> int:
    return int(fetch_required_value(conn, "SELECT hashtextextended(%s, 0)", (f"{_LOCK_NAMESPACE}:{model_version}",)))


def run_chunk(conn: psycopg.Connection, enricher: Enricher, model_version: str, cursor: Cursor,
              limit: int) -> Step:
    """Re-embed the next chunk after `cursor` with `enricher` (which must serve `model_version`).

    `conn` must be autocommit. Transient image faults are not retried here (the listing is left for the
    next pass), nor marked failed: a listing that was enriched stays as it was.
    """
    if enricher.model_version != model_version:
        raise ValueError(f"enricher serves {enricher.model_version}, not {model_version}")
    key = _lock_key(conn, model_version)
    if not fetch_required_value(conn, "SELECT pg_try_advisory_lock(%s)", (key,)):
        return Step("busy", cursor)
    try:
        ids = next_chunk(conn, model_version, cursor.after, limit)
        if not ids:
            if cursor.progress > 0 and cursor.pass_no < MAX_PASSES and count_todo(conn, model_version) > 0:
                return Step("pass", Cursor(None, cursor.pass_no + 1, 0))
            return Step("finished", cursor)
        out = enricher.run(conn, ids, neighbours=False)
        written = len(out.enriched) + len(out.failed)
        p = _advance(conn, model_version, written)
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    for outcome, n in (("enriched", len(out.enriched)), ("failed", len(out.failed)), ("retry", len(out.retry)),
                       ("skipped", len(out.skipped))):
        if n:
            metrics.BACKFILL_LISTINGS.labels(outcome=outcome).inc(n)
    _publish(p, model_version)
    return Step("chunk", Cursor(ids[-1], cursor.pass_no, cursor.progress + written), len(out.enriched),
                len(out.failed), len(out.retry), len(out.skipped), p, ids)


def run_inline(conn: psycopg.Connection, enricher: Enricher, settings: Settings) -> Progress | None:
    """The whole backfill of `enricher`'s model in this process, no broker (benchmarks, tools, tests):
    start → chunks → finish. Does not send the reindex nor prune. `conn` must be autocommit."""
    model_version = enricher.model_version
    start(conn, model_version)
    cursor = Cursor()
    while True:
        step = run_chunk(conn, enricher, model_version, cursor, settings.task_listings)
        if step.kind == "finished":
            return finish(conn, model_version)
        if step.kind == "busy":
            raise RuntimeError(f"another backfill of {model_version} holds the chunk lock")
        cursor = step.cursor


# ---------------------------------------------------------------------------------------------
# the Celery task

_conn_lock = threading.Lock()
_conn: psycopg.Connection | None = None
_conn_url: str | None = None


def _connection(settings: Settings) -> psycopg.Connection:
    """One autocommit connection per worker process for the chain (the chunk lock is a session advisory
    lock: a pooled connection would carry it on to other work)."""
    global _conn, _conn_url
    url = database_url(settings)
    with _conn_lock:
        if _conn is None or _conn.closed or _conn.broken or _conn_url != url:
            if _conn is not None and not _conn.closed:
                _conn.close()
            _conn, _conn_url = connect(url, autocommit=True), url
        return _conn


def reset() -> None:
    """Close this process's backfill connection (tests)."""
    global _conn, _conn_url
    with _conn_lock:
        if _conn is not None and not _conn.closed:
            _conn.close()
        _conn = _conn_url = None


def _live_traffic_waiting(settings: Settings) -> bool:
    try:
        return queue_depth(settings.gpu_queue) > 0
    except Exception:
        log.warning("could not read the depth of queue %r; going on", settings.gpu_queue, exc_info=True)
        return False


@app.task(name=BACKFILL_TASK, bind=True, acks_late=True, ignore_result=True)
def backfill_task(self, model_version: str, cursor: dict | None = None, reindex_queue: str | None = None) -> dict:
    """One step of the catalogue backfill of `model_version` (see the module docstring).

    `cursor` is None for a fresh request and carried by the chain's own messages; `reindex_queue`
    (default: the app's default queue, "cpu") is where the reindex goes when the backfill is done.
    """
    settings = task_settings()

    def again(next_cursor: Cursor, countdown: float | None = None) -> None:
        queue = (self.request.delivery_info or {}).get("routing_key") or settings.backfill_queue
        self.apply_async(args=[model_version], kwargs={"cursor": next_cursor.to_json(), "reindex_queue": reindex_queue},
                         queue=queue, countdown=countdown or None)

    try:
        conn = _connection(settings)
        if active_version(conn) != model_version:
            if cancel(conn, model_version):
                log.info("backfill of %s cancelled: it is no longer the active model", model_version)
            return {"status": "cancelled"}
        here = Cursor.from_json(cursor)
        if cursor is None:
            start(conn, model_version)
        else:
            p = progress(conn, model_version)
            if p is None or p.status != "running":
                return {"status": p.status if p else "missing"}  # finished or cancelled by another copy
        enricher = runtime.enricher(settings)
        if enricher.model_version != model_version:
            # the worker loads the new model in the background and swaps it in between tasks
            metrics.BACKFILL_PAUSES.labels(reason="model_loading").inc()
            touch(conn, model_version)
            again(here, settings.backfill_pause_s)
            return {"status": "waiting for the model"}
        if _live_traffic_waiting(settings):
            metrics.BACKFILL_PAUSES.labels(reason="live_traffic").inc()
            touch(conn, model_version)
            again(here, settings.backfill_pause_s)
            return {"status": "paused for live traffic"}
        step = run_chunk(conn, enricher, model_version, here, settings.task_listings)
        if step.kind == "busy":
            metrics.BACKFILL_PAUSES.labels(reason="busy").inc()
            again(here, settings.backfill_pause_s)
            return {"status": "another copy is running a chunk"}
        if step.kind in ("chunk", "pass"):
            if step.kind == "chunk":
                log.info("backfill of %s: %d rewritten, %d failed, %d left for the next pass, %d skipped "
                         "(%s of %s done)", model_version, step.enriched, step.failed, step.retry, step.skipped,
                         step.progress.done if step.progress else "?", step.progress.total if step.progress else "?")
            else:
                log.info("backfill of %s: pass %d from the start", model_version, step.cursor.pass_no)
            again(step.cursor)
            return {"status": step.kind, "enriched": step.enriched}
        done = finish(conn, model_version)
        if done is None:
            return {"status": "finished by another copy"}
        log.info("backfill of %s done: %d of %d listings; reindexing", model_version, done.done, done.total)
        # task_default_queue is "cpu" (core.celery_app.configure)
        app.send_task(REINDEX_TASK, kwargs={"model_version": model_version}, queue=reindex_queue)
        _prune(conn, settings)
        return {"status": "done", "total": done.total, "done": done.done}
    except psycopg.OperationalError as exc:
        reset()
        delay = get_exponential_backoff_interval(5, self.request.retries, 300, full_jitter=True)
        raise self.retry(exc=exc, countdown=delay, max_retries=settings.task_max_retries) from exc


def _prune(conn: psycopg.Connection, settings: Settings) -> None:
    try:
        prune_models(conn, settings=settings)
    except Exception:
        log.exception("pruning old model versions failed")


__all__ = ["Cursor", "Progress", "Step", "TODO_SQL", "all_progress", "backfill_task", "cancel", "count_todo",
           "finish", "next_chunk", "progress", "run_chunk", "run_inline", "start", "touch"]
