"""Writes that readers never see half done: fill a temporary sibling, then rename it into place."""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it becomes `final` in one rename.

    On any error the temporary directory is removed and `final` is left as it was.
    """
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def replaced_file(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `final` (same directory, so the rename is atomic) for the caller to
    write; on success it becomes `final`, on any error it is removed and `final` is left as it was. The caller
    creates the file, so it gets the usual permissions (umask), not a private temp file's."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.stem}-{uuid.uuid4().hex}{final.suffix}"
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace a file so a reader sees the old or the new content, never part."""
    with replaced_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small text file (a pointer, a manifest) so a reader sees the old or the new content, never part."""
    with replaced_file(path) as tmp:
        tmp.write_text(text)
