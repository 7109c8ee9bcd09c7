"""MNIST-format IDX files as a data source (clusterfit/idx.py): exact reading, local and s3://,
Debian's Fashion-MNIST, and errors that name the file and say where to get the data."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clusterfit.config import Config, load_config
from clusterfit.data import build_source
from clusterfit.idx import IdxError, parse_idx
from clusterfit.storage import Store

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray, kind: int = 0x08) -> bytes:
    """An IDX file as the format's definition lays it out, written independently of the reader."""
    header = bytes([0, 0, kind, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_dataset(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(30, dtype=np.uint8) % 3,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(12, dtype=np.uint8) % 3,
    }


def config(path: str, partition: str = "TRAIN", **split: Any) -> Config:
    return load_config(
        overrides={
            "DATA": {partition: {"DATA_SOURCES": ["mnist_idx"], "DATA_PATHS": [path], "IMAGE_SIZE": 28, **split}}
        }
    )


def test_both_splits_read_exactly_from_a_store_gzipped_or_not(store: Store, request: pytest.FixtureRequest) -> None:
    # The `store` fixture runs this on file:// and on a real S3 server.
    arrays = tiny_dataset(np.random.default_rng(0))
    for i, (name, array) in enumerate(arrays.items()):
        data = idx_bytes(array)
        store.put_bytes(f"fmnist/{name}.gz" if i % 2 else f"fmnist/{name}", gzip.compress(data) if i % 2 else data)
    for partition, prefix in (("TRAIN", "train"), ("TEST", "t10k")):
        cfg = config(f"{store.root}/fmnist", partition)
        if store.root.startswith("s3://"):
            cfg.STORAGE = request.getfixturevalue("s3_env").settings()
        source = build_source(cfg, partition)
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        assert len(source) == len(images)
        assert source.targets is not None and source.targets.tolist() == labels.tolist()
        picture = np.asarray(source.load(7))
        assert (
            picture.shape == (28, 28, 3)
            and (picture[..., 0] == images[7]).all()
            and (picture[..., 2] == images[7]).all()
        )
        assert source.key(7) == f"{prefix}[7]"


def test_agrees_with_torchvisions_reader_on_debians_fashion_mnist(tmp_path: Path) -> None:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    assert FASHION_MNIST.is_dir(), "run `bash tests/infra/install_node_deps.sh` as root (dataset-fashion-mnist)"
    source = build_source(config(str(FASHION_MNIST), "TEST"), "TEST")
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # torchvision reads uncompressed files only
        (tmp_path / name).write_bytes(gzip.decompress((FASHION_MNIST / f"{name}.gz").read_bytes()))
    images = read_image_file(str(tmp_path / "t10k-images-idx3-ubyte")).numpy()
    assert len(source) == 10_000 and (source.images == images).all()  # type: ignore[attr-defined]
    assert source.targets is not None
    assert (source.targets == read_label_file(str(tmp_path / "t10k-labels-idx1-ubyte")).numpy()).all()


def test_a_balanced_seeded_subset_of_fashion_mnist() -> None:
    sampling = {"IS_BALANCED": True, "SEED": 3}
    source = build_source(config(str(FASHION_MNIST), DATA_LIMIT=1000, DATA_LIMIT_SAMPLING=sampling), "TRAIN")
    assert len(source) == 1000 and source.targets is not None
    assert np.bincount(source.targets).tolist() == [100] * 10
    again = build_source(config(str(FASHION_MNIST), DATA_LIMIT=1000, DATA_LIMIT_SAMPLING=sampling), "TRAIN")
    assert (again.indices == source.indices).all()  # type: ignore[attr-defined]
    other = build_source(
        config(str(FASHION_MNIST), DATA_LIMIT=1000, DATA_LIMIT_SAMPLING={**sampling, "SEED": 4}), "TRAIN"
    )
    assert (other.indices != source.indices).any()  # type: ignore[attr-defined]


def test_missing_files_name_the_key_and_where_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(IdxError) as err:
        build_source(config(str(tmp_path)), "TRAIN")
    message = str(err.value)
    assert "DATA.TRAIN.DATA_PATHS" in message and "train-images-idx3-ubyte[.gz] not found" in message
    assert "dataset-fashion-mnist" in message and "download=True" in message


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (idx_bytes(np.zeros((4, 28, 28)))[:-10], "truncated?"),
        (idx_bytes(np.zeros((4, 28, 28)))[:9], "truncated IDX header"),
        (idx_bytes(np.zeros((4, 28, 28)), kind=0x0D), "value type 0x0d"),
        (b"\x89PNG\r\n\x1a\n", "not an IDX file"),
        (gzip.compress(idx_bytes(np.zeros(3)), mtime=0)[:-8], "not a readable gzip file"),
    ],
)
def test_a_broken_file_is_named(data: bytes, needle: str) -> None:
    with pytest.raises(IdxError, match="train-images") as err:
        parse_idx(data, "file:///data/train-images-idx3-ubyte")
    assert needle in str(err.value)


def test_images_and_labels_that_do_not_pair_up_are_refused(tmp_path: Path) -> None:
    arrays = tiny_dataset(np.random.default_rng(1))
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:-1]
    for name, array in arrays.items():
        (tmp_path / name).write_bytes(idx_bytes(array))
    with pytest.raises(IdxError, match=r"DATA\.TRAIN\.DATA_PATHS: .*\(30, 28, 28\).*\(29,\) do not pair up"):
        build_source(config(str(tmp_path)), "TRAIN")
