"""Steps on a hostile ImageFolder tree (links out of the root, dangling links and loops, a FIFO, a socket, empty,
truncated and non-image files): DATA.ON_BAD_IMAGE=error fails naming the file and the reason and publishes
nothing; skip finishes, and the step's summary and log line count the skipped images per reason. Skipped
images keep their dataset index: no features, and label -1 in the cluster step's labels.npy."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clusterfit.config import Config
from clusterfit.data import build_source
from clusterfit.errors import UserError
from clusterfit.steps import cluster, extract, pretrain, train
from tests.conftest import tiny_config
from tests.steps.helpers import features_from_disk, manifest
from tests.test_image_files import bad_entries, png


def hostile_tree(base: Path) -> tuple[Path, dict[str, str]]:
    """(root, {key: "" or the reason it is skipped}) of two classes, one of them holding every kind of bad entry."""
    (base / "secret.png").write_bytes(png())
    root = base / "tree"
    expected = {f"cat/{name}": reason for name, reason in bad_entries(root / "cat", base / "secret.png").items()}
    for i in range(5):
        (root / "dog").mkdir(exist_ok=True)
        (root / "dog" / f"{i}.png").write_bytes(png(8 + i))
        expected[f"dog/{i}.png"] = ""
    return root, expected


def experiment(root: Path, data: Path, on_bad_image: str, **extra: Any) -> Config:
    return tiny_config(
        root,
        **{
            "DATA.TRAIN.DATA_SOURCES": "[disk_folder]",
            "DATA.TRAIN.DATA_PATHS": f"[{data}]",
            "DATA.ON_BAD_IMAGE": on_bad_image,
            "DATA.NUM_DATALOADER_WORKERS": 1,  # a bad image met in a worker process
            "DATA.TRAIN.BATCHSIZE_PER_REPLICA": 4,
            "EXTRACT.CHUNK_SIZE": 8,
            "EXTRACT.PARTITIONS": "[TRAIN]",
            "PIPELINE.STEPS": "[extract,cluster]",  # from a random trunk: no pretrain
            "CLUSTERFIT.NUM_CLUSTERS": 2,
            **extra,
        },
    )


def skipped_of(cfg: Config, expected: dict[str, str]) -> tuple[list[int], dict[str, int]]:
    """(the dataset indices of the bad images, in dataset order; their count per reason): the oracle."""
    source = build_source(cfg, "TRAIN")
    reasons = [expected[source.key(i)] for i in range(len(source))]
    return [i for i, r in enumerate(reasons) if r], dict(sorted(Counter(r for r in reasons if r).items()))


def test_extract_with_error_fails_naming_the_first_bad_image_and_publishes_nothing(tmp_path: Path) -> None:
    data, _ = hostile_tree(tmp_path)
    cfg = experiment(tmp_path / "exp", data, "error")
    with pytest.raises(UserError) as error:
        extract.run(cfg)
    first = (data / "cat" / "dangling.png").as_uri()  # the first image in dataset order
    assert str(error.value).startswith(f"{first}: cannot read image (dangling_link): a symlink to nothing-here.png")
    assert not (tmp_path / "exp" / "features" / "train" / "_SUCCESS.json").exists()


BY_REASON = {
    "dangling_link": 1,
    "link_loop": 2,
    "not_a_file": 2,
    "not_an_image": 1,
    "outside_root": 1,
    "truncated": 1,
    "zero_bytes": 1,
}


def test_extract_and_cluster_with_skip_count_the_bad_images_and_label_them_minus_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, expected = hostile_tree(tmp_path)
    root = tmp_path / "exp"
    cfg = experiment(root, data, "skip")
    skipped, by_reason = skipped_of(cfg, expected)
    assert by_reason == BY_REASON
    # extract: the summary and the log line, and features for the readable images only.
    with caplog.at_level(logging.WARNING):
        extract.run(cfg)
    summary = manifest(root / "features" / "train")
    assert summary["skipped_by_reason"] == by_reason and summary["skipped_indices"] == skipped
    assert f"extract TRAIN: 9 of 16 images skipped (DATA.ON_BAD_IMAGE=skip), by reason {by_reason}" in caplog.text
    assert f"{(data / 'cat' / 'dangling.png').as_uri()} (dangling_link)" in caplog.text
    index, _ = features_from_disk(root, "train", cfg.CLUSTERFIT.FEATURES.LAYER_NAME)
    assert index.tolist() == [i for i in range(16) if i not in skipped]
    # cluster: one label per dataset index, -1 for the skipped images.
    cluster.run(cfg)
    labels = np.load(root / "clusters" / "res5-k2" / "labels.npy")
    assert len(labels) == 16 and np.flatnonzero(labels == -1).tolist() == skipped


@pytest.mark.slow  # two short trainings of a ResNet-18: about 10 s on 2 cores
def test_pretrain_and_train_with_skip_count_the_bad_images_they_meet(tmp_path: Path) -> None:
    data, _ = hostile_tree(tmp_path)
    root = tmp_path / "exp"
    one_epoch = {
        "DATA.NUM_DATALOADER_WORKERS": 0,
        "DATA.TRANSFORMS.TRAIN_CROP_SIZE": 8,  # a quarter of the compute of 16 pixels
        "OPTIMIZER.NUM_EPOCHS": 1,
        "PRETRAIN.OPTIMIZER.NUM_EPOCHS": 1,
    }
    # pretrain meets every image once an epoch (16 images, batches of 4).
    pretrain.run(experiment(root, data, "skip", **one_epoch, **{"PRETRAIN.BATCHSIZE_PER_REPLICA": 4}))
    rows = [json.loads(line) for line in (root / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_by_reason"] == BY_REASON and manifest(root / "pretrain")["skipped_by_reason"] == BY_REASON
    assert np.isfinite(rows[-1]["loss"])
    # train on labels that name the bad images too (a bare file, vouched for): it meets them and counts them.
    np.save(tmp_path / "labels.npy", np.arange(16) % 2)
    vouched = {"DATA.TRAIN.LABEL_PATHS": f"[{tmp_path / 'labels.npy'}]", "DATA.TRAIN.TRUST_LABEL_ORDER": "true"}
    train.run(experiment(root, data, "skip", **one_epoch, **vouched))
    assert manifest(root / "train")["skipped_by_reason"] == BY_REASON
