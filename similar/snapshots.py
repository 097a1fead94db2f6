"""Similar-items snapshots shared through S3, so workers on other machines search the nightly index.

The nightly job writes its snapshot locally (similar/index.py) and, with ENRICH_INDEX_URI set
(s3://bucket/prefix), publishes it: `<prefix>/<model_version>/<name>/{index.faiss, ids.npy,
manifest.json}`, then `<prefix>/<model_version>/LATEST` holding the name. LATEST is written last,
so a reader that follows it never finds half a snapshot. Each worker downloads the snapshot LATEST
names into its own index directory (same layout as a local one) and memory-maps it from there.
Without the setting, snapshots stay where the nightly job wrote them: fine on one machine or a
volume every worker mounts; on separate machines the workers would never see one.
"""
from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

from core.config import Settings
from core.files import replaced_dir
from similar import index as ix

log = logging.getLogger(__name__)

FILES = ("index.faiss", "ids.npy", "manifest.json")  # manifest last: it marks a local copy complete


class PublishError(RuntimeError):
    """A snapshot could not be published (no such bucket, no access, S3 down)."""


class SnapshotStore:
    def __init__(self, uri: str, client) -> None:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"index URI must look like s3://bucket/prefix, got {uri!r}")
        self.uri, self.bucket, self.prefix = uri, parts.netloc, parts.path.strip("/")
        self.client = client

    def _key(self, model_version: str, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, ix.safe_name(model_version), *parts) if p)

    def publish(self, path: Path, model_version: str) -> str:
        """Upload a local snapshot directory, then point LATEST at it. Returns its name."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

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
        base = Path(root) / ix.safe_name(model_version)
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
        local = ix.latest_snapshot_dir(root, model_version)
        if local is not None and local.name == name:
            return local
        path = self.fetch(root, model_version, name)
        ix.point_latest(root, model_version, name)
        ix.prune_snapshots(root, model_version, keep)
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
    from core.s3 import make_s3_client

    if not settings.index_uri:
        return None
    return SnapshotStore(settings.index_uri, make_s3_client(settings))
