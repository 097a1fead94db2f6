"""A marketplace's own catalogue as a labelled set: seller-given tags as noisy labels.

Rows come from Postgres (``listings.event`` with its images, ``listing_tags`` source ``seller`` and
``corrected``) or from a JSONL export of ListingEvents (and, optionally, CorrectionEvents in the same
file; a folder export: every ``*.jsonl`` file in it, in name order). Any taxonomy file works: values are
mapped to the taxonomy's, unknown groups and values are masked (MISSING: a masked group adds no loss).

- Noisy labels: the seller's category and attributes. Corrected labels (people) override the seller's
  for their group and count at full weight: the per-task weights (``TrainConfig.task_weights``)
  scale the losses of groups by how many labels they have, and a training listing with a correction is
  repeated ``TrainConfig.correction_repeats`` times, as ``enrich train --with-corrections`` does.
- Split: deterministic by a hash of the listing id (sha256), so a listing stays in its split as the
  catalogue grows, whichever source it is read from: ``test`` for the first TEST_SHARE of the hash
  range, ``val`` for the next VAL_SHARE, the rest ``train``.
- Photos: up to ``photos_per_item`` loadable photos per listing (2 in val and test: the first is the
  retrieval query, the others the gallery), loaded through a ``load(uri) -> PIL.Image`` function
  (default: ``core.images.load_image`` with the settings given — the worker's allow-list and limits),
  resized to image_size×image_size RGB.
- Weak labels from listing text: in the training split, a group (the category or an exclusive attribute group)
  without a seller or corrected label whose title + description names exactly one of its values, not
  negated (``model.text``, the taxonomy's vocabulary), gets that value as a label whose loss counts
  ``TrainConfig.weak_label_weight`` times (``LabelledImages.weights``); a text that names none, several
  or only negated values leaves the group masked. Non-exclusive groups get no weak labels (a text naming
  one style says nothing about the others). Never in val or test: evaluation stays on people's labels.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from psycopg import Connection
from psycopg.rows import class_row

from core.config import Settings
from core.db import connection, database_url
from core.images import load_image
from model.text import Vocabulary, load_vocabulary
from schemas.events import CorrectionEvent, ListingEvent
from schemas.taxonomy import CATEGORY_GROUP, TYPE_GROUP, Taxonomy
from training.config import TrainConfig
from training.data import LabelledImages, PreparedData, Split
from training.losses import MISSING

log = logging.getLogger(__name__)

POSTGRES = "postgres"  # catalogue_source naming the database of the settings (ENRICH_DATABASE_URL)
TEST_SHARE = 0.2
VAL_SHARE = 0.1
SPLITS = ("train", "val", "test")
MULTI_SEP = ","  # a non-exclusive group's values in one tag: "casual,vintage"


@dataclass
class CatalogueRow:
    listing_id: str
    images: list[str]
    seller: dict[str, str] = field(default_factory=dict)  # group -> seller-given value
    corrected: dict[str, str] = field(default_factory=dict)  # group -> latest corrected value
    text: str = ""  # the listing's title and description (for weak labels from listing text)

    @property
    def labels(self) -> dict[str, str]:
        """The labels used: the seller's, with corrected groups overridden."""
        return {**self.seller, **self.corrected}


def split_of(listing_id: str) -> str:
    """train, val or test: a fixed function of the listing id (sha256), the same for every source."""
    u = int.from_bytes(hashlib.sha256(listing_id.encode()).digest()[:8], "big") / 2 ** 64
    return "test" if u < TEST_SHARE else "val" if u < TEST_SHARE + VAL_SHARE else "train"


def _seller_tags(event: dict) -> dict[str, str]:
    tags = dict(event.get("attributes") or {})
    if event.get("category"):
        tags[CATEGORY_GROUP] = event["category"]
    return tags


def _text(event: dict) -> str:
    return "\n".join(t for t in (event.get("title") or "", event.get("description") or "") if t)


@dataclass
class _StoredListing:
    """A row of rows_from_postgres's query."""
    listing_id: str
    event: dict[str, Any]  # the ListingEvent as stored
    seller: dict[str, str]  # listing_tags source=seller: group -> value
    corrected: dict[str, str]  # listing_tags source=corrected: group -> value


