"""Shadow figures for a candidate: agreement with the active model and accuracy on fresh corrections.

Workers store a shadow candidate's answers beside the active model's (worker/shadow.py). A person's
correction that arrives later is the truth both are measured against: the share of corrected groups
each model had right. The gate can require the candidate to be at least as right as the active model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import psycopg


@dataclass
class ShadowReport:
    candidate: str
    listings: int = 0
    agreement: dict[str, tuple[int, float]] = field(default_factory=dict)  # group → (rows, share agreeing)
    corrections: int = 0
    candidate_accuracy: float | None = None
    active_accuracy: float | None = None


def shadow_report(conn: psycopg.Connection, candidate: str) -> ShadowReport:
    report = ShadowReport(candidate)
    report.listings = conn.execute("SELECT count(DISTINCT listing_id) FROM shadow_predictions WHERE model_version = %s",
                                   (candidate,)).fetchone()[0]
    for group, n, agree in conn.execute(
            "SELECT tag_group, count(*), avg((value = active_value)::int) FROM shadow_predictions"
            " WHERE model_version = %s AND active_value IS NOT NULL GROUP BY tag_group ORDER BY tag_group",
            (candidate,)).fetchall():
        report.agreement[group] = (int(n), float(agree))
    # the latest correction per listing and group, made after the shadow predicted it
    row = conn.execute(
        """SELECT count(*), avg((s.value = c.new_value)::int), avg((s.active_value IS NOT DISTINCT FROM c.new_value)::int)
             FROM shadow_predictions s
             JOIN LATERAL (SELECT new_value FROM corrections c
                            WHERE c.listing_id = s.listing_id AND c.tag_group = s.tag_group
                              AND c.received_at > s.created_at
                            ORDER BY c.corrected_at DESC LIMIT 1) c ON true
            WHERE s.model_version = %s""", (candidate,)).fetchone()
    report.corrections = int(row[0])
    if report.corrections:
        report.candidate_accuracy, report.active_accuracy = float(row[1]), float(row[2])
    return report


def shadow_gate(report: ShadowReport, min_corrections: int) -> tuple[bool, list[str]]:
    """At least `min_corrections` fresh corrections, and the candidate right at least as often as the active."""
    if report.corrections < min_corrections:
        return False, [f"shadow: {report.corrections} corrections since the shadow run, {min_corrections} needed"]
    if report.candidate_accuracy < report.active_accuracy:
        return False, [f"shadow: right on {report.candidate_accuracy:.1%} of corrections, the active model on "
                       f"{report.active_accuracy:.1%}"]
    return True, []
