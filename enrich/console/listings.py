"""Listings: a search page (id or title, status filter) and one page per listing with every tag, its
provenance, confidence and model version, the similar-items shelf, the correction history, the review items
with their stored heat maps ("why", worker/explanations.py) and a correction form for any tag (through the
same path as a Kafka CorrectionEvent, see review.apply_correction).

Browsers resolve the ids `.` and `..` out of a path (/listings/.. is /), so every listing URL has a query-string
twin: /listing?id=, /listing/correct?id=, /listing/why?id=; pages link through deps.listing_href and the
`listing_urls` below, which pick the twin for those two ids only."""
from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import RedirectResponse, Response

from enrich.console.auth import User, check_csrf, current_user
from enrich.console.deps import connection, listing_href, render
from enrich.console.review import Conflict, apply_correction, group_values, listing_taxonomy, taxonomy_groups
from schemas.taxonomy import CATEGORY_GROUP, NOT_APPLICABLE, TYPE_GROUP

log = logging.getLogger(__name__)
router = APIRouter()
STATUSES = ("pending", "enriched", "failed", "deleted")
SEARCH_LIMIT = 50
SHELF_K = 12


def _dotted(listing_id: str) -> bool:
    return listing_id in (".", "..")


def listing_urls(listing_id: str) -> dict:
    """The listing page's own URLs: where its correction form posts, and its heat maps' base (group and model
    are added as query parameters, or the group as a path segment)."""
    lid = quote(listing_id, safe="")
    if _dotted(listing_id):
        return {"correct": f"/listing/correct?id={lid}", "why": f"/listing/why?id={lid}&group="}
    return {"correct": f"/listings/{lid}/correct", "why": f"/listings/{lid}/why/"}


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search(conn, q: str, status: str, limit: int = SEARCH_LIMIT) -> list[tuple]:
    q = q.strip()[:300]
    return conn.execute(
        """SELECT l.listing_id, l.seller_id, l.status, l.event->>'title', l.updated_at,
                  (SELECT count(*) FROM review_queue r WHERE r.listing_id = l.listing_id AND r.resolved_at IS NULL)
             FROM listings l
            WHERE (%(q)s = '' OR l.listing_id = %(q)s OR l.listing_id LIKE %(prefix)s
                   OR l.event->>'title' ILIKE %(like)s)
              AND (%(status)s = '' OR l.status = %(status)s)
            ORDER BY (l.listing_id = %(q)s) DESC, l.updated_at DESC, l.listing_id LIMIT %(limit)s""",
        {"q": q, "prefix": _like(q) + "%", "like": "%" + _like(q) + "%", "status": status, "limit": limit},
    ).fetchall()


@router.get("/listings")
def listings_page(request: Request, q: str = "", status: str = "", user: User = Depends(current_user)):
    status = status if status in STATUSES else ""
    with connection(request) as conn:
        rows = search(conn, q, status)
    return render(request, "listings.html", user=user, page="listings", q=q, status=status, statuses=STATUSES,
                  rows=rows, limit=SEARCH_LIMIT)


def _shelf(conn, listing_id: str) -> tuple[list[tuple[str, float, str]], str | None]:
    from similar.query import read_neighbours

    try:
        neighbours, source = read_neighbours(conn, listing_id, k=SHELF_K)
    except LookupError:  # no model and no embeddings yet: nothing to show
        return [], None
    titles = dict(conn.execute("SELECT listing_id, event->>'title' FROM listings WHERE listing_id = ANY(%s)",
                               ([n.listing_id for n in neighbours],)).fetchall()) if neighbours else {}
    return [(n.listing_id, n.score, titles.get(n.listing_id) or "") for n in neighbours], source