def rows_from_postgres(conn: Connection[Any]) -> list[CatalogueRow]:
    """Live listings with their seller tags (the event's, updated by listing_tags source=seller) and
    corrected tags (listing_tags source=corrected), ordered by listing id. SQL only (no worker code)."""
    with conn.cursor(row_factory=class_row(_StoredListing)) as cur:
        cur.execute(
            "SELECT l.listing_id, l.event,"
            " COALESCE(jsonb_object_agg(t.tag_group, t.value) FILTER (WHERE t.source = 'seller'), '{}'::jsonb)"
            " AS seller,"
            " COALESCE(jsonb_object_agg(t.tag_group, t.value) FILTER (WHERE t.source = 'corrected'), '{}'::jsonb)"
            " AS corrected"
            " FROM listings l LEFT JOIN listing_tags t ON t.listing_id = l.listing_id"
            " WHERE l.status <> 'deleted' AND NOT COALESCE((l.event ->> 'deleted')::boolean, false)"
            " GROUP BY l.listing_id, l.event ORDER BY l.listing_id")
        stored = cur.fetchall()
    out = []
    for row in stored:
        tags = {**_seller_tags(row.event), **row.seller}
        tags.pop(TYPE_GROUP, None)
        corrected = {k: v for k, v in row.corrected.items() if k != TYPE_GROUP}
        out.append(CatalogueRow(row.listing_id, list(row.event.get("images") or []), tags, corrected,
                                _text(row.event)))
    return out


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no *.jsonl files in catalogue export folder {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"catalogue export {path} not found")
    return [path]


def rows_from_jsonl(path: Path | str) -> list[CatalogueRow]:
    """A JSONL export: one ListingEvent per line (the last one of a listing wins; deleted ones drop out),
    and optionally CorrectionEvents (lines with ``new_value``; the latest per group wins). Relative image
    paths are taken relative to the file's folder."""
    listings: dict[str, ListingEvent] = {}
    corrections: dict[tuple[str, str], tuple[datetime, str]] = {}
    for file in _jsonl_files(Path(path)):
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                body = json.loads(line)
                if "new_value" in body:
                    c = CorrectionEvent.model_validate(body)
                    key = (c.listing_id, c.group)
                    if key not in corrections or corrections[key][0] <= c.corrected_at:
                        corrections[key] = (c.corrected_at, c.new_value)
                else:
                    ev = ListingEvent.model_validate(body)
                    listings[ev.listing_id] = ev
            except ValueError as exc:
                raise ValueError(f"{file}:{n}: not a ListingEvent or CorrectionEvent: {exc}") from exc
    out = []
    for listing_id in sorted(listings):
        ev = listings[listing_id]
        if ev.deleted:
            continue
        base = Path(path) if Path(path).is_dir() else Path(path).parent
        images = [u if "://" in u or Path(u).is_absolute() else str(base / u) for u in ev.images]
        corrected = {g: v for (lid, g), (_, v) in corrections.items() if lid == listing_id and g != TYPE_GROUP}
        body = ev.model_dump()
        out.append(CatalogueRow(listing_id, images, _seller_tags(body), corrected, _text(body)))
    return out


def read_rows(source: str | Path, settings: Settings) -> list[CatalogueRow]:
    """``source``: "postgres" (the database of ``settings``) or a JSONL file / export folder."""
    if str(source) == POSTGRES:
        with connection(database_url(settings)) as conn:
            return rows_from_postgres(conn)
    return rows_from_jsonl(source)


def image_loader(settings: Settings) -> Callable[[str], Image.Image]:
    """core.images.load_image under ``settings`` (the worker's allow-list and limits)."""
    return lambda uri: load_image(uri, settings)


@dataclass
class _Encoded:
    category: int
    groups: dict[str, object]  # exclusive: int; non-exclusive: multi-hot (V,) or None (no label)


def _encode(labels: dict[str, str], taxonomy: Taxonomy, stats: dict[str, int]) -> _Encoded:
    def index(values: list[str], value: str) -> int:
        if value in values:
            return values.index(value)
        stats["unknown"] += 1
        return MISSING

    cat = labels.get(CATEGORY_GROUP)
    category = index(taxonomy.category_names, cat) if cat is not None else MISSING
    groups: dict[str, object] = {}
    for g in taxonomy.attribute_groups:
        value = labels.get(g.name)
        if value is None:
            groups[g.name] = MISSING if g.exclusive else None
        elif g.exclusive:
            groups[g.name] = index(g.values, value)
        else:
            parts = [p.strip() for p in value.split(MULTI_SEP) if p.strip()]
            known = [p for p in parts if p in g.values]
            if len(known) < len(parts):  # an unknown value: the seller's list is not usable as a whole
                stats["unknown"] += 1
                groups[g.name] = None
            else:
                hot = np.zeros(len(g.values), np.float32)
                hot[[g.values.index(p) for p in known]] = 1.0
                groups[g.name] = hot
    stats["unknown_groups"] += len(set(labels) - {CATEGORY_GROUP, *taxonomy.group_names})
    return _Encoded(category, groups)


