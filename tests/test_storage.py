"""The storage seam on local files and on a real S3 server (moto, see s3server.py)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clusterfit.config import StorageConfig, config_from_args
from clusterfit.storage import NotFound, StorageError, Store, array_from_bytes, array_to_bytes, open_store
from tests.s3server import S3Server, free_port

MB = 1024 * 1024
BOUND_S = 20.0  # what "within a bounded time" means for the failure cases below


# ---------------------------------------------------------------------------------------------
# Both backends


def test_bytes_and_arrays_round_trip(store: Store) -> None:
    store.put_bytes("a/b/blob.bin", b"\x00payload\xff")
    assert store.get_bytes("a/b/blob.bin") == b"\x00payload\xff"
    arrays: dict[str, np.ndarray] = {
        "f32.npy": np.random.default_rng(1).standard_normal((17, 5)).astype(np.float32),
        "i64.npy": np.arange(-3, 30, dtype=np.int64),
        "empty.npy": np.zeros((0, 4), dtype=np.float32),
        "fortran.npy": np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    }
    for name, array in arrays.items():
        store.put_array(f"arrays/{name}", array)
    for name, array in arrays.items():
        back = store.get_array(f"arrays/{name}")
        assert back.dtype == array.dtype and back.shape == array.shape, name
        np.testing.assert_array_equal(back, array)
    store.put_bytes("a/b/blob.bin", b"second")  # overwrite
    assert store.get_bytes("a/b/blob.bin") == b"second"


def test_missing_object_is_not_found_naming_the_uri(store: Store) -> None:
    with pytest.raises(NotFound) as err:
        store.get_bytes("nothing/here.npy")
    assert store.uri("nothing/here.npy") in str(err.value)


def test_list_exists_delete(store: Store) -> None:
    for key in [
        "features/TRAIN/part-0.npy",
        "features/TRAIN/part-1.npy",
        "features/TEST/part-0.npy",
        "clusters/k1/x",
        "top.json",
    ]:
        store.put_bytes(key, key.encode())
    assert store.list() == sorted(
        [
            "clusters/k1/x",
            "features/TEST/part-0.npy",
            "features/TRAIN/part-0.npy",
            "features/TRAIN/part-1.npy",
            "top.json",
        ]
    )
    assert store.list("features/TRAIN/") == ["features/TRAIN/part-0.npy", "features/TRAIN/part-1.npy"]
    assert store.list("features/TRAIN/part-1") == ["features/TRAIN/part-1.npy"]
    assert store.list("nothing/") == []
    assert store.exists("top.json") and store.exists("features/TEST/part-0.npy")
    assert not store.exists("features/TEST") and not store.exists("nope.json")
    store.delete("features/TRAIN/part-0.npy")
    assert not store.exists("features/TRAIN/part-0.npy")
    assert store.list("features/TRAIN/") == ["features/TRAIN/part-1.npy"]
    store.delete("features/TRAIN/part-0.npy")  # deleting what is gone is not an error


def test_list_prefix_means_the_same_on_both_backends(store: Store) -> None:
    # s3:// lists by string prefix; a step must see the same keys on a laptop and in a pod.
    for key in ["clusters/k1/labels.npy", "clusters/k10/labels.npy", "clusters/k1.json"]:
        store.put_bytes(key, b"x")
    assert store.list("clusters/k1") == ["clusters/k1.json", "clusters/k1/labels.npy", "clusters/k10/labels.npy"]
    assert store.list("clusters/k1/") == ["clusters/k1/labels.npy"]


# ---------------------------------------------------------------------------------------------
# Local files: atomic writes


def entries(folder: Path) -> list[str]:
    """Every file below `folder`, hidden ones included, relative."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_local_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "root"))
    store.put_bytes("a/x.bin", b"1")
    store.put_array("a/y.npy", np.ones(3))
    store.put_bytes("a/x.bin", b"2")
    source = tmp_path / "src.bin"
    source.write_bytes(b"file")
    store.put_file("b/z.bin", source)
    assert entries(tmp_path / "root") == ["a/x.bin", "a/y.npy", "b/z.bin"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_local_published_files_get_the_umask_mode_not_mkstemps_0600(tmp_path: Path, umask: int, mode: int) -> None:
    store = open_store(tmp_path.as_uri())
    previous = os.umask(umask)
    try:
        store.put_bytes("report/index.html", b"<html></html>")
        store.put_file("train/final.pt", Path(__file__))
    finally:
        os.umask(previous)
    for key in ("report/index.html", "train/final.pt"):
        assert (tmp_path / key).stat().st_mode & 0o777 == mode, key  # a colleague on the PVC can read it


def test_local_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(str(tmp_path / "root"))
    store.put_bytes("labels.npy", b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match="labels.npy: cannot write 3,000 bytes: no space left on the device"):
        store.put_bytes("labels.npy", b"new" * 1000)
    assert store.get_bytes("labels.npy") == b"old"
    assert entries(tmp_path / "root") == ["labels.npy"]


def test_local_write_killed_before_rename_keeps_the_old_file(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "root"))
    store.put_bytes("ckpt/checkpoint.pt", b"old")
    pid = os.fork()
    if pid == 0:  # the child dies the hard way in the middle of the write: no cleanup runs
        try:
            os.replace = lambda *args: os._exit(9)  # type: ignore[assignment]
            store.put_bytes("ckpt/checkpoint.pt", b"new" * 100_000)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    assert store.get_bytes("ckpt/checkpoint.pt") == b"old"
    assert store.list() == ["ckpt/checkpoint.pt"]  # the orphaned temp file is hidden from readers


