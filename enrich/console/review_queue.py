"""The review queue's data: which item a reviewer gets, what it shows, and what taking, skipping, flagging and
undoing it change in the database. The pages (enrich/console/review.py, listings.py) call these.

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

Undo. Undoing a correction does NOT record a correction back to the old value (that would turn a machine
prediction into a human label): it restores the tag row as it was (value, source, confidence, model
version, or no row), deletes that action's ``corrections`` row so it never becomes a training label, and
reopens the review items it resolved, leased to the reviewer again. It is refused when the tag was changed
since (a later correction). Undoing a skip leases the item again if it is still free.

Order. ``ENRICH_REVIEW_ORDER``: "gain" serves the free item of highest ``priority`` first (the expected gain of
asking it, ranked by ``worker.review_priority``), "fifo" the oldest.

Unsure. A flagged item goes to an admin with the reviewer's comment (``flagged_by``, ``flag_note``,
``flagged_at``): it leaves every reviewer's queue, and admins find it with ``Filters(flagged=True)``, where
they resolve it like any item. Undone while no admin has taken it.

Counting: the items *yours to take* (open, not held by another reviewer's live lease, not skipped by you in
this session, within the filters), so the count is 0 exactly when nothing is left to show.

Only what the taxonomy allows is ever stored (`check_correction`): a group it defines, one of that group's
values, and a group that applies to the listing's category; with no taxonomy at all nothing is.
"""
from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from markupsafe import Markup
from psycopg.types.json import Jsonb
from pydantic import ValidationError

from core.rows import fetch_all, fetch_one, fetch_required, fetch_value, fetch_values
from enrich.console import users
from enrich.console.guidelines import guidelines
from model.registry import taxonomy_of
from schemas.enrichment import ReviewReason
from schemas.events import CorrectionEvent
from schemas.taxonomy import CATEGORY_GROUP, TYPE_GROUP, Taxonomy
from worker.store import record_correction

RECENT = 10  # decisions listed beside the card
MAX_CANDIDATES = 9  # candidates on the card: keys 1–9


class Conflict(Exception):
    """The action cannot be done as asked (lease lost, item resolved, tag changed since): tell the person."""


# ----------------------------------------------------------------------------------------------- filters

@dataclass(frozen=True)
class Filters:
    group: str = ""
    category: str = ""  # predicted category: the listing's category tag, or a category item's top candidate
    model: str = ""
    flagged: bool = False  # admins: the items reviewers sent to an admin (else those are left out)

    def sql(self) -> tuple[str, str, list[str]]:
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
        """The filters that are set, as query parameters."""
        return {k: v for k, v in (("group", self.group), ("category", self.category), ("model", self.model),
                                  ("flagged", "1" if self.flagged else "")) if v}


_CATEGORY_EXPR = f"coalesce(ct.value, CASE WHEN q.tag_group = '{CATEGORY_GROUP}' THEN q.candidates->0->>0 END)"


@dataclass(frozen=True)
class FilterOptions:
    """Values each filter offers, with their open-item counts, sorted by value."""
    group: list[tuple[str, int]]
    model: list[tuple[str, int]]
    category: list[tuple[str, int]]


def filter_options(conn: psycopg.Connection) -> FilterOptions:
    """Values the filters offer, with their open-item counts (one pass over the open items)."""
    rows = conn.execute(
        f"""SELECT GROUPING(tag_group), GROUPING(model_version), tag_group, model_version, c, count(*)
              FROM (SELECT q.tag_group, q.model_version, {_CATEGORY_EXPR} AS c FROM review_queue q
                      LEFT JOIN listing_tags ct ON ct.listing_id = q.listing_id AND ct.tag_group = '{CATEGORY_GROUP}'
                     WHERE q.resolved_at IS NULL AND q.flagged_at IS NULL) s
             GROUP BY GROUPING SETS ((tag_group), (model_version), (c))""").fetchall()
    groups, models, categories = [], [], []
    for g_group, g_model, group, model, cat, n in rows:
        if not g_group:
            groups.append((group, n))
        elif not g_model:
            models.append((model, n))
        elif cat is not None:
            categories.append((cat, n))
    return FilterOptions(sorted(groups), sorted(models), sorted(categories))


# ------------------------------------------------------------------------------------------------ leases

