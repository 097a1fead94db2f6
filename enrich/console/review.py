"""The review page: keyboard-first review of low-confidence predictions. The routes parse the request, keep
the session's place (the item shown, skips, the undo stack) and render; the queue itself (leases, corrections,
undo, counts) is enrich/console/review_queue.py.

Keys (static/review.js): ``1``–``9`` take a candidate, a letter opens every value of the group, ``s`` skips,
``c`` sends the item to an admin with a comment, ``u`` undoes.

Session. A session holds one lease, its item id in ``review_current``: the item is shown again on a reload,
its lease renewed; moving on gives it back. ``s`` releases the lease and remembers the id in
``review_skipped``: the item is not shown again to this reviewer in this session (other reviewers still get
it). ``u`` undoes this session's last review action (a stack of ``console_actions`` ids in ``review_undo``);
undoing a skip also forgets the skip.

The page says which order ENRICH_REVIEW_ORDER serves in, and counts the items *yours to take*
(review_queue.count_left), so the counter reads 0 exactly when nothing is left to show.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import Response

from enrich.console.auth import User, check_csrf, current_user
from enrich.console.deps import connection, render
from enrich.console.review_queue import (
    Conflict,
    FilterOptions,
    Filters,
    ReviewCard,
    correct_item,
    count_flagged,
    count_left,
    filter_options,
    flag,
    next_item,
    progress_today,
    recent_decisions,
    review_card,
    skip,
    undo,
)
from schemas.enrichment import ReviewReason, ReviewRule
from schemas.taxonomy import CATEGORY_GROUP, TYPE_GROUP

log = logging.getLogger(__name__)
router = APIRouter()

MAX_SKIPPED = 150  # skipped ids kept in the (cookie) session
MAX_UNDO = 20  # undoable actions kept in the session
OPTIONS_TTL_S = 10.0
_FILTER_LEN = 128
MAX_NOTE = 500  # characters of an "unsure" comment
ORDER_LINE = {"gain": "Order: most useful first", "fifo": "Order: oldest first"}


def filters_from(request: Request, user: User | None = None) -> Filters:
    """The filters in the query string; only an admin can ask for the flagged items."""
    q = request.query_params
    group, category, model = (q.get(k, "").strip()[:_FILTER_LEN] for k in ("group", "category", "model"))
    return Filters(group, category, model, flagged=bool(user and user.is_admin and q.get("flagged") == "1"))


def filter_options_cached(app: FastAPI, conn: psycopg.Connection) -> FilterOptions:
    """filter_options, computed at most every OPTIONS_TTL_S per console process (the counts next to the
    filter values may lag that long; the counter of items left never does)."""
    cached = getattr(app.state, "review_filter_options", None)
    if cached is not None and time.monotonic() - cached[0] < OPTIONS_TTL_S:
        return cached[1]
    options = filter_options(conn)
    app.state.review_filter_options = (time.monotonic(), options)
    return options


# ---------------------------------------------------------------------------------------------- wording

def _percents(p: float, threshold: float) -> tuple[str, str]:
    """Both as percentages, with as many decimals as it takes to tell them apart (69.6 % vs 70 %)."""
    for digits in (0, 1, 2):
        a, b = f"{p * 100:.{digits}f} %", f"{threshold * 100:.{digits}f} %"
        if a != b:
            break
    return a, b


def _quoted(words: dict[str, list[str]]) -> list[str]:
    """'lilac' (purple): each distinct word, and the value it points to where the word is not the value."""
    out = []
    for value, found in words.items():
        distinct = list(dict.fromkeys(found))
        said = ", ".join(f"'{w}'" for w in distinct)
        out.append(said if all(w.casefold() == value.casefold() for w in distinct) else f"{said} ({value})")
    return out


def reason_sentence(reason: ReviewReason, group: str, title: str) -> str:
    """The rule that queued an item, in a reviewer's words (plain text: the template escapes it)."""
    p, t = _percents(reason.probability, reason.threshold)
    if reason.rule is ReviewRule.text_conflict:
        said = _quoted(reason.words) + [f"not {q}" for q in _quoted(reason.negated)]
        words = [w for found in (*reason.words.values(), *reason.negated.values()) for w in found]
        in_title = [w in title for w in words]
        where = "title" if all(in_title) else "listing" if any(in_title) else "description"
        looks = "looks like" if group in (CATEGORY_GROUP, TYPE_GROUP) else "looks"
        seen = f"{reason.image_value} ({reason.image_probability * 100:.0f} %)" \
            if reason.image_probability is not None else reason.image_value
        return f"The {where} says {' and '.join(said)} but the photo {looks} {seen}."
    if reason.rule is ReviewRule.no_value_applies:
        return f"No value reaches its threshold (the likeliest, {reason.value} at {p}, needs {t})."
    return f"The model's best guess, {reason.value} at {p}, is below the {t} this group needs."


def _why(card: ReviewCard | None) -> str | None:
    # an item written before reasons were stored: the card keeps the threshold line
    if card is None or card.reason is None:
        return None
    return reason_sentence(card.reason, card.group, card.title)


# ---------------------------------------------------------------------------------------------- session

