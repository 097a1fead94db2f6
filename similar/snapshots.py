"""Snapshots of similar-items indexes: saved to a local directory, loaded, pruned, and shared through S3.

A snapshot is a directory `<root>/<model_version>/<name>/` holding `index.faiss`, `ids.npy` (listing ids
in index order, fixed-width bytes) and `manifest.json`; `<root>/<model_version>/LATEST` names the newest
one and is replaced atomically, so a reader never loads a half-written snapshot. One index per model
version: vectors of different models live in different spaces and are never mixed (the manifest records
the model version and loading checks it).

With ENRICH_INDEX_URI set (s3://bucket/prefix) the nightly job also publishes each snapshot
(`SnapshotStore`): `<prefix>/<model_version>/<name>/{index.faiss, ids.npy, manifest.json}`, then
`<prefix>/<model_version>/LATEST` holding the name. LATEST is written last, so a reader that follows it
never finds half a snapshot. Each worker downloads the snapshot LATEST names into its own index directory
(same layout as a local one) and memory-maps it from there. Without the setting, snapshots stay where the
nightly job wrote them: fine on one machine or a volume every worker mounts; on separate machines the
workers would never see one.
"""
from __future__ import annotations

import fcntl
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

from core.config import Settings
from core.files import replaced_dir, write_text_atomic
from core.s3 import make_s3_client
from similar.index import IndexSpec, apply_search_params

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

FILES = ("index.faiss", "ids.npy", "manifest.json")  # manifest last: it marks a local copy complete


# ---------------------------------------------------------------------------------------------
# local snapshots

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(model_version: str) -> str:
    """A directory name for a model version (no separators, no '..')."""
    name = _SAFE.sub("_", model_version)
    if name in ("", ".", ".."):
        raise ValueError(f"unusable model version {model_version!r}")
    return name


@dataclass
class SnapshotManifest:
    model_version: str
    count: int
    dim: int
    spec: dict[str, Any]  # an IndexSpec
    built_at: str
    # When the embeddings were read: the online path searches those created after it (minus a
    # slack for transactions still open then) exactly, on top of this index.
    read_at: str | None
    similar_version: int | None = None
    read_snapshot: str | None = None  # the pg_snapshot of that read: the online delta is what it did not see
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class Snapshot:
    index: faiss.Index
    ids: np.ndarray          # fixed-width bytes, index order
    manifest: SnapshotManifest
    path: Path | None = None


def save_snapshot(root: Path, index: faiss.Index, ids: np.ndarray, manifest: SnapshotManifest) -> Path:
    """Write a snapshot into a temporary directory, rename it in place, then repoint LATEST."""
    import faiss  # lazy: the CLI starts without faiss

    base = Path(root) / safe_name(manifest.model_version)
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"{stamp}-v{manifest.similar_version}" if manifest.similar_version is not None else stamp
    final = base / name
    with replaced_dir(final) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        np.save(tmp / "ids.npy", np.asarray(ids), allow_pickle=False)
        (tmp / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2))
    point_latest(root, manifest.model_version, name)
    log.info("saved snapshot %s (%d vectors)", final, manifest.count)
    return final


def point_latest(root: Path, model_version: str, name: str) -> None:
    """Atomically make `<root>/<model_version>/<name>` the snapshot LATEST names."""
    write_text_atomic(Path(root) / safe_name(model_version) / "LATEST", name)


def latest_snapshot_dir(root: Path, model_version: str) -> Path | None:
    """The snapshot directory LATEST names; None when there is none (or it is incomplete)."""
    pointer = Path(root) / safe_name(model_version) / "LATEST"
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    path = pointer.parent / name
    return path if (path / "manifest.json").exists() else None


def load_snapshot(path: Path, model_version: str | None = None, mmap: bool = False) -> Snapshot:
    """Load a snapshot, refusing one of another model than `model_version` (when given).
    `mmap`: the vectors stay in the page cache, shared by worker processes, not in each one's memory."""
    import faiss  # lazy: the CLI starts without faiss

    path = Path(path)
    manifest = SnapshotManifest(**json.loads((path / "manifest.json").read_text()))
    if model_version is not None and manifest.model_version != model_version:
        # never answer queries of one model with vectors of another
        raise ValueError(f"snapshot {path} is for model {manifest.model_version!r}, not {model_version!r}")
    flags = 0
    if mmap:
        ivf = "IVF" in manifest.spec.get("factory", "")
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if ivf else faiss.IO_FLAG_MMAP_IFC
    index = faiss.read_index(str(path / "index.faiss"), flags)
    apply_search_params(index, IndexSpec(**manifest.spec))
    ids = np.load(path / "ids.npy", allow_pickle=False)
    if index.ntotal != len(ids) or index.ntotal != manifest.count:
        raise ValueError(f"snapshot {path} is inconsistent: {index.ntotal} vectors, {len(ids)} ids")
    return Snapshot(index=index, ids=ids, manifest=manifest, path=path)


