"""The review queue: keyboard-first review of low-confidence predictions.

Leases. An item is shown to one reviewer at a time: the next item is picked with ``SELECT … FOR UPDATE OF q
SKIP LOCKED`` among open items whose lease is free or expired, and leased (``leased_by``, ``lease_until`` =
now + ``console_lease_s``) in the same statement. A session holds one lease (its id in the session): the
item is shown again on a reload, its lease renewed; moving on gives it back. A lease left behind by a closed
tab runs out after ``console_lease_s``. Resolving checks that the lease is the reviewer's (an expired lease
nobody else took is still theirs); otherwise the reviewer is told and moves on.

Corrections. Taking a value builds a ``CorrectionEvent`` and stores it with ``worker.store.record_correction``,
the code path of the Kafka corrections topic: a ``corrections`` row (who/when; a training label for the next
retrain), the tag written as ``source=corrected``, the listing's open review items of that group resolved.
The console then sets ``resolved_by`` on those items and logs the action with what undo needs.

Undo. ``u`` undoes this session's last review action (a stack of ``console_actions`` ids in the session).
Undoing a correction does NOT record a correction back to the old value (that would turn a machine
prediction into a human label): it restores the tag row as it was (value, source, confidence, model
version, or no row), deletes that action's ``corrections`` row so it never becomes a training label, and
reopens the review items it resolved, leased to the reviewer again. It is refused when the tag was changed
since (a later correction). Undoing a skip forgets the skip and leases the item again if it is still free.

Order. ``ENRICH_REVIEW_ORDER``: "gain" serves the free item of highest ``priority`` first (the expected gain of
asking it, ranked by ``worker.review_priority``), "fifo" the oldest; the page says which.

Skips. ``s`` releases the lease and remembers the id in the session: the item is not shown again to this
reviewer in this session (other reviewers still get it).

Unsure. ``c`` sends the item to an admin with the reviewer's comment (``flagged_by``, ``flag_note``,
``flagged_at``): it leaves every reviewer's queue, and admins find it under the "flagged for an admin" filter,
where they resolve it like any item. Undone with ``u`` while no admin has taken it.

What the page counts: the items *yours to take* (open, not held by another reviewer's live lease, not skipped
by you in this session, within the filters), so the counter reads 0 exactly when nothing is left to show.

Only what the taxonomy allows is ever stored (`check_correction`): a group it defines, one of that group's
values, and a group that applies to the listing's category; with no taxonomy at all nothing is.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from fastapi import APIRouter, Depends, Form, Request
from psycopg.types.json import Jsonb
from pydantic import ValidationError

from enrich.console import users
from enrich.console.auth import User, check_csrf, current_user
from enrich.console.deps import connection, render
from enrich.console.guidelines import guidelines
from model.registry import taxonomy_of
from schemas.enrichment import ReviewReason, ReviewRule
from schemas.events import CorrectionEvent
from schemas.taxonomy import CATEGORY_GROUP, TYPE_GROUP, Taxonomy
from worker.store import record_correction

log = logging.getLogger(__name__)
router = APIRouter()

MAX_SKIPPED = 150  # skipped ids kept in the (cookie) session
MAX_UNDO = 20  # undoable actions kept in the session
OPTIONS_TTL_S = 10.0
_FILTER_LEN = 128
MAX_NOTE = 500  # characters of an "unsure" comment
RECENT = 10  # decisions listed beside the card


class Conflict(Exception):
    """The action cannot be done as asked (lease lost, item resolved, tag changed since): tell the person."""


# ----------------------------------------------------------------------------------------------- filters

@dataclass(frozen=True)
class Filters:
    group: str = ""
    category: str = ""  # predicted category: the listing's category tag, or a category item's top candidate
    model: str = ""
    flagged: bool = False  # admins: the items reviewers sent to an admin (else those are left out)

    @classmethod
    def from_request(cls, request: Request, user: User | None = None) -> Filters:
        q = request.query_params
        group, category, model = (q.get(k, "").strip()[:_FILTER_LEN] for k in ("group", "category", "model"))
        return cls(group, category, model, flagged=bool(user and user.is_admin and q.get("flagged") == "1"))

    def sql(self) -> tuple[str, str, list]:
        """(join, conditions, params) over `review_queue q`."""
        join, params = "", []
        conds = ["q.flagged_at IS NOT NULL" if self.flagged else "q.flagged_at IS NULL"]
        if self.group:
            conds.append("q.tag_group = %s")
            params.append(self.group)
        if self.model:
            conds.append("q.model_version = %s")
            params.append(self.model)
        if self.category:
            join = ("LEFT JOIN listing_tags ct ON ct.listing_id = q.listing_id"
                    f" AND ct.tag_group = '{CATEGORY_GROUP}'")
            conds.append(f"{_CATEGORY_EXPR} = %s")
            params.append(self.category)
        return join, "".join(f" AND {c}" for c in conds), params

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in (("group", self.group), ("category", self.category), ("model", self.model),
                                  ("flagged", "1" if self.flagged else "")) if v}


_CATEGORY_EXPR = f"coalesce(ct.value, CASE WHEN q.tag_group = '{CATEGORY_GROUP}' THEN q.candidates->0->>0 END)"


def filter_options(conn: psycopg.Connection) -> dict[str, list[tuple[str, int]]]:
    """Values the filters offer, with their open-item counts (one pass over the open items)."""
    rows = conn.execute(
        f"""SELECT GROUPING(tag_group), GROUPING(model_version), tag_group, model_version, c, count(*)
              FROM (SELECT q.tag_group, q.model_version, {_CATEGORY_EXPR} AS c FROM review_queue q
                      LEFT JOIN listing_tags ct ON ct.listing_id = q.listing_id AND ct.tag_group = '{CATEGORY_GROUP}'
                     WHERE q.resolved_at IS NULL AND q.flagged_at IS NULL) s
             GROUP BY GROUPING SETS ((tag_group), (model_version), (c))""").fetchall()
    out: dict[str, list[tuple[str, int]]] = {"group": [], "model": [], "category": []}
    for g_group, g_model, group, model, cat, n in rows:
        if not g_group:
            out["group"].append((group, n))
        elif not g_model:
            out["model"].append((model, n))
        elif cat is not None:
            out["category"].append((cat, n))
    return {k: sorted(v) for k, v in out.items()}


def filter_options_cached(app, conn: psycopg.Connection) -> dict[str, list[tuple[str, int]]]:
    """filter_options, computed at most every OPTIONS_TTL_S per console process (the counts next to the
    filter values may lag that long; the counter of items left never does)."""
    cached = getattr(app.state, "review_filter_options", None)
    if cached is not None and time.monotonic() - cached[0] < OPTIONS_TTL_S:
        return cached[1]
    options = filter_options(conn)
    app.state.review_filter_options = (time.monotonic(), options)
    return options


# ------------------------------------------------------------------------------------------------ leases

def release(conn: psycopg.Connection, user: str, item: int | None) -> None:
    """Give back this reviewer's lease on one item (by primary key: no scan of the queue)."""
    if item is not None:
        conn.execute("UPDATE review_queue SET leased_by = NULL, lease_until = NULL"
                     " WHERE id = %s AND leased_by = %s AND resolved_at IS NULL", (item, user))


