"""An S3 API server (moto) that holds its objects before its port opens: `python -m harness.s3_server`.

moto keeps everything in memory, so a restarted moto_server is empty, and an image fetched in the moment
between the port opening and a re-upload would be refused as "not found" (a permanent error: the listing
would be marked failed). This launcher loads the objects under --seed (<seed>/<bucket>/<key>) into moto's
in-process backend first and only then listens, so every start serves the same objects.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")

    import boto3
    from moto import mock_aws
    from moto.server import ThreadedMotoServer

    mock = mock_aws()
    mock.start()  # the in-process backend the server below answers from
    s3 = boto3.client("s3", region_name="us-east-1")
    for bucket in sorted(p for p in args.seed.iterdir() if p.is_dir()):
        s3.create_bucket(Bucket=bucket.name)
        for path in sorted(p for p in bucket.rglob("*") if p.is_file()):
            s3.put_object(Bucket=bucket.name, Key=path.relative_to(bucket).as_posix(), Body=path.read_bytes())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop()


if __name__ == "__main__":
    main()