# ---------------------------------------------------------------------------------------------
# S3: large objects, client settings, failures


def etag_of_parts(data: bytes, part_size: int) -> str:
    """S3's multipart ETag: md5 of the parts' md5 digests, then '-<number of parts>'."""
    digests = [hashlib.md5(data[i : i + part_size]).digest() for i in range(0, len(data), part_size)]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


@pytest.mark.slow
def test_100mb_array_round_trip_through_s3_with_multipart(s3_env: S3Server, s3_bucket: str) -> None:
    chunk_mb = 8
    settings = s3_env.settings(MULTIPART_THRESHOLD_MB=16, MULTIPART_CHUNKSIZE_MB=chunk_mb, MAX_CONCURRENCY=4)
    store = open_store(f"{s3_bucket}/exp", settings)
    array = np.random.default_rng(0).standard_normal(100 * MB // 4, dtype=np.float32)
    started = time.monotonic()
    data = store.put_array("features/big.npy", array)
    put_s = time.monotonic() - started
    head = s3_env.client().head_object(Bucket=s3_bucket[5:], Key="exp/features/big.npy")
    etag = head["ETag"].strip('"')
    parts = math.ceil(len(data) / (chunk_mb * MB))
    print(f"{len(data)} bytes in {parts} parts, ETag {etag}, upload {put_s:.1f} s")
    assert head["ContentLength"] == len(data)
    assert parts == 13 and etag == etag_of_parts(data, chunk_mb * MB)
    started = time.monotonic()
    back = store.get_array("features/big.npy")
    print(f"download {time.monotonic() - started:.1f} s")
    assert back.dtype == np.float32 and back.shape == array.shape
    assert np.array_equal(back, array)


def test_small_objects_are_single_part(s3_env: S3Server, s3_bucket: str) -> None:
    store = open_store(f"{s3_bucket}/exp", s3_env.settings())
    data = store.put_array("small.npy", np.ones(1000, dtype=np.float32))
    head = s3_env.client().head_object(Bucket=s3_bucket[5:], Key="exp/small.npy")
    assert head["ETag"].strip('"') == hashlib.md5(data).hexdigest()


def test_client_follows_the_storage_settings(s3_env: S3Server, s3_bucket: str) -> None:
    settings = s3_env.settings(
        MAX_ATTEMPTS=7, CONNECT_TIMEOUT_S=3, READ_TIMEOUT_S=11, MULTIPART_CHUNKSIZE_MB=6, MAX_CONCURRENCY=3
    )
    backend: Any = open_store(f"{s3_bucket}/exp", settings).backend
    config = backend.client.meta.config
    assert config.retries["mode"] == "standard"
    assert config.retries["total_max_attempts"] == 7  # MAX_ATTEMPTS counts the first request too
    assert (config.connect_timeout, config.read_timeout) == (3, 11)
    assert config.s3["addressing_style"] == "path"
    assert backend.client.meta.endpoint_url == s3_env.endpoint_url
    transfer = backend._transfer_config()
    assert (transfer.multipart_chunksize, transfer.max_concurrency) == (6 * MB, 3)


def test_endpoint_from_env_and_config_wins(s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    open_store(f"{s3_bucket}/exp", StorageConfig()).put_bytes("via-env", b"1")  # AWS_ENDPOINT_URL only
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert open_store(f"{s3_bucket}/exp", s3_env.settings()).get_bytes("via-env") == b"1"


def capture_put_headers(store: Store) -> list[dict[str, str]]:
    sent: list[dict[str, str]] = []
    client = store.backend.client  # type: ignore[attr-defined]
    client.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers)))
    return sent


