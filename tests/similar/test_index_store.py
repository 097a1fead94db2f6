"""Snapshots published through a real S3 API (moto_server): workers on other machines follow them."""
from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import boto3
import numpy as np
import pytest
from prometheus_client import REGISTRY
from similar_helpers import add_listings, clustered, exact_neighbours, unit

import similar.nightly
import similar.online
from core.config import Settings
from similar import store as sdb
from similar.snapshots import PublishError, load_snapshot, store_from_settings

IDS = [f"old-{i:03d}" for i in range(200)]


@pytest.fixture()
def settings(s3_endpoint, tmp_path) -> Iterator[Settings]:
    """ENRICH_INDEX_URI on a fresh bucket, checked on every call (sync interval 0); replaces conftest's."""
    bucket = f"index-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    similar.online._SNAPSHOT_CACHE.clear()
    similar.online._LAST_PULL.clear()
    yield Settings(index_uri=f"s3://{bucket}/similar", s3_endpoint_url=s3_endpoint, index_sync_s=0,
                   index_dir=tmp_path / "index")
    _pulled()
    similar.online._SNAPSHOT_CACHE.clear()
    similar.online._LAST_PULL.clear()


@pytest.fixture()
def store(settings):
    return store_from_settings(settings)


def _pulled() -> None:
    """Wait for the background download a worker starts once it has a snapshot to answer from."""
    for t in list(similar.online._PULLING.values()):
        t.join(30)


def _published(store) -> list[str]:
    keys = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + "/m1/").get("Contents", [])
    return sorted({k["Key"].split("/")[2] for k in keys} - {"LATEST"})


def test_a_worker_on_another_machine_follows_the_published_snapshot(db, tmp_path, store, settings):
    nightly, worker = tmp_path / "nightly", tmp_path / "worker"  # two machines' index directories
    vecs = clustered(len(IDS), seed=30, clusters=4)
    add_listings(db, IDS, vecs)
    first = similar.nightly.recompute(db, "m1", k=5, root=nightly, settings=settings)
    assert _published(store) == [Path(first.snapshot).name]

    add_listings(db, ["new"], [unit(vecs[7] + 0.01)])
    assert similar.online.write_online_neighbours(db, ["new"], "m1", k=5, root=worker, settings=settings) == 1
    snap = similar.online.cached_snapshot("m1", worker, settings=settings)
    assert snap.path.parent.parent == worker and snap.manifest.similar_version == first.version
    assert np.array_equal(snap.ids, load_snapshot(first.snapshot).ids)
    neighbours = db.execute("SELECT neighbour_ids FROM similar_items_online WHERE listing_id = 'new'").fetchone()[0]
    assert neighbours[0] == "old-007"

    # three more nights, the worker looking after the 2nd and the 4th: it moves to the newest;
    # S3 and both disks keep the newest two snapshots they have seen
    nights = [similar.nightly.recompute(db, "m1", k=5, root=nightly, settings=settings)]
    # answers from the snapshot it has, downloads the new one beside
    similar.online.cached_snapshot("m1", worker, settings=settings)
    _pulled()
    assert similar.online.cached_snapshot("m1", worker, settings=settings).manifest.similar_version == nights[0].version
    nights += [similar.nightly.recompute(db, "m1", k=5, root=nightly, settings=settings) for _ in range(2)]
    similar.online.cached_snapshot("m1", worker, settings=settings)
    _pulled()
    snap = similar.online.cached_snapshot("m1", worker, settings=settings)
    assert snap.manifest.similar_version == nights[2].version
    built = REGISTRY.get_sample_value("enrich_similar_snapshot_built_timestamp_seconds", {"model_version": "m1"})
    assert built == datetime.fromisoformat(snap.manifest.built_at).timestamp()  # what an age alert reads
    names = sorted(p.name for p in (nightly / "m1").iterdir() if not p.name.startswith(".") and p.is_dir())
    assert _published(store) == names == [Path(n.snapshot).name for n in nights[1:]]
    assert sorted(p.name for p in (worker / "m1").iterdir() if p.is_dir()) == [Path(n.snapshot).name
                                                                              for n in (nights[0], nights[2])]