def release(conn: psycopg.Connection, user: str, item: int | None) -> None:
    """Give back this reviewer's lease on one item (by primary key: no scan of the queue)."""
    if item is not None:
        conn.execute("UPDATE review_queue SET leased_by = NULL, lease_until = NULL"
                     " WHERE id = %s AND leased_by = %s AND resolved_at IS NULL", (item, user))


ORDER_SQL = {
    # most useful first (review_queue.priority, worker.review_priority); unranked items after, oldest first
    "gain": "q.priority DESC NULLS LAST, q.created_at, q.id",
    "fifo": "q.created_at, q.id",
}


def next_item(conn: psycopg.Connection, user: str, filters: Filters, skipped: list[int], lease_s: float,
              current: int | None = None, order: str = "fifo") -> int | None:
    """The item this session works on now: `current` (the session's item) while it is still open, leased
    to this reviewer and within the filters; else the first free one in `order` (ENRICH_REVIEW_ORDER:
    "gain" or "fifo"), leased to them (and `current` is given back)."""
    order_by = ORDER_SQL[order]
    join, conds, params = filters.sql()
    picked = None
    with conn.transaction():
        if current is not None:
            held = fetch_value(
                conn, f"SELECT q.id FROM review_queue q {join} WHERE q.id = %s AND q.resolved_at IS NULL"
                f" AND q.leased_by = %s AND NOT (q.id = ANY(%s::bigint[])){conds} FOR UPDATE OF q",
                (current, user, skipped, *params))
            if held is not None:
                conn.execute("UPDATE review_queue SET lease_until = now() + make_interval(secs => %s)"
                             " WHERE id = %s", (lease_s, current))
                return current
        # a row another transaction leased between our scan and our lock fails the re-check, and LIMIT 1
        # then returns nothing although later rows are free: try again a few times
        for _ in range(4):
            picked = fetch_value(
                conn, f"""WITH pick AS (
                        SELECT q.id FROM review_queue q {join}
                         WHERE q.resolved_at IS NULL AND (q.leased_by IS NULL OR q.lease_until < now())
                           AND NOT (q.id = ANY(%s::bigint[])){conds}
                         ORDER BY {order_by} LIMIT 1 FOR UPDATE OF q SKIP LOCKED)
                    UPDATE review_queue r SET leased_by = %s, lease_until = now() + make_interval(secs => %s)
                      FROM pick WHERE r.id = pick.id RETURNING r.id""",
                (skipped, *params, user, lease_s))
            if picked is not None or not _any_free(conn, join, conds, params, skipped):
                break
        if current != picked:
            release(conn, user, current)
    return picked


def _any_free(conn: psycopg.Connection, join: str, conds: str, params: list[str], skipped: list[int]) -> bool:
    return bool(fetch_value(
        conn, f"SELECT EXISTS (SELECT 1 FROM review_queue q {join} WHERE q.resolved_at IS NULL"
        f" AND (q.leased_by IS NULL OR q.lease_until < now()) AND NOT (q.id = ANY(%s::bigint[])){conds})",
        (skipped, *params)))


@dataclass(frozen=True)
class Left:
    yours: int  # open items within the filters, not skipped: free, lease run out, or held by you
    held: int  # of those, the ones other reviewers hold now


@dataclass(frozen=True)
class _Counts:
    total: int
    held: int


def count_left(conn: psycopg.Connection, user: str, filters: Filters, skipped: list[int]) -> Left:
    """The open items within the filters that you did not skip: yours to take, and held by others now. One
    snapshot; the first count is an index-only scan without filters, the second reads only the leased rows
    (small partial indexes)."""
    join, conds, params = filters.sql()
    counts = fetch_required(
        conn, _Counts,
        f"""SELECT (SELECT count(*) FROM review_queue q {join} WHERE q.resolved_at IS NULL
                       AND NOT (q.id = ANY(%s::bigint[])){conds}) AS total,
                   (SELECT count(*) FROM review_queue q {join} WHERE q.resolved_at IS NULL
                       AND q.leased_by IS NOT NULL AND q.leased_by <> %s AND q.lease_until >= now()
                       AND NOT (q.id = ANY(%s::bigint[])){conds}) AS held""",
        (skipped, *params, user, skipped, *params))
    return Left(counts.total - counts.held, counts.held)


def count_flagged(conn: psycopg.Connection) -> int:
    """Open items waiting for an admin."""
    return int(fetch_value(conn, "SELECT count(*) FROM review_queue WHERE resolved_at IS NULL"
                                 " AND flagged_at IS NOT NULL"))


