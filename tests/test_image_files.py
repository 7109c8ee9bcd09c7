"""Hostile datasets: ImageFolder trees and file lists holding links out of the root, dangling links and link
loops, FIFOs, sockets, folders and unreadable files named like images, empty, truncated and non-image files.
Each such image stays a dataset index and is a bad image with a reason: DATA.ON_BAD_IMAGE=error fails
naming the file and the reason, skip gives a blank image and the reason."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from clusterfit.config import Config, StorageConfig, TransformsConfig, load_config
from clusterfit.data import ImageDataset, build_dataset, build_source, eval_transform
from clusterfit.errors import UserError
from clusterfit.image_files import BadImageError, DatasetError, FileSource
from clusterfit.storage import StorageError, open_store

NOBODY = 65534


def png(size: int = 8, colour: tuple[int, int, int] = (9, 99, 199)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def config(
    source: str, path: Path | str, on_bad_image: str = "error", link_roots: list[str] | None = None, **extra: Any
) -> Config:
    data = {
        "TRAIN": {"DATA_SOURCES": [source], "DATA_PATHS": [str(path)]},
        "ON_BAD_IMAGE": on_bad_image,
        "LINK_ROOTS": link_roots or [],
        "TRANSFORMS": {"EVAL_RESIZE": 8, "EVAL_CROP_SIZE": 8},
    }
    return load_config(overrides={"DATA": data, **extra})


def images(cfg: Config) -> ImageDataset:
    return build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS))


def problems(cfg: Config) -> dict[str, str]:
    """{image name as the dataset spells it: "" or its reason}, each image read once with skip."""
    assert cfg.DATA.ON_BAD_IMAGE == "skip"
    dataset = images(cfg)
    return {dataset.source.key(i): dataset[i][2] for i in range(len(dataset))}


def socket_at(path: Path) -> None:
    """A Unix socket bound at `path` (bound from its folder: a socket's path is limited to 107 bytes)."""
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path.name)
        sock.close()  # the socket file stays
    finally:
        os.chdir(here)


def bad_entries(folder: Path, outside: Path) -> dict[str, str]:
    """One entry of each kind in `folder`, with the problem expected; `outside` is a file out of the root."""
    folder.mkdir(parents=True)
    (folder / "good.png").write_bytes(png())
    (folder / "inside.png").symlink_to("good.png")  # a link within the root: followed
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image, whatever the name says\n")
    (folder / "truncated.jpg").write_bytes(jpeg()[:300])
    (folder / "outside.png").symlink_to(outside)
    (folder / "dangling.png").symlink_to("nothing-here.png")
    (folder / "loop_a.png").symlink_to("loop_b.png")
    (folder / "loop_b.png").symlink_to("loop_a.png")
    os.mkfifo(folder / "fifo.png")  # opening it for reading would wait for a writer forever
    socket_at(folder / "socket.png")
    return {
        "good.png": "",
        "inside.png": "",
        "empty.png": "zero_bytes",
        "text.jpg": "not_an_image",
        "truncated.jpg": "truncated",
        "outside.png": "outside_root",
        "dangling.png": "dangling_link",
        "loop_a.png": "link_loop",
        "loop_b.png": "link_loop",
        "fifo.png": "not_a_file",
        "socket.png": "not_a_file",
    }


