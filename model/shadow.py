"""Shadow figures for a candidate: agreement with the active model and accuracy on fresh corrections.

Workers store a shadow candidate's answers beside the active model's (worker/shadow.py). A person's
correction that arrives later is the truth both are measured against: the share of corrected groups
each model had right. The gate can require the candidate to be at least as right as the active model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg.rows import class_row


@dataclass
class ShadowReport:
    candidate: str
    listings: int = 0
    agreement: dict[str, tuple[int, float]] = field(default_factory=dict)  # group → (rows, share agreeing)
    corrections: int = 0
    candidate_accuracy: float | None = None
    active_accuracy: float | None = None


@dataclass(frozen=True)
class _Agreement:
    tag_group: str
    rows: int
    agreeing: float  # share of the rows where the candidate and the active model gave the same value


@dataclass(frozen=True)
class _Judged:
    corrections: int  # shadow predictions a person corrected afterwards
    candidate_right: float | None  # share of them the candidate had right; None without corrections
    active_right: float | None  # the same for the active model


def shadow_report(conn: psycopg.Connection, candidate: str) -> ShadowReport:
    report = ShadowReport(candidate)
    with conn.cursor() as cur:
        cur.execute("SELECT count(DISTINCT listing_id) FROM shadow_predictions WHERE model_version = %s",
                    (candidate,))
        listings = cur.fetchone()
    report.listings = int(listings[0]) if listings else 0
    with conn.cursor(row_factory=class_row(_Agreement)) as cur:
        cur.execute("SELECT tag_group, count(*) AS rows, avg((value = active_value)::int)::float8 AS agreeing"
                    " FROM shadow_predictions WHERE model_version = %s AND active_value IS NOT NULL"
                    " GROUP BY tag_group ORDER BY tag_group", (candidate,))
        for a in cur.fetchall():
            report.agreement[a.tag_group] = (a.rows, a.agreeing)
    # the latest correction per listing and group, made after the shadow predicted it
    with conn.cursor(row_factory=class_row(_Judged)) as cur:
        cur.execute(
            """SELECT count(*) AS corrections,
                      avg((s.value = c.new_value)::int)::float8 AS candidate_right,
                      avg((s.active_value IS NOT DISTINCT FROM c.new_value)::int)::float8 AS active_right
                 FROM shadow_predictions s
                 JOIN LATERAL (SELECT new_value FROM corrections c
                                WHERE c.listing_id = s.listing_id AND c.tag_group = s.tag_group
                                  AND c.received_at > s.created_at
                                ORDER BY c.corrected_at DESC LIMIT 1) c ON true
                WHERE s.model_version = %s""", (candidate,))
        judged = cur.fetchone()
    if judged is not None and judged.corrections:
        report.corrections = judged.corrections
        report.candidate_accuracy, report.active_accuracy = judged.candidate_right, judged.active_right
    return report


def shadow_gate(report: ShadowReport, min_corrections: int) -> tuple[bool, list[str]]:
    """At least `min_corrections` fresh corrections, and the candidate right at least as often as the active."""
    if report.corrections < min_corrections:
        return False, [f"shadow: {report.corrections} corrections since the shadow run, {min_corrections} needed"]
    candidate, active = report.candidate_accuracy, report.active_accuracy
    if candidate is None or active is None:  # no corrections yet, and none were required
        return True, []
    if candidate < active:
        return False, [f"shadow: right on {candidate:.1%} of corrections, the active model on {active:.1%}"]
    return True, []
