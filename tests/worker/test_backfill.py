"""The catalogue backfill after a promotion, on real parts: Postgres, Redis or RabbitMQ brokers, real Celery
workers (in this process, or `enrich worker` processes killed with -9) and real small models."""
from __future__ import annotations

import os
import signal
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from celery.contrib.testing.worker import start_worker
from kombu import Connection
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from core.celery_app import app, send_enrich
from core.config import Settings
from enrich.cli import app as cli
from harness.cluster import worker_process_env
from harness.images import png_bytes
from harness.models import save_small_model
from model.inference import load_predictor
from model.registry import promote, register_candidate, rollback
from schemas.events import CorrectionEvent, ListingEvent
from similar import nightly
from similar.common import shelf_model_version
from similar.query import read_neighbours
from similar.snapshots import latest_snapshot_dir
from tests.worker.conftest import (
    AMQP,
    gate_handler,
    make_settings,
    serve_gated,
    start_worker_process,
    stop_all,
    wait_until,
)
from worker import backfill, runtime
from worker.backfill import Cursor, _lock_key, backfill_task, count_todo, next_chunk, run_chunk, run_inline, start
from worker.pipeline import Enricher
from worker.store import listings_to_enrich, record_correction, upsert_listings

REDIS = "redis://127.0.0.1:6379/0"
V1, V2, V3 = "bf-v1", "bf-v2", "bf-v3"


# ---------------------------------------------------------------------------------------------
# models, catalogue, registry

@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    return {v: save_small_model(tmp_path_factory.mktemp(v), v, seed, colour_threshold=1.0)
            for seed, v in enumerate((V1, V2, V3))}


def _activate(db, models: dict[str, Path], version: str) -> None:
    register_candidate(db, models[version], actor="test", reason="test")
    assert promote(db, version, actor="test", reason="test").promoted


def _enricher(models: dict[str, Path], version: str, settings):
    return Enricher(load_predictor(models[version], device="cpu"), settings)


def _catalogue(db, tmp_path: Path, n: int, image_of=None) -> list[str]:
    """n listings with real PNG files; returns the live ids. bf-00: the seller gave category and colour;
    bf-01: the seller gave the colour; bf-03: deleted; bf-04: its only image is broken (fails)."""
    events = []
    for i in range(n):
        lid = f"bf-{i:02d}"
        path = tmp_path / f"{lid}.png"
        path.write_bytes(b"not an image" if i == 4 else png_bytes((20 * i % 256, 120, 250 - 15 * i % 256)))
        image = image_of(lid) if image_of and image_of(lid) else str(path)
        kw: dict[str, Any] = {}
        if i == 0:
            kw = {"category": "Bag", "attributes": {"colour": "red"}}
        elif i == 1:
            kw = {"attributes": {"colour": "blue"}}
        events.append(ListingEvent(listing_id=lid, seller_id="s", images=[image], **kw))
    with db.transaction():
        upsert_listings(db, events)
        if n > 3:
            upsert_listings(db, [events[3].model_copy(update={"deleted": True})])
    return [e.listing_id for e in events if e.listing_id != "bf-03"]


def _correct_category(db, lid: str) -> None:
    record_correction(db, CorrectionEvent(event_id=f"corr-{lid}", listing_id=lid, group="category",
                                          new_value="Coat", corrected_by="reviewer",
                                          corrected_at=datetime.now(UTC)))


def _kept_tags(db) -> set[tuple]:
    """Seller and corrected tags, whole rows but the time."""
    return set(db.execute("SELECT listing_id, tag_group, value, source, confidence, model_version FROM listing_tags"
                          " WHERE source <> 'predicted'").fetchall())


def _per_version(db, table: str, where: str = "true") -> dict[str, tuple[int, int]]:
    """model_version → (rows, distinct listings)."""
    rows = db.execute(f"SELECT model_version, count(*), count(DISTINCT listing_id) FROM {table} WHERE {where}"
                      " GROUP BY model_version").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def _enriched(db, version: str) -> set[str]:
    return {r[0] for r in db.execute("SELECT listing_id FROM embeddings WHERE model_version = %s", (version,))}


def _status(db) -> str | None:
    row = db.execute("SELECT status FROM backfills").fetchone()
    return row[0] if row else None


def _drop_queues(url: str, *queues: str) -> None:
    with Connection(url) as conn:
        channel = conn.default_channel
        for q in queues:
            try:
                channel.queue_delete(q)
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------
# a real worker in this process that follows the registry