_ORDER_SQL = {
    # most useful first (review_queue.priority, worker.review_priority); unranked items after, oldest first
    "gain": "q.priority DESC NULLS LAST, q.created_at, q.id",
    "fifo": "q.created_at, q.id",
}
ORDER_LINE = {"gain": "Order: most useful first", "fifo": "Order: oldest first"}


def next_item(conn: psycopg.Connection, user: str, filters: Filters, skipped: list[int], lease_s: float,
              current: int | None = None, order: str = "fifo") -> int | None:
    """The item this session works on now: `current` (the session's item) while it is still open, leased
    to this reviewer and within the filters; else the first free one in `order` (ENRICH_REVIEW_ORDER:
    "gain" or "fifo"), leased to them (and `current` is given back)."""
    order_by = _ORDER_SQL[order]
    join, conds, params = filters.sql()
    picked = None
    with conn.transaction():
        if current is not None:
            held = conn.execute(
                f"SELECT q.id FROM review_queue q {join} WHERE q.id = %s AND q.resolved_at IS NULL"
                f" AND q.leased_by = %s AND NOT (q.id = ANY(%s::bigint[])){conds} FOR UPDATE OF q",
                (current, user, skipped, *params)).fetchone()
            if held is not None:
                conn.execute("UPDATE review_queue SET lease_until = now() + make_interval(secs => %s)"
                             " WHERE id = %s", (lease_s, current))
                return current
        # a row another transaction leased between our scan and our lock fails the re-check, and LIMIT 1
        # then returns nothing although later rows are free: try again a few times
        for _ in range(4):
            row = conn.execute(
                f"""WITH pick AS (
                        SELECT q.id FROM review_queue q {join}
                         WHERE q.resolved_at IS NULL AND (q.leased_by IS NULL OR q.lease_until < now())
                           AND NOT (q.id = ANY(%s::bigint[])){conds}
                         ORDER BY {order_by} LIMIT 1 FOR UPDATE OF q SKIP LOCKED)
                    UPDATE review_queue r SET leased_by = %s, lease_until = now() + make_interval(secs => %s)
                      FROM pick WHERE r.id = pick.id RETURNING r.id""",
                (skipped, *params, user, lease_s)).fetchone()
            if row is not None:
                picked = row[0]
                break
            if not _any_free(conn, join, conds, params, skipped):
                break
        if current != picked:
            release(conn, user, current)
    return picked


