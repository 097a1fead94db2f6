"""Postgres side of the worker: idempotent listing upserts and one-transaction enrichment writes.

Idempotency is by content: a listing's content hash is the sha256 of its canonical event without
the producer's event id, so a replayed or duplicated event changes nothing, while an edit changes
the hash, resets the listing to 'pending' and gets it re-enriched. Enrichment writes are upserts
keyed on (listing, group) / (model_version, listing), so re-running a batch leaves the same rows.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import class_row, kwargs_row
from psycopg.types.json import Jsonb

from core.rows import fetch_values
from schemas.enrichment import Enrichment, TagSource
from schemas.events import CorrectionEvent, ListingEvent
from worker.review_order import uncertainty


def content_hash(event: ListingEvent) -> str:
    body = event.model_dump(mode="json", exclude={"event_id"})
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def event_id(event: ListingEvent, chash: str | None = None) -> str:
    return event.event_id or f"{event.listing_id}:{(chash or content_hash(event))[:16]}"


@dataclass(frozen=True)
class UpsertResult:
    changed: list[str]   # new or edited listings (content hash differs)
    pending: list[str]   # everything that still needs enrichment (changed + unfinished earlier ones)
    deleted: list[str]   # listings marked deleted by this batch


def upsert_listings(conn: psycopg.Connection, events: list[ListingEvent], topic: str = "listings",
                    offsets: list[tuple[int, int]] | None = None) -> UpsertResult:
    """Insert or update listings in the caller's transaction. Later events for one id win.

    `pending` includes unchanged listings that are still 'pending' so that a crash between the
    database commit and the enqueue is healed by the replay that follows (at-least-once enqueue;
    the task itself is idempotent).
    """
    latest: dict[str, tuple[ListingEvent, int]] = {}
    for i, ev in enumerate(events):
        latest[ev.listing_id] = (ev, i)  # events are keyed by listing id: partition order is edit order
    if not latest:
        return UpsertResult([], [], [])
    ids, sellers, bodies, hashes, statuses = [], [], [], [], []
    for ev, _ in latest.values():
        ids.append(ev.listing_id)
        sellers.append(ev.seller_id)
        bodies.append(ev.model_dump_json())
        hashes.append(content_hash(ev))
        statuses.append("deleted" if ev.deleted else "pending")
    changed = fetch_values(
        conn,
        """INSERT INTO listings (listing_id, seller_id, event, content_hash, status)
           SELECT * FROM unnest(%s::text[], %s::text[], %s::jsonb[], %s::text[], %s::text[])
           ON CONFLICT (listing_id) DO UPDATE
              SET seller_id = EXCLUDED.seller_id, event = EXCLUDED.event,
                  content_hash = EXCLUDED.content_hash, status = EXCLUDED.status,
                  error = NULL, updated_at = now()
            WHERE listings.content_hash <> EXCLUDED.content_hash
           RETURNING listing_id""",
        (ids, sellers, bodies, hashes, statuses),
    )
    pending = fetch_values(
        conn,
        "SELECT listing_id FROM listings WHERE listing_id = ANY(%s) AND status = 'pending' ORDER BY listing_id",
        (ids,),
    )
    edited = set(changed)
    deleted = [i for i, s in zip(ids, statuses, strict=True) if s == "deleted" and i in edited]
    if deleted:
        # a removed listing leaves the similar-items candidates at once; history (tags) is kept
        conn.execute("DELETE FROM embeddings WHERE listing_id = ANY(%s)", (deleted,))
        conn.execute("DELETE FROM review_queue WHERE listing_id = ANY(%s) AND resolved_at IS NULL", (deleted,))
    eids = [event_id(ev, h) for (ev, _), h in zip(latest.values(), hashes, strict=True)]
    picked = [offsets[i] if offsets else (None, None) for _, i in latest.values()]
    parts, offs = [p for p, _ in picked], [o for _, o in picked]
    conn.execute(
        """INSERT INTO processed_events (event_id, topic, kafka_partition, kafka_offset)
           SELECT e, %s, p, o FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS t(e, p, o)
           ON CONFLICT (event_id) DO NOTHING""",
        (topic, eids, parts, offs),
    )
    return UpsertResult(changed=changed, pending=pending, deleted=deleted)


def claim_stale_pending(conn: psycopg.Connection, older_than_s: float, limit: int = 10_000) -> list[str]:
    """Listings still 'pending' ``older_than_s`` after their last change, oldest first: their task was
    lost (a broker that dropped it) or gave up (retries spent on a database outage). Claiming them
    sets their updated_at to now, so the next sweep leaves them to this one's task for another
    ``older_than_s`` instead of queueing a duplicate every run under a long backlog; SKIP LOCKED
    lets two sweeps run at once without claiming the same rows."""
    return fetch_values(
        conn,
        """WITH stale AS (
               SELECT listing_id, updated_at FROM listings
                WHERE status = 'pending' AND updated_at < now() - make_interval(secs => %s)
                ORDER BY updated_at, listing_id LIMIT %s FOR UPDATE SKIP LOCKED),
           claimed AS (
               UPDATE listings l SET updated_at = now() FROM stale
                WHERE l.listing_id = stale.listing_id
            RETURNING l.listing_id, stale.updated_at)
           SELECT listing_id FROM claimed ORDER BY updated_at, listing_id""",
        (older_than_s, limit),
    )


@dataclass(frozen=True)
class ListingToEnrich:
    listing_id: str
    content_hash: str
    event: ListingEvent

    @classmethod
    def from_row(cls, listing_id: str, content_hash: str, event: dict[str, Any]) -> ListingToEnrich:
        """A `listings` row (its event as stored JSON) → a validated event."""
        return cls(listing_id, content_hash, ListingEvent.model_validate(event))


def listings_to_enrich(conn: psycopg.Connection, listing_ids: list[str], model_version: str) -> list[ListingToEnrich]:
    """The listings of a task that still need work for this model version (skip = idempotent rerun): live ones
    whose current enrichment is not this version's. An embedding of the version does not count: one kept from
    before a rollback, or made from older content, says nothing about what the listing carries now.

    A listing that failed on its current content counts as done for every version: what failed is its images,
    which no model can read. Whatever rows it still carries (from its content before an edit, or from the
    version that enriched it before its photo became unreadable) stay, with their `enriched_by`: a permanent
    image error (a 403 from a misconfigured bucket) must never wipe a catalogue's tags. `worker.backfill.TODO_SQL`
    is the same rule for the whole catalogue (a test keeps them equal). A pending listing always needs work: it
    may have been edited back to the content it was enriched on, and only a write marks it done again."""
    with conn.cursor(row_factory=kwargs_row(ListingToEnrich.from_row)) as cur:
        return cur.execute(
            """SELECT l.listing_id, l.content_hash, l.event FROM listings l
                WHERE l.listing_id = ANY(%s) AND l.status <> 'deleted'
                  AND NOT (l.status <> 'pending' AND l.enriched_hash IS NOT DISTINCT FROM l.content_hash
                           AND (l.status = 'failed' OR l.enriched_by IS NOT DISTINCT FROM %s))
                ORDER BY l.listing_id""",
            (listing_ids, model_version),
        ).fetchall()


def listings_by_id(conn: psycopg.Connection, listing_ids: list[str]) -> list[ListingToEnrich]:
    """The live listings among these ids, as they are now (shadow predictions, re-runs)."""
    with conn.cursor(row_factory=kwargs_row(ListingToEnrich.from_row)) as cur:
        return cur.execute("SELECT listing_id, content_hash, event FROM listings WHERE listing_id = ANY(%s)"
                           " AND status <> 'deleted' ORDER BY listing_id", (listing_ids,)).fetchall()


def write_enrichments(conn: psycopg.Connection, results: list[tuple[ListingToEnrich, Enrichment, np.ndarray]],
                      failures: list[tuple[ListingToEnrich, str]]) -> int:
    """Write one batch in the caller's transaction. Returns the number of listings marked enriched.

    Corrected tags (set by people) survive re-enrichment; seller and predicted ones are rewritten
    from the current event so an edit that removes a seller value lets the model fill it. An enriched
    listing's `enriched_by` names the model version that wrote its rows; a failed one keeps its rows and
    `enriched_by` (see `listings_to_enrich`). A listing edited again while this batch ran is left 'pending'
    for the newer task.
    """
    done = 0
    if results:
        ids = [item.listing_id for item, _, _ in results]
        conn.execute("DELETE FROM listing_tags WHERE listing_id = ANY(%s) AND source <> 'corrected'", (ids,))
        conn.execute("DELETE FROM review_queue WHERE listing_id = ANY(%s) AND resolved_at IS NULL", (ids,))
        corrected: set[tuple[str, str]] = set(conn.execute(
            "SELECT listing_id, tag_group FROM listing_tags WHERE listing_id = ANY(%s) AND source = 'corrected'",
            (ids,)).fetchall())
        tag_rows, review_rows, emb_rows = [], [], []
        for item, enr, emb in results:
            for group, tag in enr.tags.items():
                evidence = None if tag.evidence is None else Jsonb(tag.evidence.model_dump(mode="json"))
                tag_rows.append((item.listing_id, group, tag.value, tag.source.value, tag.confidence,
                                 tag.model_version, evidence))
            for r in enr.review:
                if (item.listing_id, r.group) in corrected:
                    continue  # a person already decided this group: nothing to review
                reason = None if r.reason is None else Jsonb(r.reason.model_dump(mode="json"))
                # ranked at once by its own uncertainty (worker.review_order), re-ranked by the next refresh
                review_rows.append((item.listing_id, r.group, Jsonb([list(c) for c in r.candidates]),
                                    r.threshold, reason, enr.model_version, uncertainty(r.candidates)))
            vec = np.ascontiguousarray(emb, dtype="<f4")
            emb_rows.append((item.listing_id, enr.model_version, int(vec.shape[0]), vec.tobytes()))
        with conn.cursor() as cur:
            cur.executemany(
                """INSERT INTO listing_tags (listing_id, tag_group, value, source, confidence, model_version,
                                            evidence)
                   VALUES (%s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (listing_id, tag_group) DO NOTHING""",  # a corrected tag stays
                tag_rows,
            )
            cur.executemany(
                """INSERT INTO review_queue (listing_id, tag_group, candidates, threshold, reason, model_version,
                                            priority)
                   VALUES (%s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (listing_id, tag_group, model_version)
                   DO UPDATE SET candidates = EXCLUDED.candidates, threshold = EXCLUDED.threshold,
                                 reason = EXCLUDED.reason, priority = EXCLUDED.priority, created_at = now(),
                                 resolved_at = NULL, flagged_by = NULL, flag_note = NULL, flagged_at = NULL""",
                review_rows,  # a conflict is a new question: reopened, unflagged, ranked again
            )
            cur.executemany(
                """INSERT INTO embeddings (listing_id, model_version, dim, vector) VALUES (%s, %s, %s, %s)
                   ON CONFLICT (model_version, listing_id)
                   DO UPDATE SET dim = EXCLUDED.dim, vector = EXCLUDED.vector, created_at = now(),
                                 written_xid = pg_current_xact_id()""",
                emb_rows,
            )
            cur.executemany(
                """UPDATE listings SET status = 'enriched', enriched_hash = %s, enriched_by = %s, error = NULL,
                                      updated_at = now()
                    WHERE listing_id = %s AND content_hash = %s""",
                [(item.content_hash, enr.model_version, item.listing_id, item.content_hash)
                 for item, enr, _ in results],
            )
            done = len(results)
    if failures:
        conn.cursor().executemany(
            """UPDATE listings SET status = 'failed', enriched_hash = %s, error = %s, updated_at = now()
                WHERE listing_id = %s AND content_hash = %s""",
            [(item.content_hash, reason[:2000], item.listing_id, item.content_hash) for item, reason in failures],
        )
    return done


def known_listings(conn: psycopg.Connection, listing_ids: list[str]) -> set[str]:
    """Those of these listings the catalogue has (deleted ones included)."""
    return set(fetch_values(conn, "SELECT listing_id FROM listings WHERE listing_id = ANY(%s)", (list(listing_ids),)))


def record_correction(conn: psycopg.Connection, ev: CorrectionEvent) -> bool:
    """Store a person's correction and make it the listing's current value. False if already seen."""
    inserted = conn.execute(
        """INSERT INTO corrections (event_id, listing_id, tag_group, old_value, new_value, corrected_by, corrected_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING RETURNING event_id""",
        (ev.event_id, ev.listing_id, ev.group, ev.old_value, ev.new_value, ev.corrected_by, ev.corrected_at),
    ).fetchone()
    if inserted is None:
        return False
    # the tag only exists for a known listing (FK); the correction row is kept either way for training
    conn.execute(
        """INSERT INTO listing_tags (listing_id, tag_group, value, source, confidence, model_version)
           SELECT %s, %s, %s, %s, NULL, NULL WHERE EXISTS (SELECT 1 FROM listings WHERE listing_id = %s)
           ON CONFLICT (listing_id, tag_group) DO UPDATE
              SET value = EXCLUDED.value, source = EXCLUDED.source, confidence = NULL,
                  model_version = NULL, evidence = NULL, updated_at = now()""",
        (ev.listing_id, ev.group, ev.new_value, TagSource.corrected.value, ev.listing_id),
    )
    conn.execute(
        """UPDATE review_queue SET resolved_at = now()
            WHERE listing_id = %s AND tag_group = %s AND resolved_at IS NULL""",
        (ev.listing_id, ev.group),
    )
    return True


@dataclass(frozen=True)
class StoredTag:
    """A `listing_tags` row: a listing's current value of one group and where it came from."""

    tag_group: str
    value: str
    source: str  # a TagSource value: seller, predicted or corrected
    confidence: float | None
    model_version: str | None


def tags_of(conn: psycopg.Connection, listing_id: str) -> dict[str, StoredTag]:
    """A listing's stored tags by group."""
    with conn.cursor(row_factory=class_row(StoredTag)) as cur:
        rows = cur.execute("SELECT tag_group, value, source, confidence, model_version FROM listing_tags"
                           " WHERE listing_id = %s", (listing_id,)).fetchall()
    return {tag.tag_group: tag for tag in rows}