@pytest.mark.parametrize("mode", ["when_supported", "when_required"])
def test_checksums_switch(s3_env: S3Server, s3_bucket: str, mode: str) -> None:
    store = open_store(f"{s3_bucket}/exp", s3_env.settings(CHECKSUMS=mode))
    config = store.backend.client.meta.config  # type: ignore[attr-defined]
    assert config.request_checksum_calculation == mode
    assert config.response_checksum_validation == mode
    sent = capture_put_headers(store)
    store.put_bytes("x.bin", b"checksummed?")
    assert store.get_bytes("x.bin") == b"checksummed?"
    checksum_headers = sorted(
        k for k in sent[0] if k.lower().startswith(("x-amz-checksum", "x-amz-sdk-checksum", "x-amz-trailer"))
    )
    print(mode, checksum_headers)
    # boto3's newer default adds a CRC checksum to every upload; 'when_required' sends none.
    assert bool(checksum_headers) == (mode == "when_supported")


@pytest.mark.parametrize(
    "access_key, secret_key",
    [("AKIAWRONGWRONGWRONG0", "wrong-secret"), (None, "wrong-secret")],
    ids=["unknown-key", "wrong-secret"],
)
@pytest.mark.parametrize("operation", ["put", "get", "exists", "list", "multipart-put"])
def test_wrong_credentials_give_a_clear_error_quickly(
    s3_env: S3Server,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    access_key: str | None,
    secret_key: str,
    operation: str,
) -> None:
    s3_env.client().put_object(Bucket=s3_bucket[5:], Key="exp/x.bin", Body=b"x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key or s3_env.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    store = open_store(f"{s3_bucket}/exp", s3_env.settings(MULTIPART_THRESHOLD_MB=5, MULTIPART_CHUNKSIZE_MB=5))
    run = {
        "put": lambda: store.put_bytes("x.bin", b"y"),
        "get": lambda: store.get_bytes("x.bin"),
        "exists": lambda: store.exists("x.bin"),
        "list": lambda: store.list(""),
        "multipart-put": lambda: store.put_bytes("big.bin", bytes(6 * MB)),
    }[operation]
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        run()
    elapsed = time.monotonic() - started
    print(f"{operation}: {elapsed:.2f} s: {err.value}")
    assert elapsed < BOUND_S
    assert s3_bucket in str(err.value)
    assert "access denied" in str(err.value) and "credentials" in str(err.value)


def test_missing_credentials_give_a_clear_error_quickly(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(f"{s3_bucket}/exp", s3_env.settings())
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        store.get_bytes("x.bin")
    print(f"{time.monotonic() - started:.2f} s: {err.value}")
    assert time.monotonic() - started < BOUND_S
    assert "credentials" in str(err.value) and s3_bucket in str(err.value)


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel does) but never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("operation", ["put", "get", "exists", "list"])
def test_unreachable_endpoint_gives_a_clear_error_quickly(s3_env: S3Server, operation: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # a closed port
    store = open_store(
        "s3://some-bucket/exp", s3_env.settings(ENDPOINT_URL=endpoint, CONNECT_TIMEOUT_S=1, MAX_ATTEMPTS=2)
    )
    attempts: list[str] = []
    store.backend.client.meta.events.register("before-send", lambda **kw: attempts.append(kw["event_name"]))  # type: ignore[attr-defined]
    run = {
        "put": lambda: store.put_bytes("x.bin", b"y"),
        "get": lambda: store.get_bytes("x.bin"),
        "exists": lambda: store.exists("x.bin"),
        "list": lambda: store.list(""),
    }[operation]
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        run()
    elapsed = time.monotonic() - started
    print(f"{operation}: {elapsed:.2f} s, {len(attempts)} attempts: {err.value}")
    assert elapsed < BOUND_S
    assert "unreachable" in str(err.value) and "s3://some-bucket/exp" in str(err.value)
    assert len(attempts) == 2  # MAX_ATTEMPTS, no more


def test_silent_endpoint_times_out(s3_env: S3Server, silent_listener: int) -> None:
    settings = s3_env.settings(
        ENDPOINT_URL=f"http://127.0.0.1:{silent_listener}", CONNECT_TIMEOUT_S=1, READ_TIMEOUT_S=1, MAX_ATTEMPTS=2
    )
    store = open_store("s3://some-bucket/exp", settings)
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        store.exists("x.bin")
    elapsed = time.monotonic() - started
    print(f"{elapsed:.2f} s: {err.value}")
    assert elapsed < 10
    assert "unreachable" in str(err.value) and "s3://some-bucket/exp/x.bin" in str(err.value)


def read_in_child(store: Store, parent_client_id: int, conn: Any) -> None:
    backend: Any = store.backend
    data = store.get_bytes("shared.bin")
    conn.send(
        {
            "pid": os.getpid(),
            "client_pid": backend._client_pid,
            "new_client": id(backend._client) != parent_client_id,
            "data": data,
        }
    )
    conn.close()


def test_client_is_recreated_in_a_forked_child(s3_env: S3Server, s3_bucket: str) -> None:
    store = open_store(f"{s3_bucket}/exp", s3_env.settings())
    store.put_bytes("shared.bin", b"from the parent")
    backend: Any = store.backend
    parent_client = backend.client
    assert backend._client_pid == os.getpid()
    context = multiprocessing.get_context("fork")  # what DataLoader workers do on Linux
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=read_in_child, args=(store, id(parent_client), send))
    child.start()
    report = receive.recv() if receive.poll(60) else None
    child.join(30)
    assert child.exitcode == 0 and report is not None
    assert report["pid"] == child.pid != os.getpid()
    assert report["client_pid"] == child.pid and report["new_client"]
    assert report["data"] == b"from the parent"
    assert backend.client is parent_client  # the parent keeps its own


# ---------------------------------------------------------------------------------------------
# Datasets from an s3:// prefix


def png(color: tuple[int, int, int], size: int = 6) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_disk_folder_from_an_s3_prefix(s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    from clusterfit.data import build_source

    tree = {
        "zebra/10.png": (200, 0, 0),
        "zebra/2.png": (201, 0, 0),
        "apple/b.png": (0, 100, 0),
        "apple/a.png": (0, 101, 0),
        "mango/only.PNG": (0, 0, 50),
    }
    bucket = s3_bucket[5:]
    client = s3_env.client()
    for key, color in tree.items():
        client.put_object(Bucket=bucket, Key=f"imgs/{key}", Body=png(color))
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(png(color))
    client.put_object(Bucket=bucket, Key="imgs/README.txt", Body=b"not an image")
    client.put_object(Bucket=bucket, Key="imgs/zebra/notes.txt", Body=b"not an image")
    cfg = config_from_args(
        [
            "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
            f"config.DATA.TRAIN.DATA_PATHS=[{s3_bucket}/imgs]",
            f"config.STORAGE.S3.ENDPOINT_URL={s3_env.endpoint_url}",
            "config.STORAGE.S3.ADDRESSING_STYLE=path",
        ]
    )
    source: Any = build_source(cfg, "TRAIN")
    reference = ImageFolder(str(tmp_path))  # torchvision's order is the oracle
    expected = [(Path(path).relative_to(tmp_path).as_posix(), target) for path, target in reference.samples]
    assert expected == [
        ("apple/a.png", 0),
        ("apple/b.png", 0),
        ("mango/only.PNG", 1),
        ("zebra/10.png", 2),
        ("zebra/2.png", 2),
    ]
    assert len(source) == 5
    assert [source.name(i) for i in range(5)] == [f"{s3_bucket}/imgs/{key}" for key, _ in expected]
    assert source.targets.tolist() == [target for _, target in expected]
    for i, (key, _) in enumerate(expected):
        assert source.load(i).getpixel((2, 3)) == tree[key]
    print(json.dumps([source.name(i) for i in range(5)]))


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(4, 6),
        np.asfortranarray(np.arange(24, dtype=np.float16).reshape(4, 6)),
        np.zeros((0, 8), np.uint16),
        np.array([(1, 2, 0.5)], dtype=[("index", "<i8"), ("label", "<i8"), ("sqdist", "<f4")]),
    ],
)
def test_a_view_read_equals_a_copy_read_and_cannot_be_written(array: np.ndarray) -> None:
    data = array_to_bytes(array)
    view = array_from_bytes(data, copy=False)
    np.testing.assert_array_equal(view, array_from_bytes(data))
    assert view.dtype == array.dtype and view.shape == array.shape
    assert not view.flags.writeable  # a view of the bytes read, not a second copy