def _any_free(conn, join: str, conds: str, params: list, skipped: list[int]) -> bool:
    return conn.execute(
        f"SELECT EXISTS (SELECT 1 FROM review_queue q {join} WHERE q.resolved_at IS NULL"
        f" AND (q.leased_by IS NULL OR q.lease_until < now()) AND NOT (q.id = ANY(%s::bigint[])){conds})",
        (skipped, *params)).fetchone()[0]


def count_left(conn: psycopg.Connection, user: str, filters: Filters, skipped: list[int]) -> tuple[int, int]:
    """(items yours to take, items other reviewers hold now) among the open items within the filters that
    you did not skip. Yours to take: free, lease run out, or held by you (the item shown). One snapshot; the
    first count is an index-only scan without filters, the second reads only the leased rows (small indexes
    of migration 0010)."""
    join, conds, params = filters.sql()
    total, held = conn.execute(
        f"""SELECT (SELECT count(*) FROM review_queue q {join} WHERE q.resolved_at IS NULL
                       AND NOT (q.id = ANY(%s::bigint[])){conds}),
                   (SELECT count(*) FROM review_queue q {join} WHERE q.resolved_at IS NULL
                       AND q.leased_by IS NOT NULL AND q.leased_by <> %s AND q.lease_until >= now()
                       AND NOT (q.id = ANY(%s::bigint[])){conds})""",
        (skipped, *params, user, skipped, *params)).fetchone()
    return total - held, held


def count_flagged(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM review_queue WHERE resolved_at IS NULL AND flagged_at IS NOT NULL"
                        ).fetchone()[0]


# --------------------------------------------------------------------------------------------- taxonomy

def group_values(taxonomy: Taxonomy | None, group: str) -> list[str] | None:
    """Every value a group can take in the taxonomy; None when the taxonomy does not know the group."""
    return None if taxonomy is None else taxonomy.values_of(group)


def taxonomy_groups(taxonomy: Taxonomy | None) -> list[str]:
    return [] if taxonomy is None else taxonomy.all_groups