# --------------------------------------------------------------------------------------------- taxonomy

def group_values(taxonomy: Taxonomy | None, group: str) -> list[str] | None:
    """Every value a group can take in the taxonomy; None when the taxonomy does not know the group."""
    return None if taxonomy is None else taxonomy.values_of(group)


def taxonomy_groups(taxonomy: Taxonomy | None) -> list[str]:
    return [] if taxonomy is None else taxonomy.all_groups


def listing_taxonomy(conn: psycopg.Connection, listing_id: str) -> Taxonomy | None:
    """The taxonomy of the model that tagged (or queued) the listing, else the active model's."""
    version = fetch_value(
        conn, "SELECT model_version FROM listing_tags WHERE listing_id = %s AND model_version IS NOT NULL"
        " UNION ALL (SELECT model_version FROM review_queue WHERE listing_id = %s"
        " ORDER BY created_at DESC LIMIT 1) LIMIT 1", (listing_id, listing_id))
    return taxonomy_of(conn, version)


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
    tags: dict[str, str] = dict(conn.execute(
        "SELECT tag_group, value FROM listing_tags WHERE listing_id = %s AND tag_group IN (%s, %s)",
        (listing_id, CATEGORY_GROUP, TYPE_GROUP)).fetchall())
    category, type_ = tags.get(CATEGORY_GROUP), tags.get(TYPE_GROUP)
    if not taxonomy.applies(group, category=category, type_=type_):
        raise Conflict(f"{group} does not apply to {category or type_} (the listing's "
                       f"{'category' if category else 'type'})")


# ------------------------------------------------------------------------------------------- corrections

@dataclass(frozen=True)
class TagState:
    """A listing_tags row as it was before a correction: what undo writes back."""
    value: str
    source: str
    confidence: float | None
    model_version: str | None
    updated_at: datetime
    evidence: dict[str, Any] | None


@dataclass(frozen=True)
class _Claim:
    """A review item as a correction finds it (locked)."""
    listing_id: str
    tag_group: str
    leased_by: str | None
    resolved_at: datetime | None
    resolved_by: str | None
    model_version: str
    candidates: list[list[Any]]


def _corrector_id(name: str) -> str:
    """Console names allow '@', CorrectionEvent ids do not; the audit log keeps the real name."""
    return "".join(c if c.isalnum() or c in "._:-" else "_" for c in name)[:128]


def correct_item(conn: psycopg.Connection, user: str, review_id: int, value: str) -> tuple[int, CorrectionEvent]:
    """Resolve a review item with `value` (action "review.correct"): the item must be open and leased to
    `user`; the taxonomy is that of the item's model, and its candidates are values too. Returns the
    console_actions id (whose details let `undo` restore what was there) and the event. Conflict, and
    nothing stored, when the lease is gone or `check_correction` refuses."""
    with conn.transaction():
        claim = fetch_one(conn, _Claim, "SELECT listing_id, tag_group, leased_by, resolved_at, resolved_by,"
                          " model_version, candidates FROM review_queue WHERE id = %s FOR UPDATE", (review_id,))
        if claim is None:
            raise Conflict("this item is no longer in the queue (the listing was re-enriched or removed)")
        if claim.resolved_at is not None:
            raise Conflict(f"this item was already resolved{' by ' + claim.resolved_by if claim.resolved_by else ''}")
        if claim.leased_by != user:
            raise Conflict("your lease on this item ran out and another reviewer has it now")
        _lock_listing(conn, claim.listing_id)
        return _record(conn, user, claim.listing_id, claim.tag_group, value, taxonomy_of(conn, claim.model_version),
                       also=tuple(str(c[0]) for c in claim.candidates), action="review.correct",
                       review_id=review_id)


def correct_listing(conn: psycopg.Connection, user: str, listing_id: str, group: str,
                    value: str) -> tuple[int, CorrectionEvent]:
    """Correct (or set) any tag of a listing (action "listing.correct"), under the listing's taxonomy; as
    `correct_item` otherwise."""
    with conn.transaction():
        _lock_listing(conn, listing_id)
        return _record(conn, user, listing_id, group, value, listing_taxonomy(conn, listing_id),
                       action="listing.correct")


