"""Object storage: the only I/O seam. URIs are `file://...` (or plain paths) and `s3://bucket/prefix`.

    store = open_store("s3://bucket/exp1", cfg.STORAGE)
    store.put_array("clusters/k100/labels.npy", labels)
    labels = store.get_array("clusters/k100/labels.npy")

Writes are atomic per object: a local file is written beside its target and renamed into place; an
S3 object appears whole when its (multipart) upload completes (the S3 backend, its retries and its
errors are in clusterfit/s3.py). Credentials come only from the AWS
credential chain (environment, shared files, instance/pod identity), never from the config. The
boto3 client is created lazily in each process, so DataLoader workers that fork get their own.
This module imports no deep-learning library.

Conditional writes (`put_if_absent`, `put_if_match`, `delete_if_match`, with the version token
`get_with_token` returns) are what an experiment's lease is made of (clusterfit/lease.py); the
holder of a lease fences this process's writes below its root (`fence_writes`), so a run that
lost its lease writes nothing more.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import unquote, urlparse

import numpy as np

from clusterfit.config import StorageConfig
from clusterfit.errors import UserError

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class StorageError(UserError, RuntimeError):
    """Object storage failed; the message names the URI and what to check."""


class TransientStorageError(StorageError):
    """A failure that trying again may cure: the connection (reset, stall, timeout), a 5xx, throttling."""


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
    def sizes(self, prefix: str) -> dict[str, int]: ...
    def delete(self, key: str) -> None: ...
    def uri(self, key: str) -> str: ...
    # Conditional writes: a token names one version of an object (S3's ETag, a local file's sha256); a write or
    # delete given a token happens only while that version is the current one, atomically, or not at all.
    def get_with_token(self, key: str) -> tuple[bytes, str]: ...
    def put_if_absent(self, key: str, data: bytes) -> str | None: ...  # the new token; None: the key exists
    def put_if_match(self, key: str, data: bytes, token: str) -> str | None: ...  # None: not that version
    def delete_if_match(self, key: str, token: str) -> bool: ...  # False: not that version (or gone)


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


@contextlib.contextmanager
def _local_errors(uri: str, size: int) -> Iterator[None]:
    """Turn a failed local write (a full disk or quota, a read-only or vanished mount, no permission) into a
    StorageError naming the file and the cause, instead of a traceback from deep inside the step."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        reason = {
            errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        where = f" ({exc.filename})" if exc.filename else ""  # a folder or temporary the kernel named
        raise StorageError(
            f"{uri}: cannot write {size:,} bytes: {reason}{where}; nothing was published, "
            "free the space or fix the mount and rerun: finished work is kept"
        ) from None


