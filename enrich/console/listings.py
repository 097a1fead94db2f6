"""Listings: a search page (id or title, status filter) and one page per listing with every tag, its
provenance, confidence and model version, the similar-items shelf, the correction history, the review items
with their stored heat maps ("why", worker/explanations.py) and a correction form for any tag (through the
same path as a Kafka CorrectionEvent, see review_queue.correct_listing). What the pages read is
enrich/console/listing_data.py.

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
from enrich.console.listing_data import SEARCH_LIMIT, heat_map_uri, listing_exists, listing_view, search
from enrich.console.review_queue import Conflict, correct_listing
from worker.explanations import explanations_root

log = logging.getLogger(__name__)
router = APIRouter()
STATUSES = ("pending", "enriched", "failed", "deleted")


def _dotted(listing_id: str) -> bool:
    return listing_id in (".", "..")


def listing_urls(listing_id: str) -> dict[str, str]:
    """The listing page's own URLs: where its correction form posts, and its heat maps' base (group and model
    are added as query parameters, or the group as a path segment)."""
    lid = quote(listing_id, safe="")
    if _dotted(listing_id):
        return {"correct": f"/listing/correct?id={lid}", "why": f"/listing/why?id={lid}&group="}
    return {"correct": f"/listings/{lid}/correct", "why": f"/listings/{lid}/why/"}


@router.get("/listings")
def listings_page(request: Request, q: str = "", status: str = "", user: User = Depends(current_user)):
    status = status if status in STATUSES else ""
    with connection(request) as conn:
        rows = search(conn, q, status)
    return render(request, "listings.html", user=user, page="listings", q=q, status=status, statuses=STATUSES,
                  rows=rows, limit=SEARCH_LIMIT)


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
    with connection(request) as conn:
        uri = heat_map_uri(conn, listing_id, group, model)
    if uri is None:
        raise HTTPException(status_code=404, detail="no heat map stored for this tag")
    root = explanations_root(request.app.state.settings).resolve()
    path = Path(uri).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        log.warning("heat map of %s/%s outside %s or missing: %s", listing_id, group, root, uri)
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
        if not listing_exists(conn, listing_id):
            raise HTTPException(status_code=404, detail=f"no listing {listing_id!r}")
        try:  # refused: a group, value or category the listing's taxonomy does not allow
            _, ev = correct_listing(conn, user.name, listing_id, group.strip(), value)
            request.session["listing_flash"] = ["done", f"{ev.group} corrected to {ev.new_value}"]
        except Conflict as exc:
            request.session["listing_flash"] = ["error", str(exc)[:300]]
    return RedirectResponse(listing_href(listing_id) + "#tags", status_code=303)