@pytest.fixture()
def worker_env(use_celery, monkeypatch, pg_url, tmp_path):
    """Settings of a worker with no ENRICH_MODEL_DIR (it serves the registry's active model), on queues of its
    own; the environment too, because the tests run `enrich backfill` here as well."""
    tag = uuid.uuid4().hex[:8]
    queues = {"gpu": f"gpu-bf-{tag}", "backfill": f"backfill-bf-{tag}", "cpu": f"cpu-bf-{tag}"}
    env = {"ENRICH_DATABASE_URL": pg_url, "ENRICH_DATA_DIR": str(tmp_path / "data"), "ENRICH_MODEL_CHECK_S": "0.2",
           "ENRICH_ALLOW_LOCAL_PATHS": "true", "ENRICH_CELERY_BROKER_URL": REDIS, "ENRICH_GPU_QUEUE": queues["gpu"],
           "ENRICH_DEVICE": "cpu", "ENRICH_BATCH_SIZE": "4", "ENRICH_TASK_LISTINGS": "3",
           "ENRICH_BACKFILL_PAUSE_S": "0.2", "ENRICH_TORCH_THREADS": "1", "COLUMNS": "200"}
    env.update({"ENRICH_BACKFILL_QUEUE": queues["backfill"], "ENRICH_CPU_QUEUE": queues["cpu"]})
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    runtime.reset()
    backfill.reset()
    settings = use_celery(Settings())
    yield settings, queues
    runtime.reset()
    backfill.reset()
    _drop_queues(REDIS, *queues.values())


@contextmanager
def _worker(queues: list[str]):
    with start_worker(app, pool="solo", perform_ping_check=False, queues=queues, shutdown_timeout=30):
        yield


def _metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------------------------------
# tests

def test_backfill_re_embeds_every_listing_and_rewrites_only_predicted_tags(worker_env, db, models, tmp_path):
    """After a promotion `enrich backfill --wait` runs the chain on a worker that still served the old model:
    every live listing gets the new version's embedding, predicted tags and open review items move to it,
    seller and corrected tags stay as they were, then the reindex switches the shelves to the new model."""
    settings, queues = worker_env
    _activate(db, models, V1)
    live = _catalogue(db, tmp_path, 10)
    _enricher(models, V1, settings).run(db, live)
    _correct_category(db, "bf-02")
    kept = _kept_tags(db)
    assert {("bf-00", "category", "Bag", "seller", None, None), ("bf-01", "colour", "blue", "seller", None, None),
            ("bf-02", "category", "Coat", "corrected", None, None)} <= kept
    open_v1 = _per_version(db, "review_queue", "resolved_at IS NULL")
    assert open_v1 == {V1: (6, 6)}  # colour of every enriched listing the seller left it out of

    with _worker(list(queues.values())):
        (tmp_path / "live.png").write_bytes(png_bytes())
        with db.transaction():
            upsert_listings(db, [ListingEvent(listing_id="live-0", seller_id="s", images=[str(tmp_path / "live.png")])])
        send_enrich(["live-0"], settings)  # the worker loads and serves v1
        wait_until(lambda: _enriched(db, V1) >= {"live-0"})
        _activate(db, models, V2)
        res = CliRunner().invoke(cli, ["backfill", "--wait", "--interval", "0.2", "--timeout", "120"])
        assert res.exit_code == 0, res.output
        assert f"backfill of {V2} enqueued" in res.output and f"backfill of {V2} done: 10/10 listings" in res.output
        wait_until(lambda: shelf_model_version(db) == V2)  # the reindex it enqueued ran and switched

    live_now = live + ["live-0"]
    assert _enriched(db, V2) == set(live_now) - {"bf-04"}  # not the deleted one, not the failed one
    assert _per_version(db, "embeddings")[V2] == (9, 9)
    assert _per_version(db, "embeddings")[V1] == (9, 9)  # kept for a rollback
    assert _kept_tags(db) == kept  # seller and corrected tags untouched
    predicted = _per_version(db, "listing_tags", "source = 'predicted'")
    assert set(predicted) == {V2} and predicted[V2][1] == 8  # all but bf-00 (seller) and bf-04 (failed)
    assert db.execute("SELECT value FROM listing_tags WHERE listing_id = 'bf-02' AND tag_group = 'type'"
                      ).fetchone()[0] in ("top", "bottom", "full-body", "footwear", "accessory")
    assert _per_version(db, "review_queue", "resolved_at IS NULL") == {V2: (7, 7)}  # re-scored (and live-0's)
    row = db.execute("SELECT status, total, done, finished_at IS NOT NULL FROM backfills WHERE model_version = %s",
                     (V2,)).fetchone()
    assert row == ("done", 10, 10, True)  # 10 live listings, bf-04 counted as done (failed on this content)
    assert _metric("enrich_backfill_remaining", model_version=V2) == 0
    assert db.execute("SELECT count(*) FROM similar_items_online WHERE model_version = %s", (V2,)).fetchone()[0] == 0

    res = CliRunner().invoke(cli, ["backfill", "--status"])
    assert res.exit_code == 0 and V2 in res.output and "done" in res.output


