"""No silent embedded database: without ENRICH_DATABASE_URL every command says on stderr that it uses the
embedded Postgres, and the commands that serve or change production state refuse it unless --embedded."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

NOTICE = "enrich: using the embedded Postgres in"


def _enrich(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """The real CLI, with no database configured and the data directory under the test's tmp dir."""
    env = {"ENRICH_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "enrich.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args", [
    ["consume"],
    ["worker"],
    ["promote", "m-x"],
    ["rollback", "--reason", "shelves look off"],
    ["retrain", "--reason", "new corrections"],
], ids=lambda args: args[0])
def test_production_commands_refuse_the_embedded_database(tmp_path, args):
    data = tmp_path / "data"
    res = _enrich(data, *args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "ENRICH_DATABASE_URL is not set" in lines[0] and "--embedded" in lines[0]
    assert str((data / "pg").resolve()) in lines[0]
    assert NOTICE not in res.stderr
    assert not (data / "pg").exists()


@pytest.mark.integration  # embedded Postgres: a real server process per command
def test_embedded_database_is_announced_once_and_allowed_when_asked(tmp_path):
    data = tmp_path / "data"
    pgdata = (data / "pg").resolve()
    migrated = _enrich(data, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stderr.count(NOTICE) == 1 and f"{NOTICE} {pgdata} (" in migrated.stderr
    assert "ENRICH_DATABASE_URL" in migrated.stderr and "--database-url" in migrated.stderr

    # past the check: the registry itself answers (empty, nothing to roll back to)
    rolled = _enrich(data, "rollback", "--embedded", "--reason", "demo", "--no-backfill")
    assert rolled.returncode == 2, rolled.stderr
    assert rolled.stderr.count(NOTICE) == 1
    assert "nothing to roll back to" in rolled.stderr and "--embedded to use" not in rolled.stderr


@pytest.mark.integration
def test_the_notice_is_printed_once_per_process(tmp_path):
    code = ("from core.config import Settings\n"
            "from core.db import connect, database_url\n"
            "for _ in range(3):\n"
            "    connect(database_url(Settings())).close()\n")
    env = {"ENRICH_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count(NOTICE) == 1, res.stderr
