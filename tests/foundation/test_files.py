"""Atomic writes: a reader sees the old content or the new, never a half-written directory or file."""
from __future__ import annotations

import pytest

from core.files import replaced_dir, write_text_atomic


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
