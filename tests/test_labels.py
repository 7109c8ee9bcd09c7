"""Label files for training: VISSL's label + image-list pair realigned by path, ours checked against the
dataset's identity, a bare file refused unless its order is vouched for."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clusterfit.config import Config, load_config
from clusterfit.data import build_source
from clusterfit.labels import LabelError, load_labels
from clusterfit.storage import open_store

CLASSES = ("cat", "dog", "fox")
PER_CLASS = 4
VISSL_ROOT = "/checkpoint/someone/datasets/pets/train"  # where VISSL read the same tree


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (value, 255 - value, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, list[str]]:
    """An ImageFolder tree and its images' relative paths in torchvision's (our dataset's) order."""
    root = tmp_path / "pets"
    keys = [f"{c}/img{i}.png" for c in CLASSES for i in range(PER_CLASS)]
    for n, key in enumerate(keys):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(png(n * 10))
    return root, keys


def config(data: Path, labels: Path | None = None, **train: Any) -> Config:
    split = {"DATA_SOURCES": ["disk_folder"], "DATA_PATHS": [str(data)], **train}
    if labels is not None:
        split["LABEL_PATHS"] = [str(labels)]
    return load_config(overrides={"DATA": {"TRAIN": split}, "CLUSTERFIT": {"NUM_CLUSTERS": 5}})


def load(cfg: Config, tmp_path: Path) -> np.ndarray:
    source = build_source(cfg, "TRAIN")
    labels, _, _ = load_labels(cfg, open_store(str(tmp_path / "exp")), len(source), source)
    return labels


def vissl_pair(folder: Path, paths: list[str], labels: list[int]) -> Path:
    """The two files VISSL's tools/cluster_features_and_label.py writes for one split."""
    prefix = folder / "pets_train_res5_N5_D512"
    np.save(f"{prefix}_images.npy", np.array(paths))
    np.save(f"{prefix}_labels.npy", np.array(labels, dtype=np.int64))
    return Path(f"{prefix}_labels.npy")


def test_a_vissl_pair_in_shard_order_is_realigned_to_dataset_order(
    tree: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, keys = tree
    truth = {key: n % 5 for n, key in enumerate(keys)}  # the label VISSL gave each image
    shard_order = [keys[i] for i in np.random.default_rng(3).permutation(len(keys))]
    path = vissl_pair(tmp_path, [f"{VISSL_ROOT}/{k}" for k in shard_order], [truth[k] for k in shard_order])
    expected = [truth[k] for k in keys]
    assert np.load(path).tolist() != expected  # same length: read as it is, it would scramble the labels
    labels = load(config(root, path), tmp_path)
    assert labels.dtype == np.int64 and labels.tolist() == expected


def test_a_dataset_image_missing_from_the_vissl_list_gets_minus_one(
    tree: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, keys = tree
    kept = [k for k in reversed(keys) if k != "dog/img2.png"]
    path = vissl_pair(tmp_path, [f"{VISSL_ROOT}/{k}" for k in kept], [len(k) % 5 for k in kept])
    labels = load(config(root, path), tmp_path)
    expected = [-1 if k == "dog/img2.png" else len(k) % 5 for k in keys]
    assert labels.tolist() == expected


def test_a_vissl_image_that_is_not_in_the_dataset_is_named(tree: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, keys = tree
    paths = [f"{VISSL_ROOT}/{k}" for k in keys] + [f"{VISSL_ROOT}/owl/img0.png"]
    path = vissl_pair(tmp_path, paths, [0] * len(paths))
    with pytest.raises(LabelError) as error:
        load(config(root, path), tmp_path)
    assert f"{VISSL_ROOT}/owl/img0.png" in str(error.value) and "DATA.TRAIN.DATA_PATHS" in str(error.value)


def test_a_vissl_pair_of_different_lengths_is_refused(tree: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, keys = tree
    path = vissl_pair(tmp_path, [f"{VISSL_ROOT}/{k}" for k in keys], [0] * (len(keys) - 1))
    with pytest.raises(LabelError, match=r"11 labels but .*_images\.npy lists 12 images"):
        load(config(root, path), tmp_path)


def test_a_bare_label_file_is_refused_saying_what_to_provide(tree: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, keys = tree
    path = tmp_path / "labels.npy"
    np.save(path, np.arange(len(keys), dtype=np.int64) % 5)
    with pytest.raises(LabelError) as error:
        load(config(root, path), tmp_path)
    message = str(error.value)
    assert str(path) in message
    assert "labels_images.npy" in message  # VISSL's image list, named as it would have to sit beside it
    assert "_SUCCESS.json" in message and "DATA.TRAIN.TRUST_LABEL_ORDER" in message


def test_a_bare_label_file_is_taken_as_is_when_its_order_is_vouched_for(
    tree: tuple[Path, list[str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, keys = tree
    path = tmp_path / "labels.npy"
    np.save(path, np.arange(len(keys), dtype=np.int64) % 5)
    with caplog.at_level(logging.WARNING):
        labels = load(config(root, path, TRUST_LABEL_ORDER=True), tmp_path)
    assert labels.tolist() == (np.arange(len(keys)) % 5).tolist()
    assert any("TRUST_LABEL_ORDER" in r.message and str(path) in r.message for r in caplog.records)


def test_a_bare_label_file_of_the_wrong_length_says_so_first(tree: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, _ = tree
    path = tmp_path / "labels.npy"
    np.save(path, np.zeros(10, dtype=np.int64))
    with pytest.raises(LabelError, match="10 labels but the training dataset has 12 images"):
        load(config(root, path), tmp_path)
