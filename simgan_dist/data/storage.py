"""URIs → pyarrow filesystems, for local folders and S3-compatible object storage.

`resolve("s3://bucket/prefix")` always builds an explicit `pyarrow.fs.S3FileSystem`
(endpoint, scheme, region, keys) from the config or the standard AWS environment
variables: `FileSystem.from_uri` would probe real AWS to find the bucket's region,
which hangs or fails against MinIO, moto or a cluster without internet. The same
filesystem object is what Ray Data gets, so drivers and workers agree.

Every S3 request is tried MAX_ATTEMPTS times with the AWS SDK's backoff
(`AwsStandardS3RetryStrategy`): throttling (503 SlowDown), server errors, dropped and
stalled connections. Ray Data's reads and Ray Train's checkpoint uploads retry those
failures a few times more on top. Every failure that reaches the user is a
`StorageError` naming the URI and saying which of the usual suspects it is: missing
bucket, bad credentials, unreachable endpoint, an endpoint that keeps failing.
"""

from __future__ import annotations

import functools
import os
import re
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

from simgan_dist.config import StorageConfig
from simgan_dist.errors import UserError

# A wrong endpoint must fail in seconds: short connects, few attempts.
CONNECT_TIMEOUT_S = 3.0
MAX_ATTEMPTS = 3
DEFAULT_REGION = "us-east-1"


class StorageError(UserError, RuntimeError):
    """Object storage or a local folder could not be used; the message names the URI."""


class MissingFileError(StorageError):
    """The file (object) does not exist; its folder or bucket may."""


