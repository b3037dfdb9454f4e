"""Object-store clients: the few byte-level operations the shard store and remote inputs need, with retries.

S3 (and S3-compatible stores) go through boto3: ranged GETs for reads, multipart uploads for shards, listing and
batch deletes. Credentials and the endpoint come from boto3's standard chain (environment, `~/.aws/config`, instance
roles; `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for S3-compatible stores). Throttling (503 SlowDown) and transient
errors are retried with exponential backoff, by botocore's standard retry mode for each request and here for a
response body that breaks off mid-read. Error messages name the bucket, key and cause, never a credential.

gs://, az:// / abfs:// and hf:// go through fsspec when its backend for the scheme is installed (gcsfs, adlfs,
huggingface_hub); otherwise opening such a URL is one clear error naming the package to install.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from urllib.parse import urlparse

SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss", "hf")
_RETRIES = 8  # attempts of one read, on top of botocore's own per-request retries
_BACKOFF_S = 0.05  # first backoff; doubled per attempt with full jitter, capped at _BACKOFF_MAX_S
_BACKOFF_MAX_S = 5.0


def is_url(ref) -> bool:
    """Whether `ref` names an object-store or hub location (scheme://...)."""
    s = str(ref)
    return "://" in s and s.split("://", 1)[0].lower() in SCHEMES


def split_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, prefix without surrounding slashes) of `scheme://bucket/prefix`."""
    p = urlparse(str(url))
    scheme = p.scheme.lower()
    if scheme not in SCHEMES or not p.netloc:
        raise ValueError(f"{url!r}: expected scheme://bucket/prefix with scheme one of {', '.join(SCHEMES)}")
    return scheme, p.netloc, p.path.strip("/")


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


class StoreError(RuntimeError):
    """An object-store request failed for a reason retrying does not fix (credentials, missing bucket/key)."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str


def _sleep(attempt: int) -> None:
    time.sleep(random.uniform(0, min(_BACKOFF_MAX_S, _BACKOFF_S * 2**attempt)))


