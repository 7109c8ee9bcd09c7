"""What extract and cluster record about the dataset (the sampled indices, its identity), and train's
label check that relies on it: labels of other images are refused, whoever points at them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clusterfit.config import Config
from clusterfit.data import build_source
from clusterfit.labels import LabelError, load_labels
from clusterfit.steps import cluster, extract
from clusterfit.storage import open_store
from tests.conftest import tiny_config
from tests.steps.helpers import manifest

CLASSES = ("ant", "bee", "cow", "elk")
PER_CLASS = 6
LIMIT = 12


def experiment(root: Path, data: Path, **extra: object) -> Config:
    return tiny_config(
        root,
        **{
            "DATA.TRAIN.DATA_SOURCES": "[disk_folder]",
            "DATA.TRAIN.DATA_PATHS": f"[{data}]",
            "DATA.TRAIN.DATA_LIMIT": LIMIT,
            "EXTRACT.PARTITIONS": "[TRAIN]",
            "PIPELINE.STEPS": "[extract,cluster]",  # from a random trunk: no pretrain
            "CLUSTERFIT.NUM_CLUSTERS": 3,
            **extra,
        },
    )


@pytest.fixture(scope="module")
def step1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(experiment root, data folder) after extract and cluster on 12 of 24 images of a folder tree."""
    base = tmp_path_factory.mktemp("identity")
    data = base / "animals"
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            (data / name).mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), (60 * c, 40 * i, 90)).save(buffer, format="PNG")
            (data / name / f"{i}.png").write_bytes(buffer.getvalue())
    root = base / "exp"
    cfg = experiment(root, data)
    extract.run(cfg)
    cluster.run(cfg)
    return root, data


def test_extract_records_which_images_data_limit_sampled(step1: tuple[Path, Path]) -> None:
    root, data = step1
    source = build_source(experiment(root, data), "TRAIN")
    folder = root / "features/train"
    recorded = manifest(folder)["data_limit_indices"]
    indices = np.load(folder / recorded)
    full = build_source(experiment(root, data, **{"DATA.TRAIN.DATA_LIMIT": -1}), "TRAIN")
    assert indices.dtype == np.int64 and len(indices) == LIMIT
    assert [full.name(int(i)) for i in indices] == [source.name(i) for i in range(LIMIT)]
    assert len({full.name(int(i)).split("/")[-2] for i in indices}) > LIMIT // PER_CLASS  # not the first classes
    assert recorded in manifest(folder)["files"]


def test_our_labels_are_accepted_for_the_images_they_were_made_from(step1: tuple[Path, Path]) -> None:
    root, data = step1
    labels_file = root / "clusters/res5-k3/labels.npy"
    for cfg in (experiment(root, data), experiment(root, data, **{"DATA.TRAIN.LABEL_PATHS": f"[{labels_file}]"})):
        labels, _, _ = load_labels(cfg, open_store(str(root)), LIMIT)  # builds DATA.TRAIN itself
        assert labels.tolist() == np.load(labels_file).tolist()


@pytest.mark.parametrize("pointed", [True, False])
def test_our_labels_are_refused_for_other_images_of_the_same_count(step1: tuple[Path, Path], pointed: bool) -> None:
    root, data = step1
    labels_file = root / "clusters/res5-k3/labels.npy"
    extra: dict[str, object] = {"DATA.TRAIN.DATA_LIMIT_SAMPLING.SEED": 1}
    if pointed:
        extra["DATA.TRAIN.LABEL_PATHS"] = f"[{labels_file}]"
    cfg = experiment(root, data, **extra)
    with pytest.raises(LabelError) as error:
        load_labels(cfg, open_store(str(root)), LIMIT, build_source(cfg, "TRAIN"))
    message = str(error.value)
    assert "labels.npy" in message and "12 images" in message and "DATA.TRAIN" in message
