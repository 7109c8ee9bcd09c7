"""Generated ImageFolder trees, file lists and label files: a dataset (each image read, or a bad image with a
reason) or labels, else a UserError that names the folder, file, entry or label file; never a traceback of
another type."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from clusterfit.config import Config, load_config
from clusterfit.data import ImageDataset, build_dataset, build_source, eval_transform, images_identity
from clusterfit.errors import UserError
from clusterfit.image_files import REASONS, BadImageError, DatasetError
from clusterfit.labels import load_labels
from clusterfit.storage import open_store, sha256_bytes

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, format="JPEG")
    return buffer.getvalue()


PNG, JPEG = png(), jpeg()


def config(source: str, path: Path, on_bad_image: str) -> Config:
    data = {
        "TRAIN": {"DATA_SOURCES": [source], "DATA_PATHS": [str(path)]},
        "ON_BAD_IMAGE": on_bad_image,
        "TRANSFORMS": {"EVAL_RESIZE": 8, "EVAL_CROP_SIZE": 8},
    }
    return load_config(overrides={"DATA": data})


def read_every_image(source: str, path: Path) -> None:
    """The property: a dataset whose every image is read, or refused naming itself and a reason (skip: a blank
    and the reason); or a DatasetError naming `path`."""
    try:
        cfg = config(source, path, "skip")
        lenient: ImageDataset = build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS))
        strict = build_source(config(source, path, "error"), "TRAIN")  # refuses more: a linked folder out
    except DatasetError as exc:
        assert str(path) in str(exc), str(exc)
        return
    assert len(strict) == len(lenient)
    images_identity(strict)  # every name has an identity, whatever its bytes
    for i in range(len(lenient)):
        problem = lenient[i][2]
        assert problem == "" or problem in REASONS, problem
        if not problem:
            assert strict.load(i).mode == "RGB"
            continue
        with pytest.raises(BadImageError) as error:
            strict.load(i)
        assert error.value.reason == problem and strict.name(i) in str(error.value), str(error.value)


# ---------------------------------------------------------------------------------------------
# ImageFolder trees

# Names that trees and lists make hard: unicode (composed and not), spaces, dots, commas, quotes, escapes.
segments = st.text(alphabet=st.sampled_from(list("aZ0 .-_,#%'\"\\\té\u0301💥\n")), min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)
names = st.one_of(
    st.tuples(segments, st.sampled_from([".png", ".JPG", ".jpeg", ".txt", "", ".png.txt", ".webp"])).map(
        lambda parts: "".join(parts).encode()
    ),
    st.sampled_from([b"\xff\xfe.png", b"caf\xe9.jpg", b".hidden.png"]),  # not UTF-8 (Latin-1 trees exist), hidden
)
KINDS = [
    "png",
    "jpeg",
    "empty",
    "text",
    "truncated",
    "folder",
    "link_in",
    "link_out",
    "dangling",
    "loop",
    "fifo",
    "folder_link_in",
    "folder_link_out",
    "folder_link_up",
]
trees = st.lists(st.tuples(st.lists(names, min_size=1, max_size=3), st.sampled_from(KINDS)), max_size=8)


def make(path: bytes, kind: str, base: bytes, root: bytes) -> None:
    """One entry of `kind` at `path` (bytes, absolute); nothing where the tree already has something."""
    contents = {"png": PNG, "jpeg": JPEG, "empty": b"", "text": b"hello\n", "truncated": JPEG[:200]}
    links = {
        "link_in": os.path.join(root, b"anchor", b"a.png"),
        "link_out": os.path.join(base, b"outside.png"),
        "dangling": b"nowhere.png",
        "loop": os.path.basename(path),
        "folder_link_in": os.path.join(root, b"anchor"),
        "folder_link_out": os.path.join(base, b"outside"),
        "folder_link_up": b"..",
    }
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind in contents:
            with open(path, "xb") as handle:
                handle.write(contents[kind])
        elif kind == "folder":
            os.mkdir(path)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            os.symlink(links[kind], path)
    except OSError:  # a name taken, a file where a folder should be, a name too long
        pass


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fuzz-data")
    (base / "outside").mkdir()
    (base / "outside" / "x.png").write_bytes(PNG)
    (base / "outside.png").write_bytes(PNG)
    return base


@SETTINGS
@given(tree=trees)
def test_generated_folder_trees_give_images_or_errors_naming_the_file(
    tree: list[tuple[list[bytes], str]], scratch: Path
) -> None:
    root = Path(tempfile.mkdtemp(dir=scratch))
    try:
        (root / "anchor").mkdir()
        (root / "anchor" / "a.png").write_bytes(PNG)
        for parts, kind in tree:
            make(os.path.join(os.fsencode(root), *parts), kind, os.fsencode(scratch), os.fsencode(root))
        read_every_image("disk_folder", root)
    finally:
        shutil.rmtree(root)


# ---------------------------------------------------------------------------------------------
# File lists


@pytest.fixture(scope="module")
def listed_tree(scratch: Path) -> Path:
    """A folder the generated lists point into: good, empty, non-image, truncated files, a FIFO, links."""
    data = scratch / "listed" / "data"
    (data / "sub").mkdir(parents=True)
    (data / "good.png").write_bytes(PNG)
    (data / "empty.png").write_bytes(b"")
    (data / "text.jpg").write_text("hello")
    (data / "truncated.jpg").write_bytes(JPEG[:200])
    (data / "notes.txt").write_text("no image")
    os.mkfifo(data / "fifo.png")
    (data / "out.png").symlink_to(scratch / "outside.png")
    (data / "in.png").symlink_to("good.png")
    (data / "dangling.png").symlink_to("nowhere.png")
    return scratch / "listed"


ENTRIES = [
    "data/good.png",
    "data/empty.png",
    "data/text.jpg",
    "data/truncated.jpg",
    "data/notes.txt",
    "data/fifo.png",
    "data/out.png",
    "data/in.png",
    "data/dangling.png",
    "data/sub",
    "data/sub/",
    "data/missing.png",
    "./data/good.png",
    "data//good.png",
    "data/sub/../good.png",
    "../../../../../../etc/hostname",
    "../outside.png",
    "/dev/null",
    "/dev/zero",
    "/dev/stdin",
    "/proc/self/status",
    "/",
    "/nonexistent/x.png",
    "~/x.png",
]
entries = st.one_of(
    st.sampled_from(ENTRIES), st.lists(segments | st.sampled_from(["..", "."]), min_size=1, max_size=4).map("/".join)
)
LABELS = ["", ",3", ", 0", ",-1", ",x", ",", ",1,2", ",99999999999999999999999", ",1_0", ",٣"]


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """A file list: entries with the same kind of label on every line, comments and blank lines; now and then
    with labels of every kind and malformed lines; or bytes, most of them not UTF-8."""
    if draw(st.sampled_from(range(10))) == 0:
        return draw(st.binary(max_size=40))
    mixed = draw(st.sampled_from(range(4))) == 0  # one list in four mixes labels and malformed lines
    labels = st.sampled_from(LABELS) if mixed else st.just(draw(st.sampled_from(["", ",1", ",0"])))
    line = st.tuples(entries, labels, st.sampled_from(["", " ", "\r", "\t"])).map("".join)
    chosen = draw(st.lists(line, min_size=1, max_size=6))
    junk = ["", "   ", "# a comment", "#", *([" # not a comment", ",,,"] if mixed else [])]
    for other in draw(st.lists(st.sampled_from(junk), max_size=2)):
        chosen.insert(draw(st.integers(0, len(chosen))), other)
    return (draw(st.sampled_from(["", "\ufeff"])) + "\n".join(chosen)).encode()


@SETTINGS
@given(text=documents())
def test_generated_file_lists_give_images_or_errors_naming_the_entry(text: bytes, listed_tree: Path) -> None:
    listing = Path(tempfile.mkstemp(dir=listed_tree, suffix=".txt")[1])
    try:
        listing.write_bytes(text)
        read_every_image("disk_filelist", listing)
    finally:
        listing.unlink()


# ---------------------------------------------------------------------------------------------
# Label files (DATA.TRAIN.LABEL_PATHS)

NUM_IMAGES, NUM_CLUSTERS = 6, 5
DTYPES = ["<i8", "<i4", "|u1", "<u8", ">i8", "<f8", "<f4", "|b1", "<U3", "<c8", "<m8[s]"]


def ids(length: int) -> st.SearchStrategy[np.ndarray]:
    """int64 labels: cluster ids or -1, or (one time in four) anything from -2 to NUM_CLUSTERS."""
    valid = hnp.arrays(np.int64, length, elements=st.integers(-1, NUM_CLUSTERS - 1))
    return weighted(valid, hnp.arrays(np.int64, length, elements=st.integers(-2, NUM_CLUSTERS)), 3)


def weighted(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any], odds: int) -> st.SearchStrategy[Any]:
    """`usual` `odds` times out of odds + 1, else `other` (a | b would draw each branch of a nested one_of alike)."""
    return st.sampled_from(range(odds + 1)).flatmap(lambda n: other if n == 0 else usual)  # integers() favours 0


arrays = weighted(
    ids(NUM_IMAGES),
    st.one_of(
        hnp.arrays(
            st.sampled_from(DTYPES).map(np.dtype),
            st.one_of(st.just((NUM_IMAGES,)), hnp.array_shapes(min_dims=0, max_dims=2, max_side=7)),
        ),
        hnp.arrays(np.float64, (NUM_IMAGES,), elements=st.sampled_from([0.0, 1.0, np.nan, -1.0, 2.5])),
    ),
    1,
)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


HUGE = (
    b"\x93NUMPY\x01\x00v\x00{'descr': '<i8', 'fortran_order': False, 'shape': (10000000000000,), }" + b" " * 49 + b"\n"
)
not_npy = st.one_of(
    st.binary(max_size=60),
    st.binary(max_size=60).map(lambda b: b"\x93NUMPY\x01\x00" + b),  # a .npy magic, then anything
    st.just(HUGE),  # a header that claims 80 TB
    st.just(b"PK\x03\x04" + b"\0" * 30),  # a zip, which np.load would open as .npz
    arrays.map(lambda a: npy(a)[: len(npy(a)) // 2]),  # cut short
)
label_bytes = weighted(arrays.map(npy), not_npy, 1)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def label_files(draw: st.DrawFn, name: str, keys: list[str], identity: dict[str, Any]) -> dict[str, Any]:
    """{"labels": bytes, "images": VISSL's image list or None, "manifest": a _SUCCESS.json or None, "trust": bool}
    of one of the three kinds of label file, or of none, each right or wrong in some way."""
    kind = draw(st.sampled_from(["bare", "vissl", "ours", "anything"]))
    labels = draw(label_bytes if kind == "anything" else weighted(ids(NUM_IMAGES).map(npy), label_bytes, 3))
    out: dict[str, Any] = {"labels": labels, "images": None, "manifest": None, "trust": draw(st.booleans())}
    if kind == "vissl":  # the images VISSL labelled (some, in its shard order; maybe one it should not have)
        listed = draw(st.lists(st.sampled_from([*keys, "cat/other.png"]), min_size=1, max_size=NUM_IMAGES, unique=True))
        paths = npy(np.array([f"/vissl/root/{k}" for k in listed]))
        out["images"] = draw(weighted(st.just(paths), not_npy | arrays.map(npy), 3))
        out["labels"] = draw(weighted(ids(len(listed)).map(npy), st.just(labels), 3))
    elif kind == "ours":  # our manifest: the digest of these bytes or not, their images' identity or another's
        entry = {"sha256": sha256_bytes(labels), "size": len(labels)}
        files = draw(
            weighted(st.just({name: entry}), st.sampled_from([{name: {**entry, "sha256": "0"}}, {name: 1}, []]), 3)
        )
        recorded = draw(
            weighted(st.just(identity), st.sampled_from([{**identity, "num_images": 7}, [1], None, "x"]), 3)
        )
        out["manifest"] = json.dumps({"files": files, "labels_images": {name: recorded}}).encode()
    elif kind == "anything":
        out["images"] = draw(st.none() | st.binary(max_size=40) | arrays.map(npy))
        out["manifest"] = draw(st.none() | st.binary(max_size=30) | json_values.map(lambda v: json.dumps(v).encode()))
    return out


@pytest.fixture(scope="module")
def label_tree(scratch: Path) -> tuple[Path, list[str]]:
    root = scratch / "labelled"
    keys = [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(NUM_IMAGES // 2)]
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(PNG)
    return root, keys


def label_config(root: Path, labels_path: Path, trust: bool) -> Config:
    split = {"DATA_SOURCES": ["disk_folder"], "DATA_PATHS": [str(root)], "LABEL_PATHS": [str(labels_path)]}
    return load_config(
        overrides={
            "DATA": {"TRAIN": {**split, "TRUST_LABEL_ORDER": trust}},
            "CLUSTERFIT": {"NUM_CLUSTERS": NUM_CLUSTERS},
        }
    )


@SETTINGS
@given(data=st.data())
def test_generated_label_files_give_labels_or_errors_naming_the_file(
    data: st.DataObject, label_tree: tuple[Path, list[str]], scratch: Path
) -> None:
    root, keys = label_tree
    folder = Path(tempfile.mkdtemp(dir=scratch))
    try:
        name = data.draw(st.sampled_from(["labels.npy", "k5_labels.npy", "labels"]))
        labels_path = folder / name
        images_path = folder / (name.removesuffix("_labels.npy").removesuffix(".npy") + "_images.npy")
        manifest_path = folder / "_SUCCESS.json"
        source = build_source(label_config(root, labels_path, False), "TRAIN")
        files = data.draw(label_files(name, keys, images_identity(source)))
        cfg = label_config(root, labels_path, files["trust"])
        for path, content in (
            (labels_path, files["labels"]),
            (images_path, files["images"]),
            (manifest_path, files["manifest"]),
        ):
            if content is not None:
                path.write_bytes(content)
        try:
            labels, _, _ = load_labels(cfg, open_store(str(folder / "exp")), NUM_IMAGES, source)
        except UserError as exc:
            assert any(str(p) in str(exc) for p in (labels_path, images_path, manifest_path)), str(exc)
            return
        assert labels.dtype == np.int64 and labels.shape == (NUM_IMAGES,)
        assert labels.min() >= -1 and labels.max() < NUM_CLUSTERS and (labels >= 0).any()
    finally:
        shutil.rmtree(folder)