def _lock_listing(conn: psycopg.Connection, listing_id: str) -> None:
    if fetch_value(conn, "SELECT 1 FROM listings WHERE listing_id = %s FOR SHARE", (listing_id,)) is None:
        raise Conflict(f"no listing {listing_id!r}")


def _record(conn: psycopg.Connection, user: str, listing_id: str, group: str, value: str,
            taxonomy: Taxonomy | None, *, action: str, also: tuple[str, ...] = (),
            review_id: int | None = None) -> tuple[int, CorrectionEvent]:
    """Store one correction through the Kafka path (`record_correction`), inside the caller's transaction."""
    value = value.strip()
    check_correction(conn, taxonomy, listing_id, group, value, also)
    prev = fetch_one(conn, TagState, "SELECT value, source, confidence, model_version, updated_at, evidence"
                     " FROM listing_tags WHERE listing_id = %s AND tag_group = %s FOR UPDATE", (listing_id, group))
    reopen: list[int] = fetch_values(
        conn, "SELECT id FROM review_queue WHERE listing_id = %s AND tag_group = %s AND resolved_at IS NULL"
        " ORDER BY id FOR UPDATE", (listing_id, group))
    try:
        ev = CorrectionEvent(event_id=f"console:{uuid.uuid4().hex}", listing_id=listing_id, group=group,
                             old_value=prev.value if prev else None, new_value=value,
                             corrected_by=_corrector_id(user), corrected_at=datetime.now(UTC))
    except ValidationError as exc:
        raise Conflict("not a valid correction: " + "; ".join(e["msg"] for e in exc.errors())) from exc
    record_correction(conn, ev)
    if reopen:
        conn.execute("UPDATE review_queue SET resolved_by = %s, leased_by = NULL, lease_until = NULL"
                     " WHERE id = ANY(%s)", (user, reopen))
    action_id = users.log_action(conn, user, action, event_id=ev.event_id, listing_id=listing_id, group=group,
                                 old_value=ev.old_value, new_value=ev.new_value,
                                 previous=asdict(prev) if prev else None, resolved=reopen, review_id=review_id)
    return action_id, ev


@dataclass(frozen=True)
class Undone:
    kind: str  # what was undone: "correct", "skip" or "flag"
    item: int | None  # the review item it was about
    show: int | None  # the item to show now (leased to the reviewer)
    message: str


def undo(conn: psycopg.Connection, user: str, action_id: int, lease_s: float,
         current: int | None = None) -> Undone:
    """Undo one review action of `user`. The item brought back is leased to `user` and `current` (the item
    shown) given back. Conflict when it cannot be undone."""
    with conn.transaction():
        found = conn.execute("SELECT action, details FROM console_actions WHERE id = %s AND user_name = %s",
                             (action_id, user)).fetchone()
        if found is None:
            raise Conflict("nothing to undo")
        action, d = found
        if action == "review.skip":
            return _undo_skip(conn, user, action_id, d["review_id"], lease_s, current)
        if action == "review.flag":
            return _undo_flag(conn, user, action_id, d["review_id"], lease_s, current)
        if action != "review.correct":
            raise Conflict("nothing to undo")
        return _undo_correction(conn, user, action_id, d, lease_s, current)


def _undo_skip(conn: psycopg.Connection, user: str, action_id: int, item: int, lease_s: float,
               current: int | None) -> Undone:
    got = fetch_value(
        conn, "UPDATE review_queue SET leased_by = %s, lease_until = now() + make_interval(secs => %s)"
        " WHERE id = %s AND resolved_at IS NULL AND (leased_by IS NULL OR leased_by = %s"
        " OR lease_until < now()) RETURNING id", (user, lease_s, item, user))
    users.log_action(conn, user, "review.undo", of=action_id, kind="skip", review_id=item, leased=got is not None)
    if got is None:
        return Undone("skip", item, None, "Skip undone, but another reviewer has that item now (or it is resolved).")
    if current != item:
        release(conn, user, current)
    return Undone("skip", item, item, "Skip undone.")


def _undo_flag(conn: psycopg.Connection, user: str, action_id: int, item: int, lease_s: float,
               current: int | None) -> Undone:
    got = fetch_value(
        conn, "UPDATE review_queue SET flagged_by = NULL, flag_note = NULL, flagged_at = NULL, leased_by = %s,"
        " lease_until = now() + make_interval(secs => %s) WHERE id = %s AND resolved_at IS NULL"
        " AND flagged_by = %s AND (leased_by IS NULL OR leased_by = %s OR lease_until < now()) RETURNING id",
        (user, lease_s, item, user, user))
    if got is None:
        raise Conflict("an admin has that item now or resolved it")
    if current != item:
        release(conn, user, current)
    users.log_action(conn, user, "review.undo", of=action_id, kind="flag", review_id=item)
    return Undone("flag", item, item, "Comment withdrawn: the item is back with you.")


