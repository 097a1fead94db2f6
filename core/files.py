"""Writes that readers never see half done: fill a temporary sibling, then rename it into place."""
from __future__ import annotations

import os
import shutil
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


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small file (a pointer, a manifest) so a reader sees the old or the new content, never part."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