def test_backfill_steps_aside_while_live_enrichment_is_queued(worker_env, db, models, tmp_path):
    settings, queues = worker_env
    _activate(db, models, V1)
    live = _catalogue(db, tmp_path, 6)
    _enricher(models, V1, settings).run(db, live)
    _activate(db, models, V2)
    send_enrich(["bf-05"], settings)  # a live task waits on the GPU queue, which this worker does not read
    before = _metric("enrich_backfill_pauses_total", reason="live_traffic")
    with _worker([queues["backfill"]]):
        app.send_task("enrich.backfill", args=[V2], kwargs={"reindex_queue": queues["cpu"]}, queue=queues["backfill"])
        wait_until(lambda: _metric("enrich_backfill_pauses_total", reason="live_traffic") >= before + 3)
        assert _enriched(db, V2) == set()
        assert db.execute("SELECT status, done FROM backfills").fetchall() == [("running", 1)]  # bf-04 failed
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queues["gpu"])  # live traffic drained
        wait_until(lambda: _status(db) == "done")
    assert _enriched(db, V2) == set(live) - {"bf-04"}


def test_a_duplicated_chain_writes_each_listing_once_and_reindexes_once(worker_env, db, models, tmp_path):
    """Two messages of one backfill (a worker killed between sending the successor and acking): both chains
    take "the next listings still to do", one marks the row done, the reindex is sent once."""
    settings, queues = worker_env
    _activate(db, models, V1)
    live = _catalogue(db, tmp_path, 12)
    _enricher(models, V1, settings).run(db, live)
    _activate(db, models, V2)
    chunks = _metric("enrich_backfill_listings_total", outcome="enriched")
    with _worker(list(queues.values())):
        for _ in range(2):
            app.send_task("enrich.backfill", args=[V2], queue=queues["backfill"])
        wait_until(lambda: _status(db) == "done")
        wait_until(lambda: db.execute("SELECT count(*) FROM similar_items_active WHERE model_version = %s",
                                      (V2,)).fetchone()[0] == 1)
    assert _per_version(db, "embeddings")[V2] == (10, 10)
    assert _metric("enrich_backfill_listings_total", outcome="enriched") - chunks == 10  # none twice
    assert db.execute("SELECT count(*) FROM similar_items_versions WHERE model_version = %s", (V2,)).fetchone()[0] == 1


def test_a_copy_that_finds_the_chunk_lock_taken_steps_aside(db, pg_url, models, tmp_path):
    settings = make_settings(tmp_path, task_listings=4)
    _activate(db, models, V1)
    _catalogue(db, tmp_path, 6)
    _activate(db, models, V2)
    start(db, V2)
    e2 = _enricher(models, V2, settings)
    with psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (_lock_key(other, V2),))  # another worker mid-chunk
        assert run_chunk(db, e2, V2, Cursor(), 4).kind == "busy"
        assert _enriched(db, V2) == set()
        # released here: a closed connection's backend lets go of its locks only a little later
        other.execute("SELECT pg_advisory_unlock(%s)", (_lock_key(other, V2),))
    step = run_chunk(db, e2, V2, Cursor(), 4)
    assert (step.kind, step.cursor.after, step.enriched, step.failed) == ("chunk", "bf-04", 3, 1)  # never enriched


def test_backfill_of_a_model_that_is_no_longer_active_is_cancelled(worker_env, db, models, tmp_path):
    _activate(db, models, V1)
    _catalogue(db, tmp_path, 3)
    _activate(db, models, V2)
    start(db, V2)
    _activate(db, models, V3)
    assert backfill_task.apply(args=[V2], kwargs={"cursor": {"after": None, "pass_no": 1, "progress": 0}}
                               ).get() == {"status": "cancelled"}
    assert db.execute("SELECT status, finished_at IS NOT NULL FROM backfills").fetchall() == [("cancelled", True)]
    assert _enriched(db, V2) == set()