def prune_snapshots(root: Path, model_version: str, keep: int = 2) -> list[Path]:
    """Remove all but the newest `keep` snapshots of a model version (never the one LATEST names)."""
    base = Path(root) / safe_name(model_version)
    if not base.exists():
        return []
    latest = latest_snapshot_dir(root, model_version)
    dirs = sorted((p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
    removed = []
    for p in dirs[keep:]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# published snapshots


class PublishError(RuntimeError):
    """A snapshot could not be published (no such bucket, no access, S3 down)."""


class SnapshotStore:
    """Snapshots published under an s3:// URI (see the module docstring)."""

    def __init__(self, uri: str, client: Any) -> None:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"index URI must look like s3://bucket/prefix, got {uri!r}")
        self.uri, self.bucket, self.prefix = uri, parts.netloc, parts.path.strip("/")
        self.client = client

    def _key(self, model_version: str, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, safe_name(model_version), *parts) if p)

    def publish(self, path: Path, model_version: str) -> str:
        """Upload a local snapshot directory, then point LATEST at it. Returns its name."""
        path = Path(path)
        try:
            for f in FILES:
                self.client.upload_file(str(path / f), self.bucket, self._key(model_version, path.name, f))
            self.client.put_object(Bucket=self.bucket, Key=self._key(model_version, "LATEST"),
                                   Body=path.name.encode())
        except (S3UploadFailedError, BotoCoreError, ClientError) as exc:
            raise PublishError(f"could not publish snapshot {path.name} to {self.uri} "
                               f"(ENRICH_INDEX_URI): {exc}") from exc
        log.info("published snapshot %s of %s to %s", path.name, model_version, self.uri)
        return path.name

    def latest_name(self, model_version: str) -> str | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(model_version, "LATEST"))
        except self.client.exceptions.NoSuchKey:
            return None
        return obj["Body"].read().decode().strip() or None

    def fetch(self, root: Path, model_version: str, name: str) -> Path:
        """The named snapshot in the local `root` (downloaded unless already there)."""
        if name != Path(name).name or name.startswith("."):
            raise ValueError(f"bad snapshot name {name!r}")
        base = Path(root) / safe_name(model_version)
        final = base / name
        if (final / "manifest.json").exists():
            return final
        base.mkdir(parents=True, exist_ok=True)
        with open(base / ".download.lock", "w") as lock:
            # one download per machine: the other worker processes (prefork) wait here, then find it
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (final / "manifest.json").exists():
                return final
            t0 = time.perf_counter()
            with replaced_dir(final) as tmp:  # readers never see a half-downloaded snapshot
                for f in FILES:
                    self.client.download_file(self.bucket, self._key(model_version, name, f), str(tmp / f))
        mib = sum(f.stat().st_size for f in final.iterdir()) / 2**20
        log.info("downloaded snapshot %s of %s from %s (%.0f MiB in %.1fs)", name, model_version, self.uri, mib,
                 time.perf_counter() - t0)
        return final

    def pull_latest(self, root: Path, model_version: str, keep: int = 2) -> Path | None:
        """Make the published LATEST the local LATEST too; drop older local copies beyond `keep`."""
        name = self.latest_name(model_version)
        if name is None:
            return None
        local = latest_snapshot_dir(root, model_version)
        if local is not None and local.name == name:
            return local
        path = self.fetch(root, model_version, name)
        point_latest(root, model_version, name)
        prune_snapshots(root, model_version, keep)
        return path

    def prune(self, model_version: str, keep: int = 2) -> list[str]:
        """Delete all but the newest `keep` published snapshots (never the one LATEST names)."""
        latest = self.latest_name(model_version)
        base = self._key(model_version) + "/"
        keys: dict[str, list[str]] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                name, _, rest = obj["Key"][len(base):].partition("/")
                if rest:
                    keys.setdefault(name, []).append(obj["Key"])
        old = [n for n in sorted(keys, reverse=True)[keep:] if n != latest]
        for n in old:
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[n]]})
        return old


def store_from_settings(settings: Settings) -> SnapshotStore | None:
    """The configured store (ENRICH_INDEX_URI), or None for local snapshots only."""
    if not settings.index_uri:
        return None
    return SnapshotStore(settings.index_uri, make_s3_client(settings))