@pytest.fixture
def hostile_tree(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """(an ImageFolder root, {key: expected problem}) with a class folder holding every kind of bad entry."""
    (tmp_path / "secret.png").write_bytes(png())  # someone else's file, out of the dataset root
    root = tmp_path / "tree"
    expected = {f"cat/{name}": problem for name, problem in bad_entries(root / "cat", tmp_path / "secret.png").items()}
    (root / "cat" / "notes.txt").write_text("not an image extension: not listed")
    (root / "cat" / ".hidden.png").write_bytes(b"macOS resource fork")  # hidden: not listed
    (root / "cat" / "folder.png").mkdir()  # a folder named like an image is a folder, as in torchvision
    (root / "cat" / "folder.png" / "inner.png").write_bytes(png())
    (root / "dog").mkdir()
    (root / "dog" / "good.PNG").write_bytes(png())
    expected |= {"cat/folder.png/inner.png": "", "dog/good.PNG": ""}
    return root, expected


# ---------------------------------------------------------------------------------------------
# ImageFolder


def test_a_tree_lists_what_torchvision_lists_bad_files_included_hidden_ones_not(
    hostile_tree: tuple[Path, dict[str, str]],
) -> None:
    from torchvision.datasets import ImageFolder

    root, expected = hostile_tree
    source: Any = build_source(config("disk_folder", root), "TRAIN")
    theirs = [Path(p).relative_to(root).as_posix() for p, _ in ImageFolder(str(root)).samples]
    assert [source.key(i) for i in range(len(source))] == [k for k in theirs if "/." not in k]
    assert sorted(source.keys) == sorted(expected)


def test_each_bad_image_of_a_tree_is_refused_naming_the_file_and_the_reason(
    hostile_tree: tuple[Path, dict[str, str]],
) -> None:
    root, expected = hostile_tree
    dataset = images(config("disk_folder", root))
    for i in range(len(dataset)):
        key, reason = dataset.source.key(i), expected[dataset.source.key(i)]
        if not reason:
            assert dataset[i][2] == ""
            continue
        with pytest.raises(BadImageError) as error:
            dataset[i]
        print(error.value)
        assert error.value.reason == reason, key
        assert f"{(root / key).as_uri()}: cannot read image ({reason}): " in str(error.value)


def test_with_skip_every_bad_image_is_a_blank_with_its_reason(hostile_tree: tuple[Path, dict[str, str]]) -> None:
    root, expected = hostile_tree
    assert problems(config("disk_folder", root, "skip")) == expected


def test_a_link_out_of_the_root_is_named_with_its_target_and_never_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "elsewhere" / "their.png"
    outside.parent.mkdir()
    outside.write_bytes(png())
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "ours.png").write_bytes(png())
    (tmp_path / "data" / "cat" / "link.png").symlink_to(outside)
    source: Any = build_source(config("disk_folder", tmp_path / "data"), "TRAIN")
    with pytest.raises(BadImageError) as error:
        source.load(0)  # link.png sorts first
    message = str(error.value)
    assert (tmp_path / "data" / "cat" / "link.png").as_uri() in message and str(outside) in message
    assert "outside the dataset root" in message and str(tmp_path / "data") in message
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", spy)
        with pytest.raises(BadImageError, match="outside_root"):
            source.load(0)
        source.load(1)
    assert opened == [str(tmp_path / "data" / "cat" / "ours.png")]  # refused before it was opened