def test_a_truncated_or_object_npy_is_refused_by_the_view_read() -> None:
    data = array_to_bytes(np.ones((100, 4), np.float32))
    with pytest.raises(
        StorageError, match=r"s3://b/part\.npy: not a readable \.npy array: 1596 bytes .*\(1600 expected\)"
    ):
        array_from_bytes(data[:-4], "s3://b/part.npy", copy=False)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(StorageError, match="object arrays"):
        array_from_bytes(buffer.getvalue(), copy=False)


HOSTILE_KEYS = [
    "../outside.json",
    "clusters/../../outside.json",
    "/etc/passwd",
    "clusters/%2e%2e/%2E%2E/outside.json",
    "clusters\\..\\outside.json",
    "clusters/./labels.npy",
    "clusters//labels.npy",
    "clusters/\x00labels.npy",
    "clusters/" + "x" * 256,
    "a/" * 600,
]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_no_key_leaves_the_experiment_root(store: Store, tmp_path: Path, key: str) -> None:
    before = sorted(tmp_path.rglob("*"))
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_array(key, np.ones(2)),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.list(key),
        lambda: store.sub(key),
    ):
        with pytest.raises(StorageError, match="root|bytes"):
            call()
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, here or beside the root
    assert store.list() == []


def test_keys_that_stay_inside_are_kept_as_they_are(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    for key in ("clusters/res5-k100/labels.npy", "clusters/x", "a..b/c.json", "%41/x.json"):
        store.put_bytes(key, b"1")
        assert store.get_bytes(key) == b"1"
    assert store.list("clusters/") == ["clusters/res5-k100/labels.npy", "clusters/x"]
    assert (tmp_path / "%41/x.json").is_file()  # a file name, not decoded