def listing_taxonomy(conn: psycopg.Connection, listing_id: str) -> Taxonomy | None:
    """The taxonomy of the model that tagged (or queued) the listing, else the active model's."""
    row = conn.execute("SELECT model_version FROM listing_tags WHERE listing_id = %s AND model_version IS NOT NULL"
                       " UNION ALL (SELECT model_version FROM review_queue WHERE listing_id = %s"
                       " ORDER BY created_at DESC LIMIT 1) LIMIT 1", (listing_id, listing_id)).fetchone()
    return taxonomy_of(conn, row[0] if row else None)


def check_correction(conn: psycopg.Connection, taxonomy: Taxonomy | None, listing_id: str, group: str, value: str,
                     also: tuple[str, ...] = ()) -> None:
    """Conflict unless the taxonomy defines `group`, `value` is one of its values (or in `also`: a review
    item's own candidates) and the group applies to the listing's category (or type)."""
    if taxonomy is None:
        raise Conflict("no taxonomy is known for this listing (no registered model carries one), so no tag"
                       " can be corrected")
    values = taxonomy.values_of(group)
    if values is None:
        raise Conflict(f"{group} is not a tag group of the {taxonomy.name} taxonomy")
    if value not in values and value not in also:
        raise Conflict(f"{value!r} is not a value of {group}")
    if group in (CATEGORY_GROUP, TYPE_GROUP):
        return
    tags = dict(conn.execute("SELECT tag_group, value FROM listing_tags WHERE listing_id = %s"
                             " AND tag_group IN (%s, %s)", (listing_id, CATEGORY_GROUP, TYPE_GROUP)).fetchall())
    category, type_ = tags.get(CATEGORY_GROUP), tags.get(TYPE_GROUP)
    if not taxonomy.applies(group, category=category, type_=type_):
        raise Conflict(f"{group} does not apply to {category or type_} (the listing's "
                       f"{'category' if category else 'type'})")


# ------------------------------------------------------------------------------------------- corrections

def _corrector_id(name: str) -> str:
    """Console names allow '@', CorrectionEvent ids do not; the audit log keeps the real name."""
    return "".join(c if c.isalnum() or c in "._:-" else "_" for c in name)[:128]


def apply_correction(conn: psycopg.Connection, user: str, listing_id: str | None, group: str | None,
                     value: str, *, action: str, review_id: int | None = None,
                     **details) -> tuple[int, CorrectionEvent]:
    """Correct one tag through the Kafka path (`record_correction`) in one transaction; returns the
    console_actions id (whose details let `undo` restore what was there) and the event.

    With `review_id`, the item must be open and leased to `user` (listing and group come from it; the
    taxonomy is that of the item's model, and its candidates are values too). Without, the listing's
    taxonomy. Conflict, and nothing stored, when `check_correction` refuses."""
    value = value.strip()
    with conn.transaction():
        also: tuple[str, ...] = ()
        if review_id is not None:
            row = conn.execute("SELECT listing_id, tag_group, leased_by, resolved_at, resolved_by, model_version,"
                               " candidates FROM review_queue WHERE id = %s FOR UPDATE", (review_id,)).fetchone()
            if row is None:
                raise Conflict("this item is no longer in the queue (the listing was re-enriched or removed)")
            if row[3] is not None:
                raise Conflict(f"this item was already resolved{' by ' + row[4] if row[4] else ''}")
            if row[2] != user:
                raise Conflict("your lease on this item ran out and another reviewer has it now")
            listing_id, group = row[0], row[1]
            taxonomy = taxonomy_of(conn, row[5])
            also = tuple(str(c[0]) for c in row[6])
        if conn.execute("SELECT 1 FROM listings WHERE listing_id = %s FOR SHARE", (listing_id,)).fetchone() is None:
            raise Conflict(f"no listing {listing_id!r}")
        if review_id is None:
            taxonomy = listing_taxonomy(conn, listing_id)
        check_correction(conn, taxonomy, listing_id, group, value, also)
        prev = conn.execute("SELECT value, source, confidence, model_version, updated_at, evidence FROM listing_tags"
                            " WHERE listing_id = %s AND tag_group = %s FOR UPDATE", (listing_id, group)).fetchone()
        reopen = [r[0] for r in conn.execute(
            "SELECT id FROM review_queue WHERE listing_id = %s AND tag_group = %s AND resolved_at IS NULL"
            " ORDER BY id FOR UPDATE", (listing_id, group)).fetchall()]
        try:
            ev = CorrectionEvent(event_id=f"console:{uuid.uuid4().hex}", listing_id=listing_id, group=group,
                                 old_value=prev[0] if prev else None, new_value=value,
                                 corrected_by=_corrector_id(user), corrected_at=datetime.now(UTC))
        except ValidationError as exc:
            raise Conflict("not a valid correction: " + "; ".join(e["msg"] for e in exc.errors())) from exc
        record_correction(conn, ev)
        if reopen:
            conn.execute("UPDATE review_queue SET resolved_by = %s, leased_by = NULL, lease_until = NULL"
                         " WHERE id = ANY(%s)", (user, reopen))
        previous = None if prev is None else {"value": prev[0], "source": prev[1], "confidence": prev[2],
                                                "model_version": prev[3], "updated_at": prev[4], "evidence": prev[5]}
        users.log_action(conn, user, action, event_id=ev.event_id, listing_id=listing_id, group=group,
                         old_value=ev.old_value, new_value=ev.new_value, previous=previous, resolved=reopen,
                         review_id=review_id, **details)
        action_id = conn.execute("SELECT lastval()").fetchone()[0]
    return action_id, ev