def _session_list(request: Request, key: str) -> list[int]:
    raw = request.session.get(key) or []
    return [int(x) for x in raw if isinstance(x, int)]


def _push(request: Request, key: str, value: int, cap: int) -> None:
    lst = _session_list(request, key)
    lst.append(value)
    request.session[key] = lst[-cap:]


def _render_item(request: Request, conn: psycopg.Connection, user: User, filters: Filters, flash: str = "",
                 error: bool = False, show: int | None = None, full: bool = False) -> Response:
    skipped = _session_list(request, "review_skipped")
    settings = request.app.state.settings
    current = show if show is not None else request.session.get("review_current")
    item_id = next_item(conn, user.name, filters, skipped, settings.console_lease_s,
                        current=current if isinstance(current, int) else None, order=settings.review_order)
    request.session["review_current"] = item_id
    card = review_card(conn, item_id) if item_id is not None else None
    left = count_left(conn, user.name, filters, skipped)
    today = progress_today(conn, user.name)
    ctx: dict[str, Any] = {"item": card, "why": _why(card), "left": left.yours, "held": left.held, "flash": flash,
           "flash_error": error, "filters": filters, "can_undo": bool(request.session.get("review_undo")),
           "recent": recent_decisions(conn, user.name), "mine_today": today.mine, "team_today": today.team,
           "flagged": count_flagged(conn) if user.is_admin else 0}
    if full:
        return render(request, "review.html", user=user, page="review",
                      options=filter_options_cached(request.app, conn), order_line=ORDER_LINE[settings.review_order],
                      **ctx)
    return render(request, "_review_item.html", user=user, **ctx)


# ----------------------------------------------------------------------------------------------- routes

@router.get("/review")
def review_page(request: Request, user: User = Depends(current_user)) -> Response:
    with connection(request) as conn:
        return _render_item(request, conn, user, filters_from(request, user), full=True)


@router.get("/review/item")
def review_item(request: Request, user: User = Depends(current_user)) -> Response:
    """The current item's HTML (the page's script asks for it after an error)."""
    with connection(request) as conn:
        return _render_item(request, conn, user, filters_from(request, user))


@router.post("/review/{item}/take", dependencies=[Depends(check_csrf)])
def review_take(request: Request, item: int, value: str = Form(..., max_length=128),
                user: User = Depends(current_user)) -> Response:
    filters = filters_from(request, user)
    with connection(request) as conn:
        try:
            action_id, ev = correct_item(conn, user.name, item, value)
        except Conflict as exc:
            return _render_item(request, conn, user, filters, f"Not saved: {exc}.", True)
        _push(request, "review_undo", action_id, MAX_UNDO)
        msg = f"Saved {ev.group} = {ev.new_value} for {ev.listing_id} (u to undo)."
        return _render_item(request, conn, user, filters, msg)


@router.post("/review/{item}/skip", dependencies=[Depends(check_csrf)])
def review_skip(request: Request, item: int, user: User = Depends(current_user)) -> Response:
    filters = filters_from(request, user)
    with connection(request) as conn:
        action_id = skip(conn, user.name, item)
        _push(request, "review_skipped", item, MAX_SKIPPED)
        _push(request, "review_undo", action_id, MAX_UNDO)
        return _render_item(request, conn, user, filters, "Skipped (u to undo).")


@router.post("/review/{item}/flag", dependencies=[Depends(check_csrf)])
def review_flag(request: Request, item: int, note: str = Form("", max_length=MAX_NOTE),
                user: User = Depends(current_user)) -> Response:
    """Unsure: the item goes to an admin with the reviewer's comment."""
    filters = filters_from(request, user)
    note = note.strip()
    with connection(request) as conn:
        if not note:
            return _render_item(request, conn, user, filters, "Not sent: write a short comment for the admin.",
                                True)
        try:
            action_id = flag(conn, user.name, item, note)
        except Conflict as exc:
            return _render_item(request, conn, user, filters, f"Not sent: {exc}.", True)
        _push(request, "review_undo", action_id, MAX_UNDO)
        return _render_item(request, conn, user, filters, "Sent to an admin with your comment (u to undo).")


@router.post("/review/undo", dependencies=[Depends(check_csrf)])
def review_undo(request: Request, user: User = Depends(current_user)) -> Response:
    filters = filters_from(request, user)
    stack = _session_list(request, "review_undo")
    with connection(request) as conn:
        if not stack:
            return _render_item(request, conn, user, filters, "Nothing to undo in this session.", True)
        action_id = stack.pop()
        request.session["review_undo"] = stack
        current = request.session.get("review_current")
        try:
            done = undo(conn, user.name, action_id, request.app.state.settings.console_lease_s,
                        current=current if isinstance(current, int) else None)
        except Conflict as exc:
            return _render_item(request, conn, user, filters, f"Not undone: {exc}.", True)
        if done.kind == "skip":  # forget the skip, so the item can come back to this reviewer
            request.session["review_skipped"] = [i for i in _session_list(request, "review_skipped")
                                                 if i != done.item]
        return _render_item(request, conn, user, filters, done.message, show=done.show)