class LocalBackend:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key

    def uri(self, key: str) -> str:
        return self._path(key).as_uri() if key else self.root.as_uri()

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        with _local_errors(self.uri(key), len(data)):
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
                Path(tmp).unlink(missing_ok=True)  # a full disk leaves no half-written temporary behind
                raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.uri(key)}: no such file") from None

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with _local_errors(self.uri(key), path.stat().st_size):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def get_file(self, key: str, path: Path) -> None:
        if not self._path(key).is_file():
            raise NotFound(f"{self.uri(key)}: no such file")
        shutil.copyfile(self._path(key), path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        return sorted(self.sizes(prefix))

    def sizes(self, prefix: str) -> dict[str, int]:
        # A string prefix, as on S3: "clusters/k1" also matches "clusters/k10/..." and "clusters/k1.json".
        folder = self.root / prefix.rpartition("/")[0]
        if not folder.is_dir():
            return {}
        found = {}
        for path in folder.rglob("*"):
            if not path.name.startswith(".") and path.is_file():
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found[key] = path.stat().st_size
        return found

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    # Conditional writes compare and write under an exclusive lock on a hidden `.<name>.lock` beside the
    # object. lockf() takes a POSIX record lock: on NFS the client forwards it to the server's lock manager
    # (NLM, or NFSv4's own locking), so it excludes other hosts too, and the kernel drops it when its holder
    # dies, kill -9 included, so a dead run never leaves a lock behind (an O_EXCL lock file would). POSIX
    # locks belong to the process, not the thread, hence a thread lock in front. Readers take no lock:
    # put_bytes replaces the file atomically, so they see one whole version or the other.
    @contextlib.contextmanager
    def _exclusive(self, key: str) -> Iterator[Path]:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = target.with_name(f".{target.name}.lock")
        with _thread_locks.setdefault(str(lock), threading.Lock()):  # setdefault is atomic
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                yield target
            finally:
                os.close(fd)  # releases the lock

    @staticmethod
    def _token(path: Path) -> str | None:
        try:
            return sha256_bytes(path.read_bytes())
        except FileNotFoundError:
            return None

    def get_with_token(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, sha256_bytes(data)

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        with self._exclusive(key) as target:
            if target.exists():
                return None
            self.put_bytes(key, data)
        return sha256_bytes(data)

    def put_if_match(self, key: str, data: bytes, token: str) -> str | None:
        with self._exclusive(key) as target:
            if self._token(target) != token:
                return None
            self.put_bytes(key, data)
        return sha256_bytes(data)

    def delete_if_match(self, key: str, token: str) -> bool:
        with self._exclusive(key) as target:
            if self._token(target) != token:
                return False
            target.unlink()
        return True


_thread_locks: dict[str, threading.Lock] = {}  # lock file -> the lock of this process's threads


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

    def writable(self, key: str, *, confirm: bool = False) -> str:
        """The checked key, when this process may write it: a lease holder's fence on a root above it
        (`fence_writes`) raises once the lease is lost; `confirm` asks the lease object itself (before
        publishing)."""
        key = self._checked(key)
        check_fences(self.backend.uri(key), confirm=confirm)
        return key

    def put_bytes(self, key: str, data: bytes) -> None:
        self.backend.put_bytes(self.writable(key), data)

    def get_bytes(self, key: str) -> bytes:
        return self.backend.get_bytes(self._checked(key))

    def put_file(self, key: str, path: Path) -> None:
        self.backend.put_file(self.writable(key), path)

    def get_file(self, key: str, path: Path) -> None:
        self.backend.get_file(self._checked(key), path)

    def exists(self, key: str) -> bool:
        return self.backend.exists(self._checked(key))

    def list(self, prefix: str = "") -> list[str]:
        return self.backend.list(self._checked(prefix) if prefix else prefix)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Key -> size in bytes of every object below prefix (one listing; a string prefix, as `list`)."""
        return self.backend.sizes(self._checked(prefix) if prefix else prefix)

    def delete(self, key: str) -> None:
        self.backend.delete(self.writable(key))

    # The lease's own conditional writes (clusterfit/lease.py): not fenced, they are what the fence is made of.
    def get_with_token(self, key: str) -> tuple[bytes, str]:
        return self.backend.get_with_token(self._checked(key))

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        return self.backend.put_if_absent(self._checked(key), data)

    def put_if_match(self, key: str, data: bytes, token: str) -> str | None:
        return self.backend.put_if_match(self._checked(key), data, token)

    def delete_if_match(self, key: str, token: str) -> bool:
        return self.backend.delete_if_match(self._checked(key), token)

    def put_array(self, key: str, array: np.ndarray) -> bytes:
        data = array_to_bytes(array)
        self.put_bytes(key, data)
        return data

    def get_array(self, key: str) -> np.ndarray:
        return array_from_bytes(self.get_bytes(key), self.uri(key))

    def sub(self, prefix: str) -> Store:
        """A store rooted at `prefix` below this one."""
        return open_store(join_uri(self.root, self._checked(prefix)), self.settings)


class Fence(Protocol):
    """What the holder of an experiment root's lease registers (clusterfit/lease.py)."""

    def check(self) -> None: ...  # raises when this process may no longer write below the root (no I/O)
    def confirm(self) -> None: ...  # the same, asking the lease object itself (one read)


_fences: dict[str, tuple[int, Fence]] = {}  # root URI -> (pid of the holder, its fence)


def fence_writes(root_uri: str, fence: Fence) -> Callable[[], None]:
    """From now on every write of this process below `root_uri` asks `fence` first; returns the undo.
    A forked child (a DataLoader worker) is not the holder and is not fenced."""
    root = root_uri.rstrip("/")
    _fences[root] = (os.getpid(), fence)

    def undo() -> None:
        _fences.pop(root, None)

    return undo


def check_fences(uri: str, *, confirm: bool = False) -> None:
    """Ask the fence of every root above `uri` that this process holds (raises when one was lost)."""
    for root, (pid, fence) in list(_fences.items()):
        if pid != os.getpid() or not (uri == root or uri.startswith(root + "/")):
            continue
        if confirm:
            fence.confirm()
        else:
            fence.check()


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
        from clusterfit.s3 import S3Backend  # boto3's import costs ~0.3 s: only for s3:// roots

        return Store(S3Backend(parsed.netloc, parsed.path, settings), uri.rstrip("/"), settings)
    elif parsed.scheme in ("file", ""):
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else uri).expanduser()
        return Store(LocalBackend(path.absolute()), path.absolute().as_uri(), settings)
    raise StorageError(f"{uri}: unsupported URI scheme {parsed.scheme!r} (use file:// or s3://)")


def read_uri(uri: str, settings: StorageConfig | None = None) -> bytes:
    """The bytes of one object named by its full URI."""
    head, tail = split_uri(uri)
    return open_store(head, settings).get_bytes(tail)
