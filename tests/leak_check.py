"""Recognisable fake credentials and a search for them in everything a run wrote."""

from __future__ import annotations

import os

# moto accepts any credentials: these are what a user would have in their config.
FAKE = {
    "access_key_id": "AKIAFAKEKEY7QX2LEAKCHECK",
    "secret_access_key": "fakeSecret/9f8e7d6c5b4aLeakCheck",
    "session_token": "FakeSessionToken0a1b2c3dLeakCheck",
}


def leaked(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """(file, secret) for each FAKE secret found in a file."""
    return [(name, secret) for name, data in files.items() for secret in FAKE.values() if secret.encode() in data]


def every_output(s3_server, bucket: str | None, *folders) -> dict[str, bytes]:
    """Every object in `bucket` (None: no bucket) and every file under `folders`, by name."""
    import boto3

    files = {}
    if bucket is not None:
        client = boto3.client("s3", endpoint_url=s3_server)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                files[f"s3://{bucket}/{obj['Key']}"] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        files[path] = f.read()
    return files