def test_a_root_behind_a_symlink_is_the_root(hostile_tree: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, expected = hostile_tree
    (tmp_path / "alias").symlink_to(root)
    assert problems(config("disk_folder", tmp_path / "alias", "skip")) == expected


def test_linked_folders_within_the_root_are_walked_loops_are_not(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(png())
    (root / "dog").symlink_to("cat")  # a linked class folder: walked, as torchvision does
    (root / "cat" / "up").symlink_to("..")  # back to the root: a loop
    (root / "cat" / "self").symlink_to(".")  # a loop too
    source: Any = build_source(config("disk_folder", root), "TRAIN")
    assert [source.key(i) for i in range(len(source))] == ["cat/a.png", "dog/a.png"]
    assert source.classes == ["cat", "dog"]


def test_a_linked_folder_out_of_the_root_fails_naming_it_or_is_left_out_with_skip(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x.png").write_bytes(png())
    root = tmp_path / "tree"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(png())
    (root / "cat" / "more").symlink_to(tmp_path / "theirs")
    with pytest.raises(DatasetError) as error:
        build_source(config("disk_folder", root), "TRAIN")
    assert "cat/more" in str(error.value) and str(tmp_path / "theirs") in str(error.value)
    assert "DATA.ON_BAD_IMAGE=skip" in str(error.value)
    with caplog.at_level(logging.WARNING):
        source: Any = build_source(config("disk_folder", root, "skip"), "TRAIN")
    assert source.keys == ["cat/a.png"]
    assert "cat/more" in caplog.text and "not walked" in caplog.text


# ---------------------------------------------------------------------------------------------
# DATA.LINK_ROOTS: a subset built as symlinks into a big dataset elsewhere


@pytest.fixture
def big_dataset(tmp_path: Path) -> Path:
    """A folder out of every dataset root below, holding three images of distinct colours."""
    big = tmp_path / "imagenet"
    for key, colour in {"n01/a.png": (250, 0, 0), "n01/b.png": (0, 250, 0), "n02/c.png": (0, 0, 250)}.items():
        (big / key).parent.mkdir(parents=True, exist_ok=True)
        (big / key).write_bytes(png(colour=colour))
    return big


def symlink_farm(root: Path, big: Path) -> dict[str, Path]:
    """An ImageFolder at `root` whose cat/ holds links to files of `big` and whose dog/ is a link to a folder of
    `big`: {key: the file it leads to}."""
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").symlink_to(big / "n01" / "a.png")
    (root / "cat" / "b.png").symlink_to(big / "n01" / "b.png")
    (root / "dog").symlink_to(big / "n02")
    return {"cat/a.png": big / "n01" / "a.png", "cat/b.png": big / "n01" / "b.png", "dog/c.png": big / "n02" / "c.png"}


def pixels_by_key(source: Any) -> dict[str, np.ndarray]:
    return {source.key(i): np.asarray(source.load(i)) for i in range(len(source))}


def test_a_symlink_farm_is_refused_without_link_roots(big_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "subset"
    symlink_farm(root, big_dataset)
    with pytest.raises(DatasetError) as error:  # the linked class folder, met while listing
        build_source(config("disk_folder", root), "TRAIN")
    assert "dog" in str(error.value) and "list its folder in DATA.LINK_ROOTS" in str(error.value)
    assert problems(config("disk_folder", root, "skip")) == {"cat/a.png": "outside_root", "cat/b.png": "outside_root"}
    source: Any = build_source(config("disk_folder", root, "skip"), "TRAIN")
    with pytest.raises(BadImageError, match=r"or list its folder in DATA\.LINK_ROOTS"):
        source.load(0)


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_a_symlink_farm_into_link_roots_reads_the_targets(big_dataset: Path, tmp_path: Path, as_uri: bool) -> None:
    root = tmp_path / "subset"
    targets = symlink_farm(root, big_dataset)
    (tmp_path / "alias").symlink_to(big_dataset)  # LINK_ROOTS is resolved: a link to the folder names it too
    allowed = (tmp_path / "alias").as_uri() if as_uri else str(tmp_path / "alias")
    source: Any = build_source(config("disk_folder", root, link_roots=[allowed]), "TRAIN")
    assert source.classes == ["cat", "dog"]
    expected = {key: np.asarray(Image.open(path).convert("RGB")) for key, path in targets.items()}
    found = pixels_by_key(source)
    assert found.keys() == expected.keys()
    for key, pixels in expected.items():
        np.testing.assert_array_equal(found[key], pixels, err_msg=key)


def test_a_link_to_a_folder_not_in_link_roots_stays_refused(
    big_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private = tmp_path / "imagenet-private"  # a sibling whose name starts with the allowed folder's
    private.mkdir()
    (private / "secret.png").write_bytes(png())
    (big_dataset / "n01" / "relay.png").symlink_to(private / "secret.png")  # a link inside LINK_ROOTS leading out
    root = tmp_path / "subset"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").symlink_to(big_dataset / "n01" / "a.png")
    (root / "cat" / "secret.png").symlink_to(private / "secret.png")
    (root / "cat" / "relay.png").symlink_to(big_dataset / "n01" / "relay.png")
    (root / "dog").symlink_to(private)
    allowed = [str(big_dataset)]
    with pytest.raises(DatasetError, match="dog"):
        build_source(config("disk_folder", root, link_roots=allowed), "TRAIN")
    with caplog.at_level(logging.WARNING):
        found = problems(config("disk_folder", root, "skip", link_roots=allowed))
    assert found == {"cat/a.png": "", "cat/relay.png": "outside_root", "cat/secret.png": "outside_root"}
    assert "dog" in caplog.text and "not walked" in caplog.text and str(big_dataset) in caplog.text


def test_a_file_list_of_links_into_link_roots_reads_the_targets(big_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "list" / "sub").mkdir(parents=True)
    (tmp_path / "list" / "a.png").symlink_to(big_dataset / "n01" / "a.png")
    (tmp_path / "list" / "sub" / "c.png").symlink_to(big_dataset / "n02" / "c.png")
    listing = tmp_path / "list" / "train.txt"
    listing.write_text("a.png,0\nsub/c.png,1\n")
    refused = {"a.png": "outside_root", "sub/c.png": "outside_root"}
    assert problems(config("disk_filelist", listing, "skip")) == refused
    source: Any = build_source(config("disk_filelist", listing, link_roots=[str(big_dataset)]), "TRAIN")
    found = pixels_by_key(source)
    np.testing.assert_array_equal(found["a.png"], np.asarray(Image.open(big_dataset / "n01" / "a.png")))
    np.testing.assert_array_equal(found["sub/c.png"], np.asarray(Image.open(big_dataset / "n02" / "c.png")))


@pytest.mark.parametrize("source", ["disk_folder", "disk_filelist"])
@pytest.mark.parametrize("kind", ["missing", "a-file", "relative"])
def test_a_link_root_that_is_not_a_local_folder_is_a_config_error(tmp_path: Path, source: str, kind: str) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(png())
    (tmp_path / "list.txt").write_text("cat/a.png\n")
    value = {"missing": str(tmp_path / "gone"), "a-file": str(tmp_path / "list.txt"), "relative": "cat"}[kind]
    path = tmp_path if source == "disk_folder" else tmp_path / "list.txt"
    with pytest.raises(UserError) as error:
        build_source(config(source, path, link_roots=[value]), "TRAIN")
    assert "DATA.LINK_ROOTS" in str(error.value) and repr(value) in str(error.value), str(error.value)


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """This process as nobody while inside (root reads a file whatever its mode; nobody does not)."""
    if os.geteuid() != 0:
        yield
        return
    Image.init()  # PIL's format plugins, imported while the interpreter's files are readable
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_a_file_the_system_refuses_to_read_is_unreadable() -> None:
    # tmp_path's parents are closed to others: this tree lives where nobody can reach it.
    base = Path(tempfile.mkdtemp(prefix="clusterfit-unreadable-"))
    try:
        base.chmod(0o755)
        (base / "cat").mkdir(mode=0o755)
        (base / "cat" / "a_locked.png").write_bytes(png())
        (base / "cat" / "a_locked.png").chmod(0o000)
        (base / "cat" / "b_open.png").write_bytes(png())
        (base / "cat" / "b_open.png").chmod(0o644)
        dataset = images(config("disk_folder", base, "skip"))
        with unprivileged():
            assert [dataset[i][2] for i in range(2)] == ["unreadable", ""]
            with pytest.raises(
                BadImageError, match=r"a_locked\.png: cannot read image \(unreadable\): Permission denied"
            ):
                dataset.source.load(0)
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------------------------------------
# File lists


def test_each_bad_entry_of_a_file_list_is_refused_or_skipped_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "secret.png").write_bytes(png())
    expected = {f"data/{n}": p for n, p in bad_entries(tmp_path / "data", tmp_path / "secret.png").items()}
    (tmp_path / "data" / "notes.txt").write_text("a file list names its images itself: read whatever the extension")
    (tmp_path / "data" / "folder").mkdir()
    good = str(tmp_path / "data" / "good.png")
    expected |= {
        "data/notes.txt": "not_an_image",
        "data/folder": "not_a_file",
        "data/missing.png": "missing",
        good: "",  # absolute, as VISSL's lists are
        "data/../data/good.png": "",
    }
    listing = tmp_path / "train.txt"
    listing.write_text("# a comment\n\n" + "\n".join(expected) + "\n")
    assert problems(config("disk_filelist", listing, "skip")) == expected
    dataset = images(config("disk_filelist", listing))
    for i, (entry, reason) in enumerate(expected.items()):
        if reason:
            with pytest.raises(BadImageError, match=f"cannot read image \\({reason}\\)") as error:
                dataset[i]
            assert dataset.source.name(i) in str(error.value), entry


def test_a_file_lists_root_is_the_folder_holding_all_its_entries(tmp_path: Path) -> None:
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "a" / "y").mkdir()
    (tmp_path / "a" / "x" / "1.png").write_bytes(png())
    (tmp_path / "a" / "y" / "2.png").symlink_to("../x/1.png")  # within a/, which holds both entries
    (tmp_path / "list.txt").write_text("a/x/1.png\na/y/2.png\n")
    assert problems(config("disk_filelist", tmp_path / "list.txt", "skip")) == {"a/x/1.png": "", "a/y/2.png": ""}
    (tmp_path / "list.txt").write_text("a/y/2.png\n")  # now the root is a/y: the link leads out of it
    assert problems(config("disk_filelist", tmp_path / "list.txt", "skip")) == {"a/y/2.png": "outside_root"}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("a.png,-1\n", ":1: label -1 is not a class id"),
        ("a.png,99999999999999999999\n", ":1: label 99999999999999999999 is not a class id"),
        (",3\n", ":1: no path before the label"),
        ("# only a comment\n\n", "no images listed"),
    ],
    ids=["negative", "beyond-int64", "no-path", "empty"],
)
def test_a_malformed_file_list_names_the_file_and_line(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "list.txt").write_text(text)
    with pytest.raises(DatasetError) as error:
        build_source(config("disk_filelist", tmp_path / "list.txt"), "TRAIN")
    assert f"{tmp_path / 'list.txt'}" in str(error.value) and needle in str(error.value), str(error.value)


def test_a_file_list_saved_with_a_byte_order_mark_reads_its_first_entry(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "list.txt").write_bytes("\ufeffa.png,0\r\n".encode())
    assert problems(config("disk_filelist", tmp_path / "list.txt", "skip")) == {"a.png": ""}


# ---------------------------------------------------------------------------------------------
# S3, DataLoader workers, and a store that fails as a whole


def test_empty_and_non_image_objects_in_a_bucket_are_bad_images(s3_env: Any, s3_bucket: str) -> None:
    client = s3_env.client()
    bucket = s3_bucket.removeprefix("s3://")
    objects = {
        "cat/good.png": png(),
        "cat/empty.png": b"",
        "cat/text.jpg": b"hello",
        "cat/truncated.jpg": jpeg()[:300],
        "cat/notes.txt": b"not listed",
        "cat/._good.png": b"not listed",
    }
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=f"data/{key}", Body=body)
    storage = {"STORAGE": s3_env.settings().model_dump()}
    found = problems(config("disk_folder", f"{s3_bucket}/data", "skip", **storage))
    expected = {"cat/empty.png": "zero_bytes", "cat/good.png": "", "cat/text.jpg": "not_an_image"}
    assert found == expected | {"cat/truncated.jpg": "truncated"}
    client.put_object(Bucket=bucket, Key="data/list.txt", Body=b"cat/good.png\ncat/gone.png\n")
    assert problems(config("disk_filelist", f"{s3_bucket}/data/list.txt", "skip", **storage)) == {
        "cat/good.png": "",
        "cat/gone.png": "missing",
    }


def test_a_bad_image_met_in_a_dataloader_worker_keeps_its_message_and_reason(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    cfg = config("disk_folder", tmp_path)
    dataset = build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS))
    with pytest.raises(BadImageError) as error:
        next(iter(torch.utils.data.DataLoader(dataset, num_workers=1)))
    assert str(error.value).startswith(f"{(tmp_path / 'cat' / 'empty.png').as_uri()}: cannot read image (zero_bytes)")
    assert "Traceback" not in str(error.value) and error.value.reason == "zero_bytes"


def test_a_store_that_cannot_be_reached_fails_even_with_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings = StorageConfig(S3={"ENDPOINT_URL": f"http://127.0.0.1:{port}", "MAX_ATTEMPTS": 1})
    source = FileSource(open_store("s3://bucket/data", settings), ["cat/a.png"], None, [])
    with pytest.raises(StorageError, match="unreachable"):
        ImageDataset(source, eval_transform(TransformsConfig()), "skip")[0]