def undo(conn: psycopg.Connection, user: str, action_id: int, lease_s: float,
         current: int | None = None) -> tuple[str, int | None, int | None, str]:
    """Undo one review action of `user`; returns (kind, the item it was about, the item to show now, a
    message). The item brought back is leased to `user` and `current` (the item shown) given back.
    Conflict when it cannot be undone."""
    with conn.transaction():
        row = conn.execute("SELECT action, details FROM console_actions WHERE id = %s AND user_name = %s",
                           (action_id, user)).fetchone()
        if row is None:
            raise Conflict("nothing to undo")
        action, d = row
        if action == "review.skip":
            item = d["review_id"]
            got = conn.execute(
                "UPDATE review_queue SET leased_by = %s, lease_until = now() + make_interval(secs => %s)"
                " WHERE id = %s AND resolved_at IS NULL AND (leased_by IS NULL OR leased_by = %s"
                " OR lease_until < now()) RETURNING id", (user, lease_s, item, user)).fetchone()
            users.log_action(conn, user, "review.undo", of=action_id, kind="skip", review_id=item,
                             leased=got is not None)
            if got is None:
                return "skip", item, None, "Skip undone, but another reviewer has that item now (or it is resolved)."
            if current != item:
                release(conn, user, current)
            return "skip", item, item, "Skip undone."
        if action == "review.flag":
            item = d["review_id"]
            got = conn.execute(
                "UPDATE review_queue SET flagged_by = NULL, flag_note = NULL, flagged_at = NULL, leased_by = %s,"
                " lease_until = now() + make_interval(secs => %s) WHERE id = %s AND resolved_at IS NULL"
                " AND flagged_by = %s AND (leased_by IS NULL OR leased_by = %s OR lease_until < now()) RETURNING id",
                (user, lease_s, item, user, user)).fetchone()
            if got is None:
                raise Conflict("an admin has that item now or resolved it")
            if current != item:
                release(conn, user, current)
            users.log_action(conn, user, "review.undo", of=action_id, kind="flag", review_id=item)
            return "flag", item, item, "Comment withdrawn: the item is back with you."
        if action != "review.correct":
            raise Conflict("nothing to undo")
        corr = conn.execute("SELECT received_at FROM corrections WHERE event_id = %s FOR UPDATE",
                            (d["event_id"],)).fetchone()
        if corr is None:
            raise Conflict("already undone")
        lid, group = d["listing_id"], d["group"]
        tag = conn.execute("SELECT value, source FROM listing_tags WHERE listing_id = %s AND tag_group = %s"
                           " FOR UPDATE", (lid, group)).fetchone()
        later = conn.execute("SELECT EXISTS (SELECT 1 FROM corrections WHERE listing_id = %s AND tag_group = %s"
                             " AND event_id <> %s AND received_at >= %s)",
                             (lid, group, d["event_id"], corr[0])).fetchone()[0]
        if later or tag is None or tag[0] != d["new_value"] or tag[1] != "corrected":
            raise Conflict(f"the {group} tag of {lid} was changed since: not undone")
        prev = d.get("previous")
        if prev is None:
            conn.execute("DELETE FROM listing_tags WHERE listing_id = %s AND tag_group = %s", (lid, group))
        else:
            conn.execute("UPDATE listing_tags SET value = %s, source = %s, confidence = %s, model_version = %s,"
                         " updated_at = %s::timestamptz, evidence = %s WHERE listing_id = %s AND tag_group = %s",
                         (prev["value"], prev["source"], prev["confidence"], prev["model_version"],
                          prev["updated_at"], Jsonb(prev.get("evidence")) if prev.get("evidence") else None, lid,
                          group))
        conn.execute("DELETE FROM corrections WHERE event_id = %s", (d["event_id"],))  # not a training label
        reopened = [r[0] for r in conn.execute(
            "UPDATE review_queue SET resolved_at = NULL, resolved_by = NULL, leased_by = %s,"
            " lease_until = now() + make_interval(secs => %s)"
            " WHERE id = ANY(%s) AND resolved_at IS NOT NULL RETURNING id",
            (user, lease_s, d.get("resolved") or [])).fetchall()]
        show = d.get("review_id") if d.get("review_id") in reopened else (reopened[0] if reopened else None)
        if show is not None and current != show:
            release(conn, user, current)
        users.log_action(conn, user, "review.undo", of=action_id, kind="correct", event_id=d["event_id"],
                         listing_id=lid, group=group, restored=prev, reopened=reopened)
        return "correct", d.get("review_id"), show, f"Undone: {group} of {lid} is back to {prev['value'] if prev else 'no value'}."