def weak_labels(row: CatalogueRow, taxonomy: Taxonomy, vocabulary: Vocabulary) -> dict[str, str]:
    """Weak labels from listing text: group → the one value the listing's text names (not negated), for the
    category and the exclusive groups the seller and the corrections leave empty. Groups whose text names no
    value, several, or a value it also negates are left out (they stay masked)."""
    if not row.text:
        return {}
    found = vocabulary.match(row.text)
    strong = row.labels
    out = {}
    for g in [CATEGORY_GROUP, *(a.name for a in taxonomy.attribute_groups if a.exclusive)]:
        if g in strong or g == TYPE_GROUP:
            continue
        named = set(found.found.get(g, {})) - set(found.negated.get(g, {}))
        if len(named) == 1:
            out[g] = named.pop()
    return out


def rows_to_images(rows: list[CatalogueRow], taxonomy: Taxonomy, load: Callable[[str], Image.Image], size: int,
                   photos_per_item: int, repeats_corrected: int = 1, vocabulary: Vocabulary | None = None,
                   weak_weight: float = 0.0) -> tuple[LabelledImages, np.ndarray, int]:
    """Up to ``photos_per_item`` photos per listing (listings without a loadable photo or any known
    label are skipped). Returns the rows, the query mask (each listing's first photo where it has
    more than one) and how many listings became rows. Item ids: the listing's position in ``rows``
    (the retrieval identity). A listing with corrected labels appears ``repeats_corrected`` times.
    With a ``vocabulary`` and ``weak_weight`` > 0: weak labels from the listing text
    (:func:`weak_labels`), weighted ``weak_weight`` in ``LabelledImages.weights`` (strong labels 1)."""
    images, category, item_ids, query = [], [], [], []
    groups: dict[str, list] = {g: [] for g in taxonomy.group_names}
    row_w: dict[str, list[float]] = {g: [] for g in [CATEGORY_GROUP, *taxonomy.group_names]}
    weak_made: dict[str, int] = {}
    stats = {"unknown": 0, "unknown_groups": 0, "no_photo": 0, "no_label": 0}
    listings = 0
    for item, row in enumerate(rows):
        weak = weak_labels(row, taxonomy, vocabulary) if vocabulary is not None and weak_weight > 0 else {}
        enc = _encode({**weak, **row.labels}, taxonomy, stats)
        weak = {g: v for g, v in weak.items()  # a weak value always exists in the taxonomy; kept if encoded
                if (enc.category if g == CATEGORY_GROUP else enc.groups[g]) != MISSING}
        if enc.category == MISSING and all(v is None or (isinstance(v, int) and v == MISSING)
                                           for v in enc.groups.values()):
            stats["no_label"] += 1
            continue
        photos: list[np.ndarray] = []
        for uri in row.images:
            if len(photos) >= photos_per_item:
                break
            try:
                photos.append(np.asarray(load(uri).convert("RGB").resize((size, size), Image.Resampling.BILINEAR),
                                         dtype=np.uint8))
            except Exception as exc:  # an unloadable photo: the next one, never stop training
                log.debug("catalogue: %s: %s", row.listing_id, exc)
        if not photos:
            stats["no_photo"] += 1
            continue
        listings += 1
        for g in weak:
            weak_made[g] = weak_made.get(g, 0) + 1
        for _ in range(max(1, repeats_corrected) if row.corrected else 1):
            for k, photo in enumerate(photos):
                images.append(photo)
                category.append(enc.category)
                item_ids.append(item)
                query.append(k == 0 and len(photos) > 1)
                for g in taxonomy.group_names:
                    groups[g].append(enc.groups[g])
                for g, ws in row_w.items():
                    ws.append(weak_weight if g in weak else 1.0)
    if any(stats.values()):
        log.info("catalogue: %d unknown value(s) and %d unknown group(s) masked; %d listing(s) without a "
                 "known label, %d without a loadable photo skipped", stats["unknown"], stats["unknown_groups"],
                 stats["no_label"], stats["no_photo"])
    if weak_made:
        log.info("catalogue: weak labels from listing text (×%g): %s", weak_weight,
                 ", ".join(f"{g} {k}" for g, k in sorted(weak_made.items())))
    n = len(images)
    out_groups: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for group in taxonomy.attribute_groups:
        vals = groups[group.name]
        if group.exclusive:
            out_groups[group.name] = np.asarray(vals, dtype=np.int64).reshape(n)
        else:
            none = np.zeros(len(group.values), np.float32)
            present[group.name] = np.array([v is not None for v in vals], dtype=bool).reshape(n)
            out_groups[group.name] = (np.stack([none if v is None else v for v in vals]) if n
                                      else np.zeros((0, len(group.values)), np.float32))
    data = LabelledImages(np.stack(images) if n else np.zeros((0, size, size, 3), np.uint8),
                          np.asarray(category, dtype=np.int64).reshape(n),
                          np.asarray(item_ids, dtype=np.int64).reshape(n), out_groups, present,
                          {g: np.asarray(row_w[g], dtype=np.float32).reshape(n) for g in sorted(weak_made)})
    return data, np.asarray(query, dtype=bool).reshape(n), listings


