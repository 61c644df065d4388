"""Where a cluster keeps the bytes of its jobs (condition images, MP4s): an S3 bucket, or a directory on a shared disk.

Every node of a cluster reaches the same store, so any replica can run a job and any ingress can serve its video.
Keys are relative paths (`videos/<id>.mp4`, `inputs/<id>.png`, `tmp/...`); `LocalObjects` on a server's `data_dir`
has the single server's layout. Both are called from threads (they block) and are safe to share between them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

CHUNK_BYTES = 256 * 1024  # what a stream yields at a time


@dataclass
class ObjectStream:
    """Bytes `start`..`end` (inclusive) of an object of `size` bytes, as chunks; `close()` if not read to the end."""

    chunks: Iterator[bytes]
    size: int
    start: int
    end: int

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


class ObjectStore(Protocol):
    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes | None: ...  # None: no such object
    def size(self, key: str) -> int | None: ...
    def exists(self, key: str) -> bool: ...
    def open(self, key: str, start: int = 0, end: int | None = None) -> ObjectStream | None: ...
    def delete(self, key: str) -> None: ...  # no error when missing
    def copy(self, src: str, dst: str) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...


def objects_from_url(url: str | os.PathLike[str], create_bucket: bool = False) -> ObjectStore:
    """`s3://bucket/prefix` or a directory."""
    text = os.fspath(url)
    return S3Objects(text, create_bucket=create_bucket) if text.startswith("s3://") else LocalObjects(Path(text))


class LocalObjects:
    """Objects as files under `root`; writes go through a temporary file and a rename (never half-written)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        parts = Path(key).parts
        if not parts or Path(key).is_absolute() or ".." in parts:
            raise ValueError(f"bad object key {key!r}")
        return self.root / key

    def _write(self, key: str, fill) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as src:
            self._write(key, lambda f: shutil.copyfileobj(src, f, CHUNK_BYTES))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def open(self, key: str, start: int = 0, end: int | None = None) -> ObjectStream | None:
        try:
            f = open(self._path(key), "rb")  # closed by the generator below
        except FileNotFoundError:
            return None
        size = os.fstat(f.fileno()).st_size
        last = size - 1 if end is None else min(end, size - 1)

        def chunks() -> Iterator[bytes]:
            with f:
                f.seek(start)
                left = last - start + 1
                while left > 0:
                    data = f.read(min(CHUNK_BYTES, left))
                    if not data:
                        return
                    left -= len(data)
                    yield data

        return ObjectStream(chunks(), size, start, last)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def copy(self, src: str, dst: str) -> None:
        with open(self._path(src), "rb") as f:
            self._write(dst, lambda out: shutil.copyfileobj(f, out, CHUNK_BYTES))

    def rename(self, src: str, dst: str) -> None:
        self._path(dst).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(src), self._path(dst))


class S3Objects:
    """Objects in `s3://bucket/prefix` (boto3). The endpoint is `endpoint_url`, else boto3's own configuration
    (`AWS_ENDPOINT_URL`, then AWS itself); credentials and region come the standard boto3 way. `create_bucket`:
    make the bucket when it does not exist (tests, a fresh MinIO); otherwise a missing bucket is an error on use."""

    def __init__(self, url: str, endpoint_url: str | None = None, create_bucket: bool = False) -> None:
        import boto3  # the cluster extra: a single server never imports it
        from botocore.exceptions import ClientError

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"expected s3://bucket[/prefix], got {url!r}")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self._client = boto3.client("s3", endpoint_url=endpoint_url)
        self._client_error = ClientError
        if create_bucket:
            self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except self._client_error:
            region = self._client.meta.region_name
            where = {"LocationConstraint": region}  # us-east-1 is the default and must not be named
            extra = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": where}
            try:
                self._client.create_bucket(Bucket=self.bucket, **extra)
            except self._client_error as exc:  # another node made it meanwhile
                if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        return code in ("404", "NoSuchKey", "NotFound")

    def put_file(self, key: str, path: Path) -> None:
        self._client.upload_file(str(path), self.bucket, self._key(key))  # multipart when large

    def put_bytes(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self._client_error as exc:
            if self._missing(exc):
                return None
            raise

    def size(self, key: str) -> int | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except self._client_error as exc:
            if self._missing(exc):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def open(self, key: str, start: int = 0, end: int | None = None) -> ObjectStream | None:
        args = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            reply = self._client.get_object(**args)
        except self._client_error as exc:
            if self._missing(exc):
                return None
            raise
        length = reply["ContentLength"]
        span = reply.get("ContentRange")  # "bytes 0-99/1234" for a range
        size = int(span.rsplit("/", 1)[1]) if span else length
        body = reply["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK_BYTES)
            finally:
                body.close()

        return ObjectStream(chunks(), size, start, start + length - 1)

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def copy(self, src: str, dst: str) -> None:
        self._client.copy({"Bucket": self.bucket, "Key": self._key(src)}, self.bucket, self._key(dst))

    def rename(self, src: str, dst: str) -> None:
        """S3 has no rename: a server-side copy, then the source is deleted."""
        self.copy(src, dst)
        self.delete(src)
