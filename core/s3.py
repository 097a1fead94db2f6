"""The S3 client every part uses (images, index snapshots): endpoint, region, timeouts from Settings."""
from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from core.config import Settings

# boto3 builds its clients' methods at run time and ships no type information
S3Client = Any


def make_s3_client(settings: Settings) -> S3Client:
    kwargs: dict[str, str] = {}
    if settings.aws_access_key_id and settings.aws_secret_access_key:
        kwargs = {"aws_access_key_id": settings.aws_access_key_id.get_secret_value(),
                  "aws_secret_access_key": settings.aws_secret_access_key.get_secret_value()}
    cfg = Config(connect_timeout=settings.fetch_timeout_s, read_timeout=settings.fetch_timeout_s,
                 retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
                        config=cfg, **kwargs)
