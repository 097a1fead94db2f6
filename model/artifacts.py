"""Registered models' files, stored once by version and sha256: a directory (the embedded default) or S3.

Layout under the root (`<data dir>/model-store`, or `s3://bucket/prefix` from ENRICH_MODEL_URI):
`<version>/<sha256>/{model.safetensors, manifest.json, report/…}`. The manifest is written last, so a
reader never finds half a model. The registry row keeps the artifact's URI and the weights' sha256;
`fetch` copies an artifact into a local cache (S3) and refuses it when the hash differs.
"""
from __future__ import annotations

import fcntl
import logging
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from core.config import Settings
from core.files import replaced_dir
from core.s3 import S3Client, make_s3_client
from model.manifest import MANIFEST_FILE, ModelMismatchError, file_sha256, read_manifest

log = logging.getLogger(__name__)
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _safe(name: str) -> str:
    return _SAFE.sub("_", name)


def _files(model_dir: Path) -> list[Path]:
    """Every file of a model directory, the manifest last."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    return files + [model_dir / MANIFEST_FILE]


class ArtifactStore:
    """Put a model directory under its version and weights hash; fetch it back, verified."""

    def __init__(self, root: str | Path, cache_dir: Path, s3_client: S3Client | None = None) -> None:
        self.root = str(root)
        self.cache_dir = Path(cache_dir)
        parts = urlsplit(self.root)
        self.s3 = parts.scheme == "s3"
        if self.s3:
            if not parts.netloc:
                raise ValueError(f"model URI must look like s3://bucket/prefix, got {self.root!r}")
            if s3_client is None:
                raise ValueError(f"model URI {self.root!r} needs an S3 client")
            self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
            self.client = s3_client
        else:
            self.root_dir = Path(root)

    def uri_for(self, model_version: str, sha256: str) -> str:
        tail = f"{_safe(model_version)}/{sha256}"
        return f"s3://{self.bucket}/{'/'.join(p for p in (self.prefix, tail) if p)}" if self.s3 \
            else str((self.root_dir / tail).resolve())

    def put(self, model_dir: Path | str) -> tuple[str, str]:
        """Store a model directory (idempotent). Returns (artifact URI, weights sha256)."""
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        sha = file_sha256(model_dir / manifest.weights_file)
        uri = self.uri_for(manifest.model_version, sha)
        if self.s3:
            key = urlsplit(uri).path.lstrip("/")
            for f in _files(model_dir):
                self.client.upload_file(str(f), self.bucket, f"{key}/{f.relative_to(model_dir).as_posix()}")
        else:
            final = Path(uri)
            if not (final / MANIFEST_FILE).is_file():
                final.parent.mkdir(parents=True, exist_ok=True)
                with replaced_dir(final) as tmp:
                    for f in _files(model_dir):
                        (tmp / f.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, tmp / f.relative_to(model_dir))
        log.info("stored model %s (%s) at %s", manifest.model_version, sha[:12], uri)
        return uri, sha

    def fetch(self, uri: str, sha256: str) -> Path:
        """A local directory holding the artifact, its weights checked against `sha256`."""
        if self.s3:
            path = self._download(uri)
        else:
            path = Path(uri)
        manifest = read_manifest(path)
        got = file_sha256(path / manifest.weights_file)
        if got != sha256:
            raise ModelMismatchError(f"model {manifest.model_version} at {uri}: weights sha256 {got[:12]} differs "
                                     f"from the registry's {sha256[:12]} (corrupted or replaced)")
        return path

    def _download(self, uri: str) -> Path:
        key = urlsplit(uri).path.lstrip("/")
        final = self.cache_dir / _safe(key.replace("/", "__"))
        if (final / MANIFEST_FILE).is_file():
            return final
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / ".download.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download per machine; other processes wait, then reuse it
            if (final / MANIFEST_FILE).is_file():
                return final
            with replaced_dir(final) as tmp:
                listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key + "/")
                names = [o["Key"][len(key) + 1:] for o in listing.get("Contents", [])]
                if MANIFEST_FILE not in names:
                    raise FileNotFoundError(f"no model at {uri}")
                for name in sorted(names, key=lambda n: n == MANIFEST_FILE):
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    self.client.download_file(self.bucket, f"{key}/{name}", str(tmp / name))
        log.info("downloaded model artifact %s", uri)
        return final


def store_from_settings(settings: Settings) -> ArtifactStore:
    """ENRICH_MODEL_URI (s3://…) when set, else `<data dir>/model-store`; the S3 cache under the data dir."""
    cache = settings.data_dir / "model-cache"
    if settings.model_uri:
        return ArtifactStore(settings.model_uri, cache, make_s3_client(settings))
    return ArtifactStore(settings.data_dir / "model-store", cache)
