"""What the listing pages read: the search, one listing with its tags, correction history, review items,
similar items and stored heat maps, and the file of one heat map. The pages are enrich/console/listings.py."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from core.rows import fetch_all, fetch_one, fetch_value
from enrich.console.review_queue import Tag, group_values, listing_tags, listing_taxonomy, taxonomy_groups
from schemas.taxonomy import CATEGORY_GROUP, NOT_APPLICABLE, TYPE_GROUP
from similar.query import read_neighbours

SEARCH_LIMIT = 50
SHELF_K = 12


@dataclass(frozen=True)
class ListingHit:
    """A search result."""
    listing_id: str
    seller_id: str
    status: str
    title: str | None
    updated_at: datetime
    open_reviews: int


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search(conn: psycopg.Connection, q: str, status: str, limit: int = SEARCH_LIMIT) -> list[ListingHit]:
    """Listings whose id is `q`, starts with it, or whose title holds it (any status when `status` is empty):
    the exact id first, then the latest updated."""
    q = q.strip()[:300]
    return fetch_all(
        conn, ListingHit,
        """SELECT l.listing_id, l.seller_id, l.status, l.event->>'title' AS title, l.updated_at,
                  (SELECT count(*) FROM review_queue r WHERE r.listing_id = l.listing_id AND r.resolved_at IS NULL)
                      AS open_reviews
             FROM listings l
            WHERE (%(q)s = '' OR l.listing_id = %(q)s OR l.listing_id LIKE %(prefix)s
                   OR l.event->>'title' ILIKE %(like)s)
              AND (%(status)s = '' OR l.status = %(status)s)
            ORDER BY (l.listing_id = %(q)s) DESC, l.updated_at DESC, l.listing_id LIMIT %(limit)s""",
        {"q": q, "prefix": _like(q) + "%", "like": "%" + _like(q) + "%", "status": status, "limit": limit})


def listing_exists(conn: psycopg.Connection, listing_id: str) -> bool:
    return fetch_value(conn, "SELECT 1 FROM listings WHERE listing_id = %s", (listing_id,)) is not None


@dataclass(frozen=True)
class Neighbour:
    """One item on the similar-items shelf."""
    listing_id: str
    score: float
    title: str


def shelf(conn: psycopg.Connection, listing_id: str) -> tuple[list[Neighbour], str | None]:
    """The listing's similar items with their titles, and where they come from (None: nothing stored)."""
    try:
        neighbours, source = read_neighbours(conn, listing_id, k=SHELF_K)
    except LookupError:  # no model and no embeddings yet: nothing to show
        return [], None
    titles: dict[str, str | None] = dict(conn.execute(
        "SELECT listing_id, event->>'title' FROM listings WHERE listing_id = ANY(%s)",
        ([n.listing_id for n in neighbours],)).fetchall()) if neighbours else {}
    return [Neighbour(n.listing_id, n.score, titles.get(n.listing_id) or "") for n in neighbours], source


@dataclass(frozen=True)
class _ListingRow:
    listing_id: str
    seller_id: str
    status: str
    event: dict[str, Any]  # the ListingEvent as received
    error: str | None
    received_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class CorrectionRow:
    """A corrections row: one human label of the listing."""
    event_id: str
    tag_group: str
    old_value: str | None
    new_value: str
    corrected_by: str
    corrected_at: datetime


@dataclass(frozen=True)
class ReviewRow:
    """One of the listing's review items, open or resolved."""
    id: int
    tag_group: str
    candidates: list[list[Any]]  # [[value, confidence], ...] best first
    model_version: str
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None
    leased_by: str | None
    leased: bool | None  # a live lease: someone is reviewing it now


@dataclass(frozen=True)
class ListingView:
    """Everything the listing page shows."""
    listing_id: str
    seller_id: str
    status: str
    title: str
    description: str
    images: int
    error: str | None
    received_at: datetime
    updated_at: datetime
    rows: list[tuple[str, Tag | None]]  # every group (tagged, or known to the taxonomy) and its tag
    choices: dict[str, list[str]]  # values offered per group
    history: list[CorrectionRow]  # newest first
    reviews: list[ReviewRow]  # newest first
    why: dict[tuple[str, str], str]  # (group, model version) -> the value its stored heat map explains
    not_applicable: set[str]  # groups that do not apply to the listing's category (or type)
    category: str | None
    na: str  # how a group that does not apply is shown
    shelf: list[Neighbour]
    shelf_source: str | None
    taxonomy: str | None


def listing_view(conn: psycopg.Connection, listing_id: str) -> ListingView | None:
    row = fetch_one(conn, _ListingRow, "SELECT listing_id, seller_id, status, event, error, received_at, updated_at"
                    " FROM listings WHERE listing_id = %s", (listing_id,))
    if row is None:
        return None
    tags = listing_tags(conn, listing_id)
    history = fetch_all(conn, CorrectionRow,
                        "SELECT event_id, tag_group, old_value, new_value, corrected_by, corrected_at FROM corrections"
                        " WHERE listing_id = %s ORDER BY corrected_at DESC, received_at DESC", (listing_id,))
    reviews = fetch_all(conn, ReviewRow,
                        "SELECT id, tag_group, candidates, model_version, created_at, resolved_at, resolved_by,"
                        " leased_by, lease_until > now() AS leased FROM review_queue WHERE listing_id = %s"
                        " ORDER BY created_at DESC, id DESC", (listing_id,))
    taxonomy = listing_taxonomy(conn, listing_id)
    by_group = {t.tag_group: t for t in tags}
    groups = list(dict.fromkeys([*by_group, *taxonomy_groups(taxonomy)]))
    choices = {}
    for g in groups:  # a group the taxonomy lacks (a seller's own attribute): free text, with its past values
        values = group_values(taxonomy, g)
        choices[g] = values if values is not None else list(dict.fromkeys(
            [*([by_group[g].value] if g in by_group else []), *(h.new_value for h in history if h.tag_group == g),
             *(h.old_value for h in history if h.tag_group == g and h.old_value)]))
    # groups that do not apply to the listing's category (or type) show as n/a, not as missing
    category, type_ = (by_group[g].value if g in by_group else None for g in (CATEGORY_GROUP, TYPE_GROUP))
    not_applicable = set(taxonomy.not_applicable(category, type_)) - set(by_group) if taxonomy else set()
    neighbours, shelf_source = shelf(conn, listing_id)
    why = {(g, mv): value for g, mv, value in conn.execute(
        "SELECT tag_group, model_version, value FROM explanations WHERE listing_id = %s", (listing_id,))}
    event = row.event
    return ListingView(
        listing_id=row.listing_id, seller_id=row.seller_id, status=row.status, title=event.get("title") or "",
        description=event.get("description") or "", images=len(event.get("images") or []), error=row.error,
        received_at=row.received_at, updated_at=row.updated_at, rows=[(g, by_group.get(g)) for g in groups],
        choices=choices, history=history, reviews=reviews, why=why, not_applicable=not_applicable,
        category=category, na=NOT_APPLICABLE, shelf=neighbours, shelf_source=shelf_source,
        taxonomy=taxonomy.name if taxonomy else None)


def heat_map_uri(conn: psycopg.Connection, listing_id: str, group: str, model_version: str) -> str | None:
    """Where the stored heat map of a tag is, as the explanations table says (None: none stored)."""
    return fetch_value(conn, "SELECT uri FROM explanations WHERE listing_id = %s AND tag_group = %s"
                             " AND model_version = %s", (listing_id, group, model_version))
