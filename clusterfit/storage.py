"""Object storage: the only I/O seam. URIs are `file://...` (or plain paths) and `s3://bucket/prefix`.

    store = open_store("s3://bucket/exp1", cfg.STORAGE)
    store.put_array("clusters/k100/labels.npy", labels)
    labels = store.get_array("clusters/k100/labels.npy")

Writes are atomic per object: a local file is written beside its target and renamed into place; an
S3 object appears whole when its (multipart) upload completes. Credentials come only from the AWS
credential chain (environment, shared files, instance/pod identity), never from the config. The
boto3 client is created lazily in each process, so DataLoader workers that fork get their own.
This module imports no deep-learning library.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import numpy as np

from clusterfit.config import StorageConfig
from clusterfit.errors import UserError


class StorageError(UserError, RuntimeError):
    """Object storage failed; the message names the URI and what to check."""


class NotFound(StorageError):
    """The object does not exist."""


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def array_to_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def array_from_bytes(data: bytes, uri: str = "<bytes>", copy: bool = True) -> np.ndarray:
    """The .npy array in data; `copy=False` gives a read-only view of data instead of a second copy
    (what the cluster step's feature reads use: a part is read once, then normalised into a new array)."""
    try:
        if copy:
            return np.load(io.BytesIO(data), allow_pickle=False)
        return npy_view(data)
    except (ValueError, OSError, EOFError) as exc:
        raise StorageError(f"{uri}: not a readable .npy array: {exc}") from exc


def npy_view(data: bytes) -> np.ndarray:
    """A read-only array over the payload of .npy bytes (format 1.0 or 2.0, no object arrays)."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        return np.load(io.BytesIO(data), allow_pickle=False)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    count = int(np.prod(shape, dtype=np.int64))
    payload = len(data) - stream.tell()
    if payload != count * dtype.itemsize:
        raise ValueError(f"{payload} bytes of data for shape {shape} of {dtype} ({count * dtype.itemsize} expected)")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


class Backend(Protocol):
    """What a storage backend implements; keys are '/'-separated paths below the root."""

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def uri(self, key: str) -> str: ...


def new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0644 under the usual 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return 0o666 & ~mask


class LocalBackend:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key

    def uri(self, key: str) -> str:
        return self._path(key).as_uri() if key else self.root.as_uri()

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fchmod(handle.fileno(), new_file_mode())  # mkstemp's 0600 would hide it from the team
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.uri(key)}: no such file") from None

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def get_file(self, key: str, path: Path) -> None:
        if not self._path(key).is_file():
            raise NotFound(f"{self.uri(key)}: no such file")
        shutil.copyfile(self._path(key), path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        # A string prefix, as on S3: "clusters/k1" also matches "clusters/k10/..." and "clusters/k1.json".
        folder = self.root / prefix.rpartition("/")[0]
        if not folder.is_dir():
            return []
        keys = []
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Backend:
    def __init__(self, bucket: str, prefix: str, settings: StorageConfig) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings.S3
        self._client: Any = None
        self._client_pid = -1
        self._lock = threading.Lock()

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def client(self) -> Any:
        # One client per process: boto3 clients must not cross a fork (DataLoader workers).
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = make_s3_client(self.settings)
                self._client_pid = os.getpid()
            return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        mb = 1024 * 1024
        return TransferConfig(
            multipart_threshold=self.settings.MULTIPART_THRESHOLD_MB * mb,
            multipart_chunksize=self.settings.MULTIPART_CHUNKSIZE_MB * mb,
            max_concurrency=self.settings.MAX_CONCURRENCY,
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        if len(data) >= self.settings.MULTIPART_THRESHOLD_MB * 1024 * 1024:
            with _s3_errors(self.uri(key)):
                self.client.upload_fileobj(
                    io.BytesIO(data), self.bucket, self._key(key), Config=self._transfer_config()
                )
            return
        with _s3_errors(self.uri(key)):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        buffer = io.BytesIO()
        with _s3_errors(self.uri(key)):
            self.client.download_fileobj(self.bucket, self._key(key), buffer, Config=self._transfer_config())
        return buffer.getvalue()

    def put_file(self, key: str, path: Path) -> None:
        with _s3_errors(self.uri(key)):
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer_config())

    def get_file(self, key: str, path: Path) -> None:
        with _s3_errors(self.uri(key)):
            self.client.download_file(self.bucket, self._key(key), str(path), Config=self._transfer_config())

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            with _s3_errors(self.uri(key), passthrough=(ClientError,)):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _translate(exc, self.uri(key)) or StorageError(f"{self.uri(key)}: {exc}") from None

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        with _s3_errors(self.uri(prefix)):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        with _s3_errors(self.uri(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def make_s3_client(settings: Any) -> Any:
    """A boto3 S3 client from the S3 settings; credentials from the AWS chain only."""
    import boto3
    from botocore.config import Config as BotoConfig

    options: dict[str, Any] = {
        # total_max_attempts counts the first try; botocore's max_attempts would count retries only.
        "retries": {"mode": "standard", "total_max_attempts": settings.MAX_ATTEMPTS},
        "connect_timeout": settings.CONNECT_TIMEOUT_S,
        "read_timeout": settings.READ_TIMEOUT_S,
        "s3": {"addressing_style": settings.ADDRESSING_STYLE},
        "request_checksum_calculation": settings.CHECKSUMS,
        "response_checksum_validation": settings.CHECKSUMS,
    }
    endpoint = (
        settings.ENDPOINT_URL or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    )
    region = settings.REGION or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, region_name=region, config=BotoConfig(**options))


class _s3_errors:
    """Turn botocore's exceptions into StorageError naming the URI and the likely cause."""

    def __init__(self, uri: str, passthrough: tuple[type[BaseException], ...] = ()) -> None:
        self.uri = uri
        self.passthrough = passthrough

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, (StorageError, *self.passthrough)):
            return
        translated = _translate(exc, self.uri)
        if translated is not None:
            raise translated from None


