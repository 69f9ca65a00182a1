"""Save / restore the NDIF object store (moto S3, in memory) to / from a folder, so results survive a restart.

    python scripts/ndif/s3_snapshot.py save    STATE/s3   # stop.sh, before the store stops
    python scripts/ndif/s3_snapshot.py restore STATE/s3   # start.sh, once the store is up

moto keeps objects in memory only (rustfs, upstream's store, is on disk but not installable here).
Objects are written atomically (temp file + rename); ``save`` mirrors the bucket exactly (objects
gone from the bucket are removed from the folder). Endpoint, bucket and keys come from the
``NDIF_OBJECT_STORE_*`` variables that ``env.sh`` sets.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import boto3
from botocore.client import Config
from botocore.exceptions import ClientError


def _client():
    return boto3.client(
        "s3",
        endpoint_url=os.environ.get("NDIF_OBJECT_STORE_URL", "http://127.0.0.1:9000"),
        aws_access_key_id=os.environ.get("NDIF_OBJECT_STORE_ACCESS_KEY", "testing"),
        aws_secret_access_key=os.environ.get("NDIF_OBJECT_STORE_SECRET_KEY", "testing"),
        region_name=os.environ.get("NDIF_OBJECT_STORE_REGION", "us-east-1"),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def save(folder: Path, bucket: str) -> int:
    """Mirror every object of ``bucket`` into ``folder``; returns the object count."""
    client = _client()
    kept: set[Path] = set()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for page in pages:
            for item in page.get("Contents", []):
                target = folder / item["Key"]
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".part")
                client.download_file(bucket, item["Key"], str(tmp))
                os.replace(tmp, target)
                kept.add(target)
    except ClientError as error:
        if error.response["Error"]["Code"] != "NoSuchBucket":
            raise
    for path in folder.rglob("*"):
        if path.is_file() and path not in kept:
            path.unlink()
    return len(kept)


def restore(folder: Path, bucket: str) -> int:
    """Upload every file under ``folder`` into ``bucket`` (created if missing); returns the count."""
    client = _client()
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as error:
        if error.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    count = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.endswith(".part"):
            client.upload_file(str(path), bucket, path.relative_to(folder).as_posix())
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["save", "restore"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    bucket = os.environ.get("NDIF_OBJECT_STORE_BUCKET", "ndif-results")
    count = (save if args.action == "save" else restore)(args.folder, bucket)
    print(f"[ndif] object store: {args.action}d {count} objects ({args.folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