def _setting(value: str, *env_names: str) -> str | None:
    if value:
        return value
    for name in env_names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def effective_config(storage_cfg: StorageConfig | None = None) -> StorageConfig:
    """The config with the AWS_* environment fallbacks filled in (the session token only
    goes with keys that came from the environment too)."""
    cfg = storage_cfg or StorageConfig()
    from_env = not cfg.access_key_id
    return StorageConfig(
        endpoint_url=_setting(cfg.endpoint_url, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") or "",
        region=_setting(cfg.region, "AWS_DEFAULT_REGION", "AWS_REGION") or "",
        access_key_id=_setting(cfg.access_key_id, "AWS_ACCESS_KEY_ID") or "",
        secret_access_key=_setting(cfg.secret_access_key, "AWS_SECRET_ACCESS_KEY") or "",
        session_token=cfg.session_token or (os.environ.get("AWS_SESSION_TOKEN", "") if from_env else ""),
    )


def worker_env(storage_cfg: StorageConfig | None = None) -> dict[str, str]:
    """The storage settings as AWS_* variables, for Ray workers' environment.

    Credentials reach workers this way and never inside a config, which gets written
    (checkpoints, Tune results): workers read the redacted config's empty values from
    their environment. Hand the dict over by reference (`pipeline.share_env` / `adopt_env`,
    or `tune.with_parameters`), never as `runtime_env={"env_vars": ...}`, which Ray logs.
    Workers on other nodes may lack the driver's environment, so settings that came from
    it are passed on too.
    """
    cfg = effective_config(storage_cfg)
    names = {"AWS_ENDPOINT_URL": cfg.endpoint_url, "AWS_DEFAULT_REGION": cfg.region,
             "AWS_ACCESS_KEY_ID": cfg.access_key_id, "AWS_SECRET_ACCESS_KEY": cfg.secret_access_key,
             "AWS_SESSION_TOKEN": cfg.session_token}
    return {name: value for name, value in names.items() if value}


def without_secrets(storage_cfg: StorageConfig | None = None) -> StorageConfig:
    """Endpoint and region only: what goes to Ray workers beside `worker_env`."""
    cfg = effective_config(storage_cfg)
    return StorageConfig(endpoint_url=cfg.endpoint_url, region=cfg.region)


@functools.lru_cache(maxsize=256)
def bucket_region(bucket: str) -> str:
    """The AWS region a bucket lives in (one anonymous HEAD request to AWS, cached per process)."""
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError as exc:
        raise StorageError(f"s3://{bucket}: cannot find the bucket's AWS region ({exc}); set storage.region or "
                           "AWS_DEFAULT_REGION, or storage.endpoint_url for S3-compatible storage") from exc


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem, pickled with its retry strategy.

    pyarrow pickles every other option but not the retry strategy, so the copies that Ray
    Data's read tasks and Ray Train's checkpoint uploads use would retry by pyarrow's
    default policy instead of the one `s3_filesystem` sets.
    """

    def __init__(self, *, retry_strategy: pafs.S3RetryStrategy, **options):
        super().__init__(retry_strategy=retry_strategy, **options)
        self.retry_strategy = retry_strategy

    def __reduce__(self):
        return _rebuild_s3_filesystem, (super().__reduce__()[1][0], self.retry_strategy)


def _rebuild_s3_filesystem(options: dict, retry_strategy: pafs.S3RetryStrategy) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(retry_strategy=retry_strategy, **options)


def s3_filesystem(storage_cfg: StorageConfig | None = None, bucket: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem from `storage.*`, falling back to the AWS_* environment variables.

    The region: the configured one; else, on AWS itself (no endpoint set), the region of
    `bucket`, looked up (a fixed default breaks buckets elsewhere); else us-east-1, which
    S3-compatible servers (MinIO, moto) accept.
    """
    cfg = storage_cfg or StorageConfig()
    endpoint = _setting(cfg.endpoint_url, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    region = _setting(cfg.region, "AWS_DEFAULT_REGION", "AWS_REGION")
    if not region:
        region = bucket_region(bucket) if bucket and not endpoint else DEFAULT_REGION
    kwargs: dict = {
        "region": region,
        "connect_timeout": CONNECT_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    }
    creds = effective_config(cfg)
    if creds.access_key_id and creds.secret_access_key:
        kwargs.update(access_key=creds.access_key_id, secret_key=creds.secret_access_key)
        if creds.session_token:
            kwargs["session_token"] = creds.session_token
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if not parsed.netloc:
            raise StorageError(f"storage endpoint {endpoint!r} is not a URL like http://host:port")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return RetryingS3FileSystem(**kwargs)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def resolve(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """`uri` → (filesystem, path inside it). Local paths and file:// become absolute paths."""
    if is_s3(uri):
        path = uri[len("s3://"):].strip("/")
        if not path:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket, like s3://bucket/prefix")
        return s3_filesystem(storage_cfg, bucket=path.split("/", 1)[0]), path
    scheme = urlparse(uri).scheme
    if scheme == "file":
        uri = urlparse(uri).path
    elif scheme:
        raise StorageError(f"{uri}: unsupported URI scheme {scheme!r} (use a local path, file:// or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)).rstrip("/") or "/"


def location(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[str, str]:
    """Where `uri` points, the same for every spelling of it: (filesystem type, path), local
    paths with symlinks resolved."""
    fs, path = resolve(uri, storage_cfg)
    return fs.type_name, os.path.realpath(path) if isinstance(fs, pafs.LocalFileSystem) else path


def is_within(uri: str, other: str, storage_cfg: StorageConfig | None = None) -> bool:
    """True when `uri` is `other` or lies anywhere under it."""
    (kind, path), (other_kind, other_path) = location(uri, storage_cfg), location(other, storage_cfg)
    return kind == other_kind and (path == other_path or path.startswith(other_path.rstrip("/") + "/"))


def join(uri: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme: join("s3://b/x", "part-0.parquet")."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def explain(exc: BaseException, uri: str, action: str) -> StorageError:
    """Turn a pyarrow/AWS SDK error into a StorageError that says what to check."""
    text = str(exc)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        bucket = uri[len("s3://"):].split("/", 1)[0]
        hint = f"bucket {bucket!r} does not exist (create it first)"
    elif re.search(r"ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|InvalidAccessKeyId|"
                   r"SignatureDoesNotMatch|AccessDenied", text):
        hint = ("access denied: check the credentials (storage.access_key_id / storage.secret_access_key "
                "or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the bucket's permissions")
    elif re.search(r"SLOW_DOWN|SlowDown|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|InternalError|HTTP status 5\d\d", text):
        hint = "the storage endpoint answered with an error (throttling or a server-side failure): try again later"
    elif re.search(r"Empty reply|Operation too slow|Connection reset|Recv failure|Send failure", text):
        hint = "the storage endpoint dropped or stalled the request: check the network and the server"
    elif re.search(r"NETWORK_CONNECTION|curlCode|Could not connect|Couldn't connect|timed out|"
                   r"Connection refused|resolve host", text):
        hint = ("cannot reach the storage endpoint: check storage.endpoint_url / AWS_ENDPOINT_URL "
                "and that the server is running")
    elif isinstance(exc, FileNotFoundError):
        hint = "no such file"
    else:
        hint = "storage error"
    return StorageError(f"{uri}: cannot {action}: {hint} [{type(exc).__name__}: {text}]")


def file_info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise explain(exc, uri, "look it up") from exc


def check_bucket(uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Fail early and clearly when an s3:// URI's bucket is missing or inaccessible."""
    if not is_s3(uri):
        return
    fs, path = resolve(uri, storage_cfg)
    bucket = path.split("/", 1)[0]
    if file_info(fs, bucket, uri).type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist (create it first)")


def read_bytes(uri: str, storage_cfg: StorageConfig | None = None) -> bytes:
    fs, path = resolve(uri, storage_cfg)
    try:
        with fs.open_input_stream(path) as f:
            return f.readall()
    except FileNotFoundError as exc:
        raise MissingFileError(f"{uri}: no such file") from exc
    except OSError as exc:
        raise explain(exc, uri, "read") from exc


def write_bytes_atomic(uri: str, data: bytes, storage_cfg: StorageConfig | None = None) -> None:
    """Write a whole file so that readers see either nothing or all of it.

    Local files go to a temporary name in the same folder and are renamed over the
    target; an S3 PUT is atomic by itself (a failed upload leaves no object).
    """
    fs, path = resolve(uri, storage_cfg)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            parent = os.path.dirname(path)
            fs.create_dir(parent, recursive=True)
            tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            try:
                with fs.open_output_stream(tmp) as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as exc:
        raise explain(exc, uri, "write") from exc


def delete_files(uri: str, names: list[str], storage_cfg: StorageConfig | None = None) -> None:
    """Delete the named files under `uri` (missing ones are fine)."""
    fs, base = resolve(uri, storage_cfg)
    for name in names:
        try:
            fs.delete_file(f"{base}/{name}")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise explain(exc, join(uri, name), "delete") from exc


def list_files(uri: str, storage_cfg: StorageConfig | None = None,
               file_type: pafs.FileType = pafs.FileType.File) -> list[str]:
    """Names of the files (or, with `file_type=Directory`, folders) directly under `uri`
    (empty if the folder or prefix does not exist)."""
    fs, base = resolve(uri, storage_cfg)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError as exc:
        raise explain(exc, uri, "list") from exc
    return sorted(info.base_name for info in infos if info.type == file_type)


def delete_dir(uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Delete a folder (an S3 prefix) and everything under it; a missing one is fine."""
    fs, path = resolve(uri, storage_cfg)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise explain(exc, uri, "delete") from exc


def copy_file(src_uri: str, dst_uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Put a copy of `src_uri` at `dst_uri` (same filesystem), replacing it; the source stays.

    Locally a hard link (no bytes copied, and the target appears whole at once), a real
    copy where links are not supported; on S3 a server-side copy (atomic like a PUT).
    """
    fs, src = resolve(src_uri, storage_cfg)
    dst = resolve(dst_uri, storage_cfg)[1]
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(os.path.dirname(dst), recursive=True)
            tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{uuid.uuid4().hex}.tmp")
            try:
                try:
                    os.link(src, tmp)
                except OSError:
                    fs.copy_file(src, tmp)
                os.replace(tmp, dst)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            fs.copy_file(src, dst)
    except OSError as exc:
        raise explain(exc, dst_uri, f"copy {src_uri} to it") from exc
