"""Settings from the environment, clear one-line errors, and the CLI surface."""
from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from core.config import Settings
from core.db import DatabaseUnavailable, connect, database_url
from enrich.cli import app


def test_settings_read_prefixed_environment(monkeypatch):
    monkeypatch.setenv("ENRICH_KAFKA_BOOTSTRAP", "k1:9092")
    monkeypatch.setenv("ENRICH_ALLOWED_HOSTS", '["img.example.com"]')
    monkeypatch.setenv("ENRICH_MAX_IMAGE_PIXELS", "1000000")
    s = Settings()
    assert s.kafka_bootstrap == "k1:9092"
    assert s.allowed_hosts == ["img.example.com"]
    assert s.max_image_pixels == 1_000_000
    assert not s.allow_local_paths and not s.allow_private_networks  # secure by default


def test_invalid_setting_is_refused(monkeypatch):
    monkeypatch.setenv("ENRICH_BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="batch_size"):
        Settings()


def test_a_malformed_retrain_schedule_is_refused_at_start(monkeypatch):
    monkeypatch.setenv("ENRICH_RETRAIN_CRON", "every sunday")
    with pytest.raises(ValidationError, match="5 fields"):
        Settings()
    monkeypatch.setenv("ENRICH_RETRAIN_CRON", "0 3 * * 0")
    assert Settings().retrain_cron == "0 3 * * 0"


def test_secrets_are_not_printed(monkeypatch):
    monkeypatch.setenv("ENRICH_DATABASE_URL", "postgresql://u:hunter2@127.0.0.1:1/x")
    s = Settings()
    assert "hunter2" not in repr(s)
    assert database_url(s) == "postgresql://u:hunter2@127.0.0.1:1/x"
    with pytest.raises(DatabaseUnavailable) as info:
        connect(database_url(s))
    assert "hunter2" not in str(info.value) and "cannot connect" in str(info.value)


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "migrate" in result.output


def test_migrate_command_on_service_postgres(empty_db_url):
    result = CliRunner().invoke(app, ["migrate", "--database-url", empty_db_url])
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(app, ["migrate", "--database-url", empty_db_url])
    assert "up to date" in again.output


@pytest.mark.integration  # embedded Postgres: a real server process
def test_migrate_on_embedded_default(tmp_path):
    env = {"ENRICH_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "enrich.cli", "migrate"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "0001_initial" in first.stderr
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert "up to date" in second.stderr


def test_wrong_url_gives_one_clear_line(tmp_path):
    env = {"ENRICH_DATABASE_URL": "postgresql://x@127.0.0.1:1/nope", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "enrich.cli", "migrate"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: cannot connect to Postgres")