def skip(conn: psycopg.Connection, user: str, item: int) -> int:
    with conn.transaction():
        conn.execute("UPDATE review_queue SET leased_by = NULL, lease_until = NULL"
                     " WHERE id = %s AND leased_by = %s AND resolved_at IS NULL", (item, user))
        row = conn.execute("SELECT listing_id, tag_group FROM review_queue WHERE id = %s", (item,)).fetchone()
        users.log_action(conn, user, "review.skip", review_id=item, listing_id=row[0] if row else None,
                         group=row[1] if row else None)
        return conn.execute("SELECT lastval()").fetchone()[0]


def flag(conn: psycopg.Connection, user: str, item: int, note: str) -> int:
    """Send the reviewer's item to an admin with their comment: it leaves the reviewers' queue."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE review_queue SET flagged_by = %s, flag_note = %s, flagged_at = now(), leased_by = NULL,"
            " lease_until = NULL WHERE id = %s AND leased_by = %s AND resolved_at IS NULL AND flagged_at IS NULL"
            " RETURNING listing_id, tag_group", (user, note, item, user)).fetchone()
        if row is None:
            raise Conflict("this item is resolved, flagged already, or another reviewer has it now")
        users.log_action(conn, user, "review.flag", review_id=item, listing_id=row[0], group=row[1], note=note)
        return conn.execute("SELECT lastval()").fetchone()[0]


def recent_decisions(conn: psycopg.Connection, user: str, limit: int = RECENT) -> list[dict]:
    """This person's last review decisions and listing corrections, newest first; `undone` when a later
    undo took one back."""
    rows = conn.execute(
        "SELECT a.action, a.details, a.at, EXISTS (SELECT 1 FROM console_actions u WHERE u.user_name = a.user_name"
        "  AND u.at >= a.at AND u.action = 'review.undo' AND u.details->>'of' = a.id::text)"
        " FROM console_actions a WHERE a.user_name = %s AND a.action IN"
        " ('review.correct', 'review.skip', 'review.flag', 'listing.correct') ORDER BY a.at DESC, a.id DESC LIMIT %s",
        (user, limit)).fetchall()
    out = []
    for action, d, at, undone in rows:
        kind = action.split(".")[1]
        value = d.get("new_value") if kind == "correct" else d.get("note") if kind == "flag" else None
        out.append({"kind": kind, "listing_id": d.get("listing_id"), "group": d.get("group"), "value": value,
                    "review_id": d.get("review_id"), "at": at, "undone": undone})
    return out


def progress_today(conn: psycopg.Connection, user: str) -> tuple[int, int]:
    """(items resolved by `user`, items resolved by anyone) since midnight, database time."""
    return conn.execute(
        "SELECT count(*) FILTER (WHERE resolved_by = %s), count(*) FROM review_queue"
        " WHERE resolved_at IS NOT NULL AND resolved_at >= date_trunc('day', now())", (user,)).fetchone()


# ------------------------------------------------------------------------------------------------- views

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


def item_view(conn: psycopg.Connection, item: int) -> dict | None:
    row = conn.execute(
        "SELECT q.id, q.listing_id, q.tag_group, q.candidates, q.threshold, q.model_version, q.created_at,"
        " greatest(0, extract(epoch FROM q.lease_until - now()))::int, l.event->>'title', l.seller_id,"
        " jsonb_array_length(l.event->'images'), l.status, q.flagged_by, q.flag_note, q.flagged_at, q.reason"
        " FROM review_queue q JOIN listings l ON l.listing_id = q.listing_id WHERE q.id = %s", (item,)).fetchone()
    if row is None:
        return None
    tags = conn.execute("SELECT tag_group, value, source, confidence, model_version FROM listing_tags"
                        " WHERE listing_id = %s ORDER BY tag_group", (row[1],)).fetchall()
    taxonomy = taxonomy_of(conn, row[5])
    values = group_values(taxonomy, row[2]) or []  # a group the taxonomy lacks: the candidates only
    candidates = [(str(c[0]), float(c[1])) for c in row[3]][:9]
    for v, _ in candidates:
        if v not in values:
            values = [*values, v]
    return {"id": row[0], "listing_id": row[1], "group": row[2], "candidates": candidates, "threshold": row[4],
            "model_version": row[5], "created_at": row[6], "lease_left": row[7] or 0, "title": row[8] or "",
            "seller_id": row[9], "images": min(row[10] or 0, 4), "status": row[11],
            "flag": {"by": row[12], "note": row[13], "at": row[14]} if row[14] else None,
            "seller_tags": [t for t in tags if t[2] == "seller"], "other_tags": [t for t in tags if t[2] != "seller"],
            "choices": values, "guideline": guidelines(taxonomy.name).get(row[2]) if taxonomy else None,
            # an item written before reasons were stored: the card keeps the threshold line
            "reason": reason_sentence(ReviewReason.model_validate(row[15]), row[2], row[8] or "") if row[15] else None}


def _session_list(request: Request, key: str) -> list[int]:
    raw = request.session.get(key) or []
    return [int(x) for x in raw if isinstance(x, int)]


def _render_item(request: Request, conn, user: User, filters: Filters, flash: str = "", error: bool = False,
                 show: int | None = None, full: bool = False):
    skipped = _session_list(request, "review_skipped")
    lease_s = request.app.state.settings.console_lease_s
    order = request.app.state.settings.review_order
    current = show if show is not None else request.session.get("review_current")
    item_id = next_item(conn, user.name, filters, skipped, lease_s,
                        current=current if isinstance(current, int) else None, order=order)
    request.session["review_current"] = item_id
    item = item_view(conn, item_id) if item_id is not None else None
    left, held = count_left(conn, user.name, filters, skipped)
    mine, team = progress_today(conn, user.name)
    ctx = {"item": item, "left": left, "held": held, "flash": flash, "flash_error": error, "filters": filters,
           "can_undo": bool(request.session.get("review_undo")), "lease_s": lease_s,
           "recent": recent_decisions(conn, user.name), "mine_today": mine, "team_today": team,
           "flagged": count_flagged(conn) if user.is_admin else 0}
    if full:
        return render(request, "review.html", user=user, page="review",
                      options=filter_options_cached(request.app, conn), order_line=ORDER_LINE[order], **ctx)
    return render(request, "_review_item.html", user=user, **ctx)


def _push(request: Request, key: str, value: int, cap: int) -> None:
    lst = _session_list(request, key)
    lst.append(value)
    request.session[key] = lst[-cap:]


@router.get("/review")
def review_page(request: Request, user: User = Depends(current_user)):
    with connection(request) as conn:
        return _render_item(request, conn, user, Filters.from_request(request, user), full=True)


@router.get("/review/item")
def review_item(request: Request, user: User = Depends(current_user)):
    """The current item's HTML (the page's script asks for it after an error)."""
    with connection(request) as conn:
        return _render_item(request, conn, user, Filters.from_request(request, user))


@router.post("/review/{item}/take", dependencies=[Depends(check_csrf)])
def review_take(request: Request, item: int, value: str = Form(..., max_length=128),
                user: User = Depends(current_user)):
    filters = Filters.from_request(request, user)
    with connection(request) as conn:
        try:
            action_id, ev = apply_correction(conn, user.name, None, None, value, action="review.correct",
                                             review_id=item)
        except Conflict as exc:
            return _render_item(request, conn, user, filters, f"Not saved: {exc}.", True)
        _push(request, "review_undo", action_id, MAX_UNDO)
        msg = f"Saved {ev.group} = {ev.new_value} for {ev.listing_id} (u to undo)."
        return _render_item(request, conn, user, filters, msg)


@router.post("/review/{item}/skip", dependencies=[Depends(check_csrf)])
def review_skip(request: Request, item: int, user: User = Depends(current_user)):
    filters = Filters.from_request(request, user)
    with connection(request) as conn:
        action_id = skip(conn, user.name, item)
        _push(request, "review_skipped", item, MAX_SKIPPED)
        _push(request, "review_undo", action_id, MAX_UNDO)
        return _render_item(request, conn, user, filters, "Skipped (u to undo).")


@router.post("/review/{item}/flag", dependencies=[Depends(check_csrf)])
def review_flag(request: Request, item: int, note: str = Form("", max_length=MAX_NOTE),
                user: User = Depends(current_user)):
    """Unsure: the item goes to an admin with the reviewer's comment."""
    filters = Filters.from_request(request, user)
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
def review_undo(request: Request, user: User = Depends(current_user)):
    filters = Filters.from_request(request, user)
    stack = _session_list(request, "review_undo")
    with connection(request) as conn:
        if not stack:
            return _render_item(request, conn, user, filters, "Nothing to undo in this session.", True)
        action_id = stack.pop()
        request.session["review_undo"] = stack
        try:
            kind, item, show, msg = undo(conn, user.name, action_id, request.app.state.settings.console_lease_s,
                                         current=request.session.get("review_current"))
        except Conflict as exc:
            return _render_item(request, conn, user, filters, f"Not undone: {exc}.", True)
        if kind == "skip":  # forget the skip, so the item can come back to this reviewer
            request.session["review_skipped"] = [i for i in _session_list(request, "review_skipped") if i != item]
        return _render_item(request, conn, user, filters, msg, show=show)