def split_rows(rows: list[CatalogueRow]) -> dict[str, list[CatalogueRow]]:
    out: dict[str, list[CatalogueRow]] = {s: [] for s in SPLITS}
    for r in rows:
        out[split_of(r.listing_id)].append(r)
    return out


def _source(cfg: TrainConfig) -> str:
    if not cfg.catalogue_source:
        raise ValueError("dataset 'catalogue' needs a catalogue source: 'postgres' or a JSONL export "
                         "(enrich train --catalogue PATH|postgres)")
    return str(cfg.catalogue_source)


def catalogue_test(cfg: TrainConfig, taxonomy: Taxonomy, settings: Settings,
                   load: Callable[[str], Image.Image] | None = None,
                   rows: list[CatalogueRow] | None = None) -> Split:
    """The fixed evaluation set: the catalogue's test listings, 2 photos each (query + gallery). ``settings``:
    the database of source "postgres", and the default ``load``'s allow-list and limits."""
    rows = rows if rows is not None else read_rows(_source(cfg), settings)
    data, query, _ = rows_to_images(split_rows(rows)["test"], taxonomy, load or image_loader(settings),
                                    cfg.image_size, 2)
    return Split(data, query)


def training_vocabulary(cfg: TrainConfig, taxonomy: Taxonomy) -> Vocabulary | None:
    """The vocabulary for weak labels from listing text, or None (weak labels off, or the taxonomy has none):
    a taxonomy given as a JSON path has it beside the file (``<name>.vocab.json``), a bundled one in
    ``schemas/taxonomies``."""
    if cfg.weak_label_weight <= 0:
        return None
    path = Path(str(cfg.taxonomy))
    if path.suffix:
        return load_vocabulary(taxonomy, path.with_name(f"{path.stem}.vocab.json"))
    return load_vocabulary(taxonomy)


def prepare_catalogue(cfg: TrainConfig, taxonomy: Taxonomy, settings: Settings,
                      load: Callable[[str], Image.Image] | None = None,
                      rows: list[CatalogueRow] | None = None) -> PreparedData:
    """The catalogue's train, val and test splits (as ``catalogue_test``)."""
    rows = rows if rows is not None else read_rows(_source(cfg), settings)
    load = load or image_loader(settings)
    parts = split_rows(rows)
    train, _, n_train = rows_to_images(parts["train"], taxonomy, load, cfg.image_size, cfg.photos_per_item,
                                       cfg.correction_repeats, training_vocabulary(cfg, taxonomy),
                                       cfg.weak_label_weight)
    val, val_q, _ = rows_to_images(parts["val"], taxonomy, load, cfg.image_size, 2)
    test = catalogue_test(cfg, taxonomy, settings, load, rows)
    if not len(train) or not len(val) or not len(test.data):
        raise ValueError(f"catalogue {_source(cfg)}: too few labelled listings with photos for a train/val/test "
                         f"split ({len(train)}/{len(val)}/{len(test.data)} photos)")
    log.info("catalogue %s: %d listings; %d train photos (%d listings), %d val, %d test", _source(cfg), len(rows),
             len(train), n_train, len(val), len(test.data))
    return PreparedData(taxonomy, train, Split(val, val_q), test)
