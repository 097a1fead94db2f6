"""Batch mode: the same enrichment core in-process, no Kafka or broker (embedded Postgres by default).

Input: a JSONL file of ListingEvents (relative image paths resolve against the file's folder), or
a folder holding *.jsonl files, or a folder of images (one listing per image, id = file name).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from pydantic import ValidationError
from rich.console import Console, JustifyMethod
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from schemas.enrichment import Enrichment
from schemas.events import ListingEvent
from schemas.taxonomy import NOT_APPLICABLE
from worker.pipeline import BatchOutcome, Enricher
from worker.store import upsert_listings
from worker.write_errors import TRANSIENT, classify, one_by_one

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass
class BatchReport:
    read: int = 0
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (where, why): rows that are not a listing
    refused: list[tuple[str, str]] = field(default_factory=list)  # (where, why): rows the database refused
    enrichments: list[Enrichment] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every row was read, stored and enriched."""
        return not (self.invalid or self.refused or self.failed)

    def add(self, out: BatchOutcome) -> None:
        self.enrichments += out.enriched
        self.failed.update(out.failed)
        self.failed.update({k: "unreachable: " + v for k, v in out.retry.items()})
        self.skipped += out.skipped
        self.images += out.images


def _resolve_images(event: dict[str, Any], base: Path) -> dict[str, Any]:
    images = []
    for uri in event.get("images") or []:
        if isinstance(uri, str) and "://" not in uri and not Path(uri).is_absolute():
            uri = str((base / uri).resolve())
        images.append(uri)
    return {**event, "images": images} if images else event


def read_listings(source: Path) -> tuple[list[ListingEvent], list[tuple[str, str]], list[str]]:
    """Events from a JSONL file or folder, invalid lines as (where, why), and where each event came from
    (``file:line`` or the image file); invalid lines are reported, not fatal."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    events: list[ListingEvent] = []
    invalid: list[tuple[str, str]] = []
    origins: list[str] = []
    if source.is_dir():
        files = sorted(source.glob("*.jsonl"))
        if not files:
            for img in sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                lid = "".join(c if c.isalnum() or c in "._-" else "_" for c in img.stem)[:128] or "image"
                events.append(ListingEvent(listing_id=lid, seller_id="batch", images=[str(img.resolve())]))
                origins.append(img.name)
            return events, invalid, origins
    else:
        files = [source]
    for path in files:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                    events.append(ListingEvent.model_validate(_resolve_images(raw, path.parent)))
                    origins.append(f"{path.name}:{n}")
                except ValidationError as exc:
                    invalid.append((f"{path.name}:{n}", "; ".join(
                        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])[:300]))
                except (json.JSONDecodeError, TypeError, AttributeError) as exc:
                    invalid.append((f"{path.name}:{n}", str(exc).splitlines()[0][:200]))
    return events, invalid, origins


def run_batch(conn: psycopg.Connection, enricher: Enricher, events: list[ListingEvent], chunk: int | None = None,
              progress: bool = True, origins: list[str] | None = None) -> BatchReport:
    """Upsert the events, then enrich whatever is pending among them, chunk by chunk.

    Rows the database refuses are reported in ``report.refused`` (where: ``origins[i]``, else the listing id)
    and left out; the rest is enriched."""
    t0 = time.perf_counter()
    report = BatchReport(read=len(events))
    try:
        with conn.transaction():
            changed = len(upsert_listings(conn, events, topic="batch").changed)
    except Exception as exc:
        if classify(exc) == TRANSIENT:
            raise
        parts, refused = one_by_one(conn, len(events), lambda i: upsert_listings(conn, [events[i]], topic="batch"))
        changed = sum(len(p.changed) for p in parts)
        for i, why in sorted(refused.items()):
            where = origins[i] if origins else f"listing {events[i].listing_id}"
            report.refused.append((where, f"{why.reason}: {why.detail}"))
        events = [ev for i, ev in enumerate(events) if i not in refused]
    ids = list(dict.fromkeys(ev.listing_id for ev in events if not ev.deleted))
    # a task's worth per run: its forward passes overlap decoding and writing (worker/pipeline.py)
    chunk = chunk or enricher.settings.task_listings
    columns = (TextColumn("enriching"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("enrich", total=len(ids))
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            # batch mode has no retry queue: use what can be fetched now, report the rest
            report.add(enricher.run(conn, part, accept_partial=True))
            bar.advance(task, len(part))
    report.seconds = time.perf_counter() - t0
    log.info("batch: %d read, %d new or changed, %d enriched, %d failed, %d already done",
             report.read, changed, len(report.enrichments), len(report.failed), len(report.skipped))
    return report


def render_report(report: BatchReport, console: Console, max_rows: int = 40) -> None:
    """A rich table of the tags the model filled, then totals."""
    table = Table(title="tags filled by the model", show_lines=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("listing", "left"), ("group", "left"), ("value", "left"), ("confidence", "right"))
    for col, just in columns:
        table.add_column(col, justify=just)
    shown: list[tuple[str, str, str, str]] = []
    filled = not_applicable = 0
    for e in report.enrichments:
        predicted = [(e.listing_id, g, t.value, f"{t.confidence:.2f}") for g, t in e.tags.items()
                     if t.source.value == "predicted"]
        # a group the listing's category has not is shown as n/a, not as missing
        shown += predicted + [(e.listing_id, g, NOT_APPLICABLE, "") for g in e.not_applicable]
        filled, not_applicable = filled + len(predicted), not_applicable + len(e.not_applicable)
    for row in shown[:max_rows]:
        table.add_row(*row)
    if len(shown) > max_rows:
        table.caption = f"… and {len(shown) - max_rows} more"
    console.print(table)
    review = sum(len(e.review) for e in report.enrichments)
    console.print(f"{report.read} listings read, {len(report.enrichments)} enriched ({report.images} images), "
                  f"{filled} tags filled, {not_applicable} groups n/a, {review} sent to review, "
                  f"{len(report.failed)} failed, "
                  f"{len(report.skipped)} already done, {len(report.invalid)} invalid lines, "
                  f"{len(report.refused)} refused by the database "
                  f"in {report.seconds:.1f}s")
    for lid, why in list(report.failed.items())[:10]:
        console.print(f"  [yellow]failed[/yellow] {lid}: {why}")
    for where, why in report.invalid[:10]:
        console.print(f"  [yellow]invalid[/yellow] {where}: {why}")
    for where, why in report.refused[:10]:
        console.print(f"  [yellow]refused[/yellow] {where}: {why}")