def test_half_published_snapshot_is_ignored_and_an_outage_keeps_the_local_one(db, tmp_path, store, caplog,
                                                                             settings):
    nightly, worker = tmp_path / "nightly", tmp_path / "worker"
    add_listings(db, IDS, clustered(len(IDS), seed=31))
    first = similar.nightly.recompute(db, "m1", k=5, root=nightly, settings=settings)
    assert similar.online.cached_snapshot("m1", worker, settings=settings).manifest.similar_version == first.version

    # a publisher that died after the files but before LATEST: nobody follows it
    later = nightly / "m1" / "29991231T000000000000Z-v999"
    shutil.copytree(first.snapshot, later)
    for f in ("index.faiss", "ids.npy", "manifest.json"):
        store.client.upload_file(str(later / f), store.bucket, f"{store.prefix}/m1/{later.name}/{f}")
    similar.online.cached_snapshot("m1", worker, settings=settings)
    _pulled()
    assert similar.online.cached_snapshot("m1", worker, settings=settings).path.name == Path(first.snapshot).name
    _pulled()

    # S3 unreachable: the worker keeps answering from its copy and says why it did not refresh
    outage = settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9"})
    with caplog.at_level(logging.WARNING, logger="similar.online"):
        assert similar.online.cached_snapshot("m1", worker, settings=outage).manifest.similar_version == first.version
        _pulled()
    assert "could not check" in caplog.text
    assert similar.online.cached_snapshot("m1", worker, settings=outage).manifest.similar_version == first.version


def test_shards_on_other_machines_download_the_snapshot_by_name(db, tmp_path, store, settings):
    vecs = clustered(len(IDS), seed=32)
    add_listings(db, IDS, vecs)
    version, bounds = similar.nightly.prepare_shards(db, "m1", 2, k=5, root=tmp_path / "planner", settings=settings)
    shutil.rmtree(tmp_path / "planner")  # the planner's disk is on another machine
    written = [similar.nightly.compute_shard(db, version, lo, hi, root=tmp_path / f"shard{i}", settings=settings)
               for i, (lo, hi) in enumerate(bounds)]
    assert sum(written) == len(IDS) and all((tmp_path / f"shard{i}" / "m1").is_dir() for i in range(2))
    similar.nightly.finish_shards(db, version, root=tmp_path / "planner", settings=settings)
    rows = db.execute("SELECT listing_id, neighbour_ids FROM similar_items WHERE version = %s", (version,)).fetchall()
    assert {lid: list(n) for lid, n in rows} == exact_neighbours(vecs, IDS, 5)


def test_a_failed_publish_fails_the_run_and_keeps_the_active_version(db, tmp_path, store, settings):
    add_listings(db, IDS, clustered(len(IDS), seed=33))
    first = similar.nightly.recompute(db, "m1", k=5, root=tmp_path, settings=settings)
    broken = settings.model_copy(update={"index_uri": f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/similar"})
    with pytest.raises(PublishError, match="no-such-bucket"):
        similar.nightly.recompute(db, "m1", k=5, root=tmp_path, settings=broken)
    assert sdb.active_version(db, "m1") == first.version


def test_worker_processes_on_one_machine_download_a_snapshot_once(db, tmp_path, store, settings):
    add_listings(db, IDS, clustered(len(IDS), seed=34))
    name = Path(similar.nightly.recompute(db, "m1", k=5, root=tmp_path / "nightly", settings=settings).snapshot).name
    calls = []
    real = store.client.download_file

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    store.client.download_file = counted
    with ThreadPoolExecutor(4) as pool:  # separate lock-file opens conflict as separate processes' do
        paths = list(pool.map(lambda _: store.fetch(tmp_path / "worker", "m1", name), range(4)))
    assert len(set(paths)) == 1 and (paths[0] / "manifest.json").exists()
    assert len(calls) == 3  # index, ids, manifest: once