def listing_view(conn, listing_id: str) -> dict | None:
    row = conn.execute("SELECT listing_id, seller_id, status, event, error, received_at, updated_at FROM listings"
                       " WHERE listing_id = %s", (listing_id,)).fetchone()
    if row is None:
        return None
    tags = conn.execute("SELECT tag_group, value, source, confidence, model_version, updated_at FROM listing_tags"
                        " WHERE listing_id = %s ORDER BY tag_group", (listing_id,)).fetchall()
    history = conn.execute("SELECT event_id, tag_group, old_value, new_value, corrected_by, corrected_at"
                           " FROM corrections WHERE listing_id = %s ORDER BY corrected_at DESC, received_at DESC",
                           (listing_id,)).fetchall()
    reviews = conn.execute("SELECT id, tag_group, candidates, model_version, created_at, resolved_at, resolved_by,"
                           " leased_by, lease_until > now() FROM review_queue WHERE listing_id = %s"
                           " ORDER BY created_at DESC, id DESC", (listing_id,)).fetchall()
    taxonomy = listing_taxonomy(conn, listing_id)
    by_group = {t[0]: t for t in tags}
    groups = list(dict.fromkeys([*by_group, *taxonomy_groups(taxonomy)]))
    choices = {}
    for g in groups:  # a group the taxonomy lacks (a seller's own attribute): free text, with its past values
        values = group_values(taxonomy, g)
        choices[g] = values if values is not None else list(dict.fromkeys(
            [*([by_group[g][1]] if g in by_group else []), *(h[3] for h in history if h[1] == g),
             *(h[2] for h in history if h[1] == g and h[2])]))
    # seed 001: groups that do not apply to the listing's category (or type) show as n/a, not as missing
    category, type_ = (by_group[g][1] if g in by_group else None for g in (CATEGORY_GROUP, TYPE_GROUP))
    not_applicable = set(taxonomy.not_applicable(category, type_)) - set(by_group) if taxonomy else set()
    shelf, shelf_source = _shelf(conn, listing_id)
    why = {(g, mv): value for g, mv, value in conn.execute(
        "SELECT tag_group, model_version, value FROM explanations WHERE listing_id = %s", (listing_id,))}
    event = row[3]
    return {"listing_id": row[0], "seller_id": row[1], "status": row[2], "title": event.get("title") or "",
            "description": event.get("description") or "", "images": len(event.get("images") or []),
            "error": row[4], "received_at": row[5], "updated_at": row[6],
            "rows": [(g, by_group.get(g)) for g in groups], "choices": choices, "history": history,
            "reviews": reviews, "why": why, "not_applicable": not_applicable, "category": category, "na": NOT_APPLICABLE, "shelf": shelf, "shelf_source": shelf_source,
            "taxonomy": taxonomy.name if taxonomy else None}


@router.get("/listing")
def listing_page_by_query(request: Request, listing_id: str = Query(alias="id", max_length=128),
                          user: User = Depends(current_user)):
    """The listing page for any id, `.` and `..` included."""
    return listing_page(request, listing_id, user)


@router.get("/listings/{listing_id}")
def listing_page(request: Request, listing_id: str = PathParam(max_length=128), user: User = Depends(current_user)):
    with connection(request) as conn:
        view = listing_view(conn, listing_id)
    if view is None:
        raise HTTPException(status_code=404, detail=f"no listing {listing_id!r}")
    flash = request.session.pop("listing_flash", None)  # what the last correction did (set by `correct`)
    done, error = (flash[1], "") if flash and flash[0] == "done" else ("", flash[1] if flash else "")
    return render(request, "listing.html", user=user, page="listings", v=view, done=done, error=error,
                  urls=listing_urls(listing_id))


@router.get("/listing/why")
def heat_map_by_query(request: Request, listing_id: str = Query(alias="id", max_length=128),
                      group: str = Query(max_length=64), model: str = Query(max_length=128),
                      user: User = Depends(current_user)):
    return heat_map(request, listing_id, group, model, user)


@router.get("/listings/{listing_id}/why/{group}")
def heat_map(request: Request, listing_id: str = PathParam(max_length=128), group: str = PathParam(max_length=64),
             model: str = Query(max_length=128), user: User = Depends(current_user)):
    """A stored heat map (PNG). Only a file the explanations table names, under the explanations directory,
    is ever read: nothing from the request but the row's key."""
    from worker.explanations import explanations_root

    with connection(request) as conn:
        row = conn.execute("SELECT uri FROM explanations WHERE listing_id = %s AND tag_group = %s"
                           " AND model_version = %s", (listing_id, group, model)).fetchone()
    if row is None:
        raise HTTPException(status_code=404, detail="no heat map stored for this tag")
    root = explanations_root(request.app.state.settings).resolve()
    path = Path(row[0]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        log.warning("heat map of %s/%s outside %s or missing: %s", listing_id, group, root, row[0])
        raise HTTPException(status_code=404, detail="no heat map stored for this tag")
    return Response(path.read_bytes(), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.post("/listing/correct", dependencies=[Depends(check_csrf)])
def correct_by_query(request: Request, listing_id: str = Query(alias="id", max_length=128),
                     group: str = Form(..., max_length=64), value: str = Form(..., max_length=128),
                     user: User = Depends(current_user)):
    return correct(request, listing_id, group, value, user)


@router.post("/listings/{listing_id}/correct", dependencies=[Depends(check_csrf)])
def correct(request: Request, listing_id: str = PathParam(max_length=128), group: str = Form(..., max_length=64),
            value: str = Form(..., max_length=128), user: User = Depends(current_user)):
    """Correct (or set) any tag of a listing, queued for review or not."""
    with connection(request) as conn:
        if conn.execute("SELECT 1 FROM listings WHERE listing_id = %s", (listing_id,)).fetchone() is None:
            raise HTTPException(status_code=404, detail=f"no listing {listing_id!r}")
        try:  # apply_correction refuses a group, value or category the listing's taxonomy does not allow
            _, ev = apply_correction(conn, user.name, listing_id, group.strip(), value, action="listing.correct")
            request.session["listing_flash"] = ["done", f"{ev.group} corrected to {ev.new_value}"]
        except Conflict as exc:
            request.session["listing_flash"] = ["error", str(exc)[:300]]
    return RedirectResponse(listing_href(listing_id) + "#tags", status_code=303)