def _undo_correction(conn: psycopg.Connection, user: str, action_id: int, d: dict[str, Any], lease_s: float,
                     current: int | None) -> Undone:
    received = fetch_value(conn, "SELECT received_at FROM corrections WHERE event_id = %s FOR UPDATE",
                           (d["event_id"],))
    if received is None:
        raise Conflict("already undone")
    lid, group = d["listing_id"], d["group"]
    tag = conn.execute("SELECT value, source FROM listing_tags WHERE listing_id = %s AND tag_group = %s"
                       " FOR UPDATE", (lid, group)).fetchone()
    later = fetch_value(conn, "SELECT EXISTS (SELECT 1 FROM corrections WHERE listing_id = %s AND tag_group = %s"
                              " AND event_id <> %s AND received_at >= %s)", (lid, group, d["event_id"], received))
    if later or tag is None or tuple(tag) != (d["new_value"], "corrected"):
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
    reopened: list[int] = fetch_values(
        conn, "UPDATE review_queue SET resolved_at = NULL, resolved_by = NULL, leased_by = %s,"
        " lease_until = now() + make_interval(secs => %s)"
        " WHERE id = ANY(%s) AND resolved_at IS NOT NULL RETURNING id",
        (user, lease_s, d.get("resolved") or []))
    item = d.get("review_id")
    show = item if item in reopened else (reopened[0] if reopened else None)
    if show is not None and current != show:
        release(conn, user, current)
    users.log_action(conn, user, "review.undo", of=action_id, kind="correct", event_id=d["event_id"],
                     listing_id=lid, group=group, restored=prev, reopened=reopened)
    was = prev["value"] if prev else "no value"
    return Undone("correct", item, show, f"Undone: {group} of {lid} is back to {was}.")


@dataclass(frozen=True)
class _Taken:
    listing_id: str
    tag_group: str


def skip(conn: psycopg.Connection, user: str, item: int) -> int:
    """Give the item back (it stays open for others); returns the logged action's id."""
    with conn.transaction():
        conn.execute("UPDATE review_queue SET leased_by = NULL, lease_until = NULL"
                     " WHERE id = %s AND leased_by = %s AND resolved_at IS NULL", (item, user))
        row = fetch_one(conn, _Taken, "SELECT listing_id, tag_group FROM review_queue WHERE id = %s", (item,))
        return users.log_action(conn, user, "review.skip", review_id=item, listing_id=row.listing_id if row else None,
                                group=row.tag_group if row else None)


def flag(conn: psycopg.Connection, user: str, item: int, note: str) -> int:
    """Send the reviewer's item to an admin with their comment: it leaves the reviewers' queue. Returns the
    logged action's id."""
    with conn.transaction():
        row = fetch_one(
            conn, _Taken,
            "UPDATE review_queue SET flagged_by = %s, flag_note = %s, flagged_at = now(), leased_by = NULL,"
            " lease_until = NULL WHERE id = %s AND leased_by = %s AND resolved_at IS NULL AND flagged_at IS NULL"
            " RETURNING listing_id, tag_group", (user, note, item, user))
        if row is None:
            raise Conflict("this item is resolved, flagged already, or another reviewer has it now")
        return users.log_action(conn, user, "review.flag", review_id=item, listing_id=row.listing_id,
                                group=row.tag_group, note=note)


# ------------------------------------------------------------------------------------- what the page shows

@dataclass(frozen=True)
class RecentDecision:
    kind: str  # "correct", "skip" or "flag"
    listing_id: str | None
    group: str | None
    value: str | None  # the value taken, or the comment sent to an admin
    review_id: int | None
    at: datetime
    undone: bool  # a later undo took it back


def recent_decisions(conn: psycopg.Connection, user: str, limit: int = RECENT) -> list[RecentDecision]:
    """This person's last review decisions and listing corrections, newest first."""
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
        out.append(RecentDecision(kind, d.get("listing_id"), d.get("group"), value, d.get("review_id"), at, undone))
    return out