def test_the_backfill_rule_is_the_one_listings_to_enrich_applies(db, tmp_path):
    """next_chunk/count_todo select exactly what `listings_to_enrich` would still work on: live listings whose
    current enrichment is not the version's (nor a failure on this very content)."""
    ids = _catalogue(db, tmp_path, 8)
    db.execute("UPDATE listings SET status = 'enriched', enriched_hash = content_hash WHERE listing_id IN"
               " ('bf-00', 'bf-01', 'bf-02', 'bf-05')")
    db.execute("UPDATE listings SET status = 'failed', enriched_hash = content_hash WHERE listing_id = 'bf-04'")
    db.execute("UPDATE listings SET status = 'failed', enriched_hash = 'older' WHERE listing_id = 'bf-06'")
    for lid, version in (("bf-00", "x"), ("bf-01", "y"), ("bf-04", "y"), ("bf-05", "x"), ("bf-07", "x")):
        db.execute("UPDATE listings SET enriched_by = %s WHERE listing_id = %s", (version, lid))
    # an embedding of the version no longer counts (one kept from before a rollback, or of older content)
    db.execute("INSERT INTO embeddings (listing_id, model_version, dim, vector) VALUES ('bf-01', 'x', 4, %s)",
               (np.ones(4, "<f4").tobytes(),))
    expected = [i.listing_id for i in listings_to_enrich(db, ids + ["bf-03"], "x")]
    assert expected == ["bf-01", "bf-02", "bf-06", "bf-07"]  # bf-07: pending (an edit) though x enriched it
    assert next_chunk(db, "x", None, 100) == expected and count_todo(db, "x") == 4
    assert next_chunk(db, "x", "bf-02", 1) == ["bf-06"]


def test_shelves_serve_the_old_model_until_the_new_models_reindex_and_rollback_switches_back(db, models, tmp_path):
    settings = make_settings(tmp_path, task_listings=3, index_dir=tmp_path / "index")
    _activate(db, models, V1)
    live = _catalogue(db, tmp_path, 12)
    _enricher(models, V1, settings).run(db, live)
    assert nightly.recompute(db, settings=settings, k=3).model_version == V1  # the first model: no backfill row
    shelf_v1 = _shelf(db, V1)

    def shelves() -> dict[str, list[tuple[str, float]]]:  # what readers get, for every listing
        return {lid: [(n.listing_id, round(n.score, 5)) for n in read_neighbours(db, lid)[0]]
                for lid in live if lid != "bf-04"}

    assert shelves() == shelf_v1
    _activate(db, models, V2)
    assert shelf_model_version(db) == V1 and shelves() == shelf_v1
    e2 = _enricher(models, V2, settings)
    start(db, V2)
    run_chunk(db, e2, V2, Cursor(), settings.task_listings)  # a third of the catalogue re-embedded
    assert 0 < len(_enriched(db, V2)) < 10
    # the nightly run refreshes the serving model's shelves while the backfill is not done
    assert nightly.recompute(db, settings=settings, k=3).model_version == V1
    assert shelves() == shelf_v1
    assert run_inline(db, e2, settings).status == "done"
    assert shelf_model_version(db) == V1 and shelves() == shelf_v1  # done, but not reindexed yet
    assert nightly.recompute(db, settings=settings, k=3).model_version == V2
    shelf_v2 = _shelf(db, V2)
    assert shelf_model_version(db) == V2 and shelves() == shelf_v2 != shelf_v1

    rollback(db, V1, actor="test", reason="v2 shelves look wrong")
    assert shelf_model_version(db) == V1 and shelves() == shelf_v1  # at once: v1's shelves were kept
    assert nightly.recompute(db, settings=settings, k=3).model_version == V1  # it serves: refresh it


def test_versions_beyond_the_kept_ones_lose_embeddings_and_shelves_never_the_active_or_serving(db, models,
                                                                                               tmp_path):
    settings = make_settings(tmp_path, task_listings=50, index_dir=tmp_path / "index", keep_model_versions=2)
    _activate(db, models, V1)
    live = _catalogue(db, tmp_path, 6)
    _enricher(models, V1, settings).run(db, live)
    nightly.recompute(db, settings=settings, k=3)
    _activate(db, models, V2)
    assert nightly.prune_models(db, settings=settings) == []  # v1 serves until v2's reindex, and is kept anyway
    run_inline(db, _enricher(models, V2, settings), settings)
    assert nightly.recompute(db, settings=settings, k=3).model_version == V2
    _activate(db, models, V3)
    assert nightly.prune_models(db, settings=settings) == [V1]  # the last two were v3 and v2; v2 serves
    run_inline(db, _enricher(models, V3, settings), settings)
    assert nightly.recompute(db, settings=settings, k=3).model_version == V3
    assert nightly.prune_models(db, settings=settings) == []
    assert set(_per_version(db, "embeddings")) == {V2, V3}
    assert {r[0] for r in db.execute("SELECT model_version FROM similar_items_versions")} == {V2, V3}
    assert latest_snapshot_dir(settings.index_dir, V1) is None and latest_snapshot_dir(settings.index_dir, V2)

    rollback(db, V2, actor="test", reason="back")
    assert shelf_model_version(db) == V2  # its shelves were kept
    assert nightly.prune_models(db, settings=settings) == []  # v2 active, v3 the last before it
    rollback(db, V1, actor="test", reason="further back")
    # v1 is active again with neither embeddings nor shelves (its backfill and reindex redo them); v2 was
    # rolled back from, so its shelves do not serve meanwhile
    assert shelf_model_version(db) is None
    assert sorted(nightly.prune_models(db, settings=settings, keep=1)) == [V2, V3]


