"""Shadow figures on real Postgres: agreement with the active model, accuracy on later corrections, the gate."""
from __future__ import annotations

import json

import pytest

from model.shadow import ShadowReport, shadow_gate, shadow_report


def _shadowed(db, listing: str, group: str, value: str, active_value: str | None) -> None:
    db.execute("INSERT INTO listings (listing_id, seller_id, event, content_hash) VALUES (%s, 's', %s, 'h')"
               " ON CONFLICT DO NOTHING", (listing, json.dumps({"listing_id": listing})))
    db.execute("INSERT INTO shadow_predictions (model_version, listing_id, tag_group, value, confidence,"
               " active_version, active_value) VALUES ('m-b', %s, %s, %s, 0.9, 'm-a', %s)",
               (listing, group, value, active_value))


def _corrected(db, listing: str, group: str, value: str) -> None:
    db.execute("INSERT INTO corrections (event_id, listing_id, tag_group, new_value, corrected_by, corrected_at,"
               " received_at) VALUES (%s, %s, %s, %s, 'alice', now(), now() + interval '1 minute')",
               (f"c-{listing}-{group}", listing, group, value))


def test_the_report_counts_agreement_per_group_and_who_was_right_on_later_corrections(db):
    db.execute("INSERT INTO models (model_version, manifest, path) VALUES ('m-b', '{}', '/m-b')")
    _shadowed(db, "L1", "colour", "red", "red")
    _shadowed(db, "L2", "colour", "blue", "red")
    _shadowed(db, "L2", "category", "Dress", "Shirt")
    _shadowed(db, "L3", "colour", "red", None)  # the seller's tag was kept: nothing to agree with
    _corrected(db, "L2", "colour", "blue")  # the candidate was right, the active model wrong
    _corrected(db, "L2", "category", "Coat")  # both wrong
    report = shadow_report(db, "m-b")
    assert report.listings == 3
    assert report.agreement == {"category": (1, 0.0), "colour": (2, 0.5)}
    assert report.corrections == 2
    assert report.candidate_accuracy == pytest.approx(0.5) and report.active_accuracy == pytest.approx(0.0)
    assert shadow_gate(report, min_corrections=2) == (True, [])
    assert shadow_report(db, "m-none") == ShadowReport("m-none")


def test_the_gate_needs_enough_corrections_and_the_candidate_at_least_as_right():
    none_yet = ShadowReport("m-b")
    assert shadow_gate(none_yet, min_corrections=0) == (True, [])  # none required, none to compare
    passed, why = shadow_gate(none_yet, min_corrections=3)
    assert not passed and "0 corrections since the shadow run, 3 needed" in why[0]
    worse = ShadowReport("m-b", corrections=4, candidate_accuracy=0.5, active_accuracy=0.75)
    passed, why = shadow_gate(worse, min_corrections=3)
    assert not passed and "right on 50.0% of corrections, the active model on 75.0%" in why[0]
    assert shadow_gate(ShadowReport("m-b", corrections=4, candidate_accuracy=0.75, active_accuracy=0.75), 3)[0]