@dataclass(frozen=True)
class Progress:
    mine: int  # items resolved by the reviewer since midnight, database time
    team: int  # items resolved by anyone since then


def progress_today(conn: psycopg.Connection, user: str) -> Progress:
    return fetch_required(
        conn, Progress, "SELECT count(*) FILTER (WHERE resolved_by = %s) AS mine, count(*) AS team FROM review_queue"
        " WHERE resolved_at IS NOT NULL AND resolved_at >= date_trunc('day', now())", (user,))


@dataclass(frozen=True)
class Tag:
    """A listing_tags row."""
    tag_group: str
    value: str
    source: str  # seller, predicted or corrected
    confidence: float | None
    model_version: str | None
    updated_at: datetime


TAG_COLUMNS = "tag_group, value, source, confidence, model_version, updated_at"


def listing_tags(conn: psycopg.Connection, listing_id: str) -> list[Tag]:
    """The listing's tags, by group."""
    return fetch_all(conn, Tag, f"SELECT {TAG_COLUMNS} FROM listing_tags WHERE listing_id = %s ORDER BY tag_group",
                     (listing_id,))


@dataclass(frozen=True)
class Flag:
    by: str
    note: str
    at: datetime


@dataclass(frozen=True)
class _ItemRow:
    id: int
    listing_id: str
    tag_group: str
    candidates: list[list[Any]]  # [[value, confidence], ...] best first
    threshold: float
    model_version: str
    created_at: datetime
    lease_left: int | None  # seconds
    title: str | None
    seller_id: str
    images: int | None
    status: str
    flagged_by: str | None
    flag_note: str | None
    flagged_at: datetime | None
    reason: dict[str, Any] | None  # a ReviewReason; None for an item written before reasons were stored


@dataclass(frozen=True)
class ReviewCard:
    """Everything the review card shows about one item."""
    id: int
    listing_id: str
    group: str
    candidates: list[tuple[str, float]]  # best first, at most MAX_CANDIDATES
    threshold: float
    model_version: str
    created_at: datetime
    lease_left: int  # seconds left on the lease
    title: str
    seller_id: str
    images: int  # photos shown, at most 4
    status: str
    flag: Flag | None  # sent to an admin
    seller_tags: list[Tag]
    other_tags: list[Tag]
    choices: list[str]  # every value the group can take (and the candidates)
    guideline: Markup | None  # how to label the group (rendered markdown)
    reason: ReviewReason | None  # the rule that queued it


def review_card(conn: psycopg.Connection, item: int) -> ReviewCard | None:
    row = fetch_one(
        conn, _ItemRow,
        "SELECT q.id, q.listing_id, q.tag_group, q.candidates, q.threshold, q.model_version, q.created_at,"
        " greatest(0, extract(epoch FROM q.lease_until - now()))::int AS lease_left, l.event->>'title' AS title,"
        " l.seller_id, jsonb_array_length(l.event->'images') AS images, l.status, q.flagged_by, q.flag_note,"
        " q.flagged_at, q.reason FROM review_queue q JOIN listings l ON l.listing_id = q.listing_id WHERE q.id = %s",
        (item,))
    if row is None:
        return None
    tags = listing_tags(conn, row.listing_id)
    taxonomy = taxonomy_of(conn, row.model_version)
    values = group_values(taxonomy, row.tag_group) or []  # a group the taxonomy lacks: the candidates only
    candidates = [(str(c[0]), float(c[1])) for c in row.candidates][:MAX_CANDIDATES]
    for v, _ in candidates:
        if v not in values:
            values = [*values, v]
    flag = Flag(row.flagged_by or "", row.flag_note or "", row.flagged_at) if row.flagged_at else None
    return ReviewCard(
        id=row.id, listing_id=row.listing_id, group=row.tag_group, candidates=candidates, threshold=row.threshold,
        model_version=row.model_version, created_at=row.created_at, lease_left=row.lease_left or 0,
        title=row.title or "", seller_id=row.seller_id, images=min(row.images or 0, 4), status=row.status, flag=flag,
        seller_tags=[t for t in tags if t.source == "seller"], other_tags=[t for t in tags if t.source != "seller"],
        choices=values, guideline=guidelines(taxonomy.name).get(row.tag_group) if taxonomy else None,
        reason=ReviewReason.model_validate(row.reason) if row.reason else None)