def _translate(exc: BaseException, uri: str) -> StorageError | None:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
        )
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
        return StorageError(f"{uri}: S3 endpoint unreachable: {exc}")
    if isinstance(exc, S3UploadFailedError):
        return StorageError(f"{uri}: upload failed: {exc}")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return NotFound(f"{uri}: no such object")
        if code in ("NoSuchBucket",):
            return StorageError(f"{uri}: bucket does not exist")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{uri}: access denied ({code}): check the S3 credentials and their permissions")
        return StorageError(f"{uri}: S3 error {code}: {exc}")
    return None


MAX_KEY_BYTES = 1024  # S3's limit on a key; a file system's on one name is 255


def inside_root(key: str, root: str = "") -> str:
    """key, when it names something below the root on every backend; else a StorageError naming it.

    Refused: absolute keys, '.' and '..' segments (also percent-encoded, as a URI would decode them),
    backslashes (a separator on some file systems and gateways), control characters, empty segments,
    and names longer than the backends allow."""
    where = f"{root.rstrip('/')}/{key}" if root else key
    if len(key.encode()) > MAX_KEY_BYTES:
        raise StorageError(f"{where[:200]}...: key of {len(key.encode())} bytes (at most {MAX_KEY_BYTES})")
    if key.startswith("/") or "\\" in key or any(ord(c) < 32 or c == "\x7f" for c in key):
        raise StorageError(f"{where!r}: not a key below the experiment root (absolute, backslash or control character)")
    segments = key.split("/")
    for number, segment in enumerate(segments):
        if unquote(segment) in (".", "..") or (not segment and number < len(segments) - 1):
            raise StorageError(f"{where!r}: the segment {segment!r} would leave or blur the experiment root")
        if len(segment.encode()) > 255:
            raise StorageError(f"{where[:200]}...: a name of {len(segment.encode())} bytes (at most 255)")
    return key


@dataclass
class Store:
    """An artifact root: a backend plus array and JSON helpers. Keys are relative to the root, and
    every key is checked to stay below it (`inside_root`), whatever user input built it."""

    backend: Backend
    root: str
    settings: StorageConfig

    def _checked(self, key: str) -> str:
        return inside_root(key, self.root)

    def uri(self, key: str = "") -> str:  # a name only, unchecked: error messages name refused keys with it
        return self.backend.uri(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.backend.put_bytes(self._checked(key), data)

    def get_bytes(self, key: str) -> bytes:
        return self.backend.get_bytes(self._checked(key))

    def put_file(self, key: str, path: Path) -> None:
        self.backend.put_file(self._checked(key), path)

    def get_file(self, key: str, path: Path) -> None:
        self.backend.get_file(self._checked(key), path)

    def exists(self, key: str) -> bool:
        return self.backend.exists(self._checked(key))

    def list(self, prefix: str = "") -> list[str]:
        return self.backend.list(self._checked(prefix) if prefix else prefix)

    def delete(self, key: str) -> None:
        self.backend.delete(self._checked(key))

    def put_array(self, key: str, array: np.ndarray) -> bytes:
        data = array_to_bytes(array)
        self.put_bytes(key, data)
        return data

    def get_array(self, key: str) -> np.ndarray:
        return array_from_bytes(self.get_bytes(key), self.uri(key))

    def sub(self, prefix: str) -> Store:
        """A store rooted at `prefix` below this one."""
        return open_store(join_uri(self.root, self._checked(prefix)), self.settings)


def join_uri(base: str, key: str) -> str:
    return f"{base.rstrip('/')}/{key.lstrip('/')}" if key else base


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://b/p/x.npy` -> (`s3://b/p`, `x.npy`)."""
    head, _, tail = uri.rstrip("/").rpartition("/")
    return head, tail


def open_store(uri: str, settings: StorageConfig | None = None) -> Store:
    """The store rooted at `uri` (`file://`, a plain path, or `s3://bucket/prefix`)."""
    settings = settings or StorageConfig()
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket name")
        return Store(S3Backend(parsed.netloc, parsed.path, settings), uri.rstrip("/"), settings)
    elif parsed.scheme in ("file", ""):
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else uri).expanduser()
        return Store(LocalBackend(path.absolute()), path.absolute().as_uri(), settings)
    raise StorageError(f"{uri}: unsupported URI scheme {parsed.scheme!r} (use file:// or s3://)")


def read_uri(uri: str, settings: StorageConfig | None = None) -> bytes:
    """The bytes of one object named by its full URI."""
    head, tail = split_uri(uri)
    return open_store(head, settings).get_bytes(tail)