def _shelf(db, version: str) -> dict[str, list[tuple[str, float]]]:
    """The nightly rows of a model's active similar-items version: listing → [(neighbour, score)]."""
    rows = db.execute("SELECT s.listing_id, s.neighbour_ids, s.scores FROM similar_items s JOIN similar_items_active a"
                      " USING (version) WHERE a.model_version = %s", (version,)).fetchall()
    return {lid: [(n, round(sc, 5)) for n, sc in zip(ids, scores, strict=True)] for lid, ids, scores in rows}


# ---------------------------------------------------------------------------------------------
# kill -9 of a worker process in the middle of the backfill

_GateHandler = gate_handler()


def test_kill_9_mid_backfill_a_second_worker_finishes_it_writing_each_row_once(db, pg_url, models, tmp_path,
                                                                              use_celery):
    server, base = serve_gated(_GateHandler)
    gated = f"{base}/slow.png"
    tag = uuid.uuid4().hex[:6]
    gpu_q, bf_q, cpu_q = f"gpu-bfk-{tag}", f"backfill-bfk-{tag}", f"cpu-bfk-{tag}"
    settings = make_settings(tmp_path, task_listings=4, celery_broker_url=AMQP, gpu_queue=gpu_q)

    _activate(db, models, V1)
    live = _catalogue(db, tmp_path, 24, image_of=lambda lid: gated if lid == "bf-13" else None)
    _enricher(models, V1, settings).run(db, live)
    _correct_category(db, "bf-20")
    kept = _kept_tags(db)
    tags_before = db.execute("SELECT count(*) FROM listing_tags").fetchone()[0]
    _activate(db, models, V2)
    _GateHandler.hold.set()

    env = worker_process_env(pg_url, gpu_q, data_dir=tmp_path / "data", task_listings=4, batch_size=4,
                             torch_threads=1, backfill_pause_s=0.2)
    env.pop("ENRICH_MODEL_DIR", None)
    log = tmp_path / "worker.log"
    first = start_worker_process(env, log, "--queues", f"{gpu_q},{bf_q}")
    second = None
    try:
        use_celery(Settings(celery_broker_url=AMQP, gpu_queue=gpu_q))

        app.send_task("enrich.backfill", args=[V2], kwargs={"reindex_queue": cpu_q}, queue=bf_q)
        assert _GateHandler.arrived.wait(120), log.read_text()[-3000:]
        os.kill(first.pid, signal.SIGKILL)  # chunk bf-10…bf-13 in flight: images being fetched, nothing written
        first.wait(10)
        done_before = _enriched(db, V2)
        assert done_before == {f"bf-{i:02d}" for i in range(10)} - {"bf-03", "bf-04"}  # two chunks committed
        _GateHandler.gate.set()
        second = start_worker_process(env, log, "--queues", f"{gpu_q},{bf_q}")
        wait_until(lambda: _status(db) == "done", timeout=120)
    finally:
        stop_all((first, second), server)
        _drop_queues(AMQP, gpu_q, bf_q, cpu_q)

    assert _per_version(db, "embeddings") == {V1: (22, 22), V2: (22, 22)}  # one row per live listing and version
    assert db.execute("SELECT count(*) FROM listing_tags").fetchone()[0] == tags_before
    assert db.execute("SELECT count(*) FROM (SELECT 1 FROM listing_tags GROUP BY listing_id, tag_group"
                      " HAVING count(*) > 1) d").fetchone()[0] == 0
    assert set(_per_version(db, "listing_tags", "source = 'predicted'")) == {V2}
    assert _kept_tags(db) == kept
    assert _per_version(db, "review_queue", "resolved_at IS NULL") == {V2: (20, 20)}
    assert db.execute("SELECT total, done FROM backfills").fetchone() == (23, 23)
