"""Atomic writes: a reader sees the old content or the new, never a half-written directory or file."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from core.files import replaced_dir, replaced_file, write_bytes_atomic, write_text_atomic


def test_replaced_dir_appears_whole_on_success(tmp_path):
    final = tmp_path / "snap"
    with replaced_dir(final) as tmp:
        (tmp / "a").write_text("1")
        assert not final.exists()  # nothing visible until the block ends
    assert (final / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]


def test_replaced_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "snap"
    with pytest.raises(RuntimeError), replaced_dir(final) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_write_text_atomic_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "LATEST"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["LATEST"]


def test_write_bytes_atomic_leaves_the_old_file_and_no_temp_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "thumb.jpg"
    write_bytes_atomic(path, b"old")

    def full_disk(self, data):
        Path.write_text(self, "half")  # part of the file reaches the disk first
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError):
        write_bytes_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["thumb.jpg"]


def test_replaced_file_is_created_in_a_missing_directory(tmp_path):
    path = tmp_path / "explanations" / "a.png"
    with replaced_file(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".png"  # same directory: the rename is atomic
        tmp.write_bytes(b"png")
    assert path.read_bytes() == b"png"


def test_an_atomic_write_gets_the_usual_permissions_not_a_private_temp_files(tmp_path):
    path = tmp_path / "LATEST"
    old = os.umask(0o022)
    try:
        write_text_atomic(path, "v1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by the other containers on a shared volume