class S3Client:
    """boto3 S3 client for one bucket; picklable (the boto3 client is created lazily per process)."""

    def __init__(self, bucket: str):
        self.bucket = bucket
        self._client = None
        self._pid = None

    def __getstate__(self):
        return {"bucket": self.bucket}

    def __setstate__(self, state):
        self.__init__(state["bucket"])

    @property
    def client(self):
        if self._client is None or self._pid != os.getpid():
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise StoreError(
                    f"s3://{self.bucket}: s3:// inputs and outputs need boto3, which is not installed; "
                    "pip install 'shardmerge[s3]' (or boto3)"
                ) from None

            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            cfg = Config(
                retries={"max_attempts": 10, "mode": "standard"},
                s3={"addressing_style": "path"} if endpoint else {},
                max_pool_connections=32,
            )
            self._client = boto3.session.Session().client("s3", config=cfg)
            self._pid = os.getpid()
        return self._client

    def where(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def _fail(self, exc: Exception, key: str, action: str) -> Exception:
        """A clear StoreError for a request that failed for good (the message never holds a credential)."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self.where(key)
        if isinstance(exc, NoCredentialsError):
            return StoreError(
                f"{where}: {action} failed: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance role)"
            )
        if isinstance(exc, EndpointConnectionError):
            return StoreError(f"{where}: {action} failed: cannot reach the S3 endpoint ({exc})")
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return StoreError(f"{where}: {action} failed: bucket {self.bucket!r} does not exist")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken") or (
                code in ("AccessDenied", "403") or status == 403
            ):
                return StoreError(
                    f"{where}: {action} failed: the S3 credentials were refused ({code or status}); check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile) and the bucket policy"
                )
            return StoreError(f"{where}: {action} failed: {code or status}: {err.get('Message', '')}".rstrip(": "))
        return StoreError(f"{where}: {action} failed: {type(exc).__name__}: {exc}")

    def _call(self, action: str, key: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, key, action) from None

    # -- reads --------------------------------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(exc, key, "HEAD") from None
        except BotoCoreError as exc:
            raise self._fail(exc, key, "HEAD") from None
        return ObjectInfo(int(r["ContentLength"]), str(r.get("ETag", "")).strip('"'))

    def get_range(self, key: str, begin: int, end: int) -> bytes:
        """Bytes [begin, end) of an object: one ranged GET, retried with backoff when the body breaks off."""
        from botocore.exceptions import (
            ConnectionClosedError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        if end <= begin:
            return b""
        for attempt in range(_RETRIES):
            r = self._call(
                "GET", key, self.client.get_object, Bucket=self.bucket, Key=key, Range=f"bytes={begin}-{end - 1}"
            )
            try:
                data = r["Body"].read()
            except (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, ConnectionClosedError):
                if attempt == _RETRIES - 1:
                    raise
                _sleep(attempt)
                continue
            if len(data) == end - begin:
                return data
            if attempt == _RETRIES - 1:
                raise StoreError(f"{self.where(key)}: short read ({len(data)} of {end - begin} bytes at {begin})")
            _sleep(attempt)
        raise AssertionError("unreachable")

    def get(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key)
            return r["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(exc, key, "GET") from None

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under `prefix` (recursive)."""
        out = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in pages:
                out += [(o["Key"], int(o["Size"])) for o in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, prefix, "LIST") from None
        return out

    # -- writes -------------------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        self._call("PUT", key, self.client.put_object, Bucket=self.bucket, Key=key, Body=data)

    def upload_file(self, key: str, path: str) -> None:
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=4)
        self._call("upload", key, self.client.upload_file, path, self.bucket, key, Config=cfg)

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            if batch:
                self._call("DELETE", keys[i], self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch})

    def create_multipart(self, key: str) -> str:
        return self._call("multipart upload", key, self.client.create_multipart_upload, Bucket=self.bucket, Key=key)[
            "UploadId"
        ]

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict:
        r = self._call(
            "upload part",
            key,
            self.client.upload_part,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
        )
        return {"PartNumber": number, "ETag": r["ETag"]}

    def complete_multipart(self, key: str, upload_id: str, parts: list[dict]) -> None:
        self._call(
            "complete multipart upload",
            key,
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )

    def abort_multipart(self, key: str, upload_id: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError):
            pass  # best effort: an unfinished upload is invisible and a bucket lifecycle rule reaps it

    def abort_stale_uploads(self, prefix: str) -> int:
        """Abort every unfinished multipart upload under `prefix` (left by a killed run); returns how many."""
        r = self._call(
            "list multipart uploads", prefix, self.client.list_multipart_uploads, Bucket=self.bucket, Prefix=prefix
        )
        ups = r.get("Uploads", [])
        for u in ups:
            self.abort_multipart(u["Key"], u["UploadId"])
        return len(ups)

    def check_bucket(self) -> None:
        """One clear StoreError when the bucket is missing or the credentials are refused."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, "", "access check") from None


# multipart part size of the shards and staged unit objects: S3 needs parts of at least 5 MiB (all but the last)
PART_BYTES = 16 << 20


class FsspecClient:
    """The same read operations through fsspec (gs://, az://, abfs://, hf://), for inputs."""

    _PKG = {"gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "hf": "huggingface_hub"}

    def __init__(self, scheme: str, bucket: str):
        self.scheme, self.bucket = scheme, bucket
        self._fs = None

    def __getstate__(self):
        return {"scheme": self.scheme, "bucket": self.bucket}

    def __setstate__(self, state):
        self.__init__(state["scheme"], state["bucket"])

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            try:
                self._fs = fsspec.filesystem(self.scheme)
            except (ImportError, ValueError) as exc:
                raise StoreError(
                    f"{self.scheme}:// inputs need the {self._PKG.get(self.scheme, 'fsspec')} package, which is not "
                    f"installed ({exc}); install it or copy the model to s3:// or a local directory"
                ) from None
        return self._fs

    def where(self, key: str = "") -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{key}"

    def head(self, key: str) -> ObjectInfo | None:
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StoreError(f"{self.where(key)}: HEAD failed: {type(exc).__name__}: {exc}") from None
        return ObjectInfo(int(info.get("size", 0)), str(info.get("etag") or info.get("sha") or info.get("mtime", "")))

    def get_range(self, key: str, begin: int, end: int) -> bytes:
        if end <= begin:
            return b""
        for attempt in range(_RETRIES):
            try:
                data = self.fs.cat_file(self._path(key), start=begin, end=end)
            except FileNotFoundError:
                raise StoreError(f"{self.where(key)}: does not exist") from None
            except Exception as exc:
                if attempt == _RETRIES - 1:
                    raise StoreError(f"{self.where(key)}: ranged read failed: {type(exc).__name__}: {exc}") from None
                _sleep(attempt)
                continue
            if len(data) == end - begin:
                return data
            _sleep(attempt)
        raise StoreError(f"{self.where(key)}: short read at {begin}")

    def get(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[tuple[str, int]]:
        try:
            found = self.fs.find(self._path(prefix), detail=True)
        except FileNotFoundError:
            return []
        cut = len(self.bucket) + 1
        return [(p[cut:], int(i.get("size", 0))) for p, i in found.items()]

    def check_bucket(self) -> None:
        self.list("")


def client_for(url: str):
    """(client, prefix) of an object-store or hub URL."""
    scheme, bucket, prefix = split_url(url)
    if scheme == "s3":
        return S3Client(bucket), prefix
    if scheme == "hf":
        return hub_client(bucket, prefix)
    return FsspecClient(scheme, bucket), prefix


def hub_client(org: str, rest: str):
    """hf://org/name[@revision][/sub/dir]: the hub repo through huggingface_hub's HfFileSystem (ranged reads).
    HF_HUB_OFFLINE makes it a clear error (nothing is fetched); HF_TOKEN is used by huggingface_hub itself."""
    name, _, sub = rest.partition("/")
    repo, _, revision = f"{org}/{name}".partition("@")
    if not name or not repo.count("/") == 1:
        raise ValueError(f"hf://{org}/{rest}: expected hf://org/name[@revision]")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise StoreError(
            f"hf://{repo}: HF_HUB_OFFLINE is set, so hub files cannot be range-read; use the bare hub id "
            f"{repo!r} (resolved from the local cache) or unset HF_HUB_OFFLINE"
        )
    client = FsspecClient("hf", repo + (f"@{revision}" if revision else ""))
    return client, sub
