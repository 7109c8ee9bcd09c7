"""EXTRACT.STORAGE_DTYPE: features stored as float16 or bfloat16 (half the bytes), clustered as float32."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterfit.artifacts.features import InputError, decode_features, encode_features
from clusterfit.steps import extract
from clusterfit.storage import open_store
from tests.conftest import cli, run_ok, tiny_overrides
from tests.steps.helpers import features_from_disk, manifest

STEP1 = [
    "config.PIPELINE.STEPS=[extract,cluster]",
    "config.DATA.TRAIN.DATA_LIMIT=512",
    "config.EXTRACT.PARTITIONS=[TRAIN]",
]


def test_bfloat16_encoding_is_torchs_round_to_nearest_even() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10_000) * 10.0 ** rng.integers(-6, 6, 10_000), [0.0, -0.0, 1e38, -3e-39]])
    x = x.astype(np.float32).reshape(-1, 2)
    stored = encode_features(x, "bfloat16")
    assert stored.dtype == np.uint16 and stored.shape == x.shape
    oracle = torch.from_numpy(x).to(torch.bfloat16).float().numpy()  # torch's own conversion
    np.testing.assert_array_equal(decode_features(stored, "bfloat16"), oracle)


def test_float16_and_float32_round_trip() -> None:
    x = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    np.testing.assert_array_equal(decode_features(encode_features(x, "float32"), "float32"), x)
    half = decode_features(encode_features(x, "float16"), "float16")
    assert half.dtype == np.float32
    np.testing.assert_array_equal(half, x.astype(np.float16).astype(np.float32))


def test_a_bfloat16_manifest_over_a_float_part_is_refused() -> None:
    with pytest.raises(InputError, match="uint16"):
        decode_features(np.zeros((2, 2), np.float32), "bfloat16")


def test_features_beyond_float16_fail_naming_the_part_and_the_key(tmp_path: Path) -> None:
    store = open_store((tmp_path / "root").as_uri())
    batch = (np.arange(2), np.array(["", ""]), {"res5": np.array([[1.0, 7e4], [0.5, 2.0]], np.float32)})
    with pytest.raises(InputError, match=r"res5/part-00000-000000\.npy.*7e\+04.*EXTRACT\.STORAGE_DTYPE=bfloat16"):
        extract.write_chunk(store, "features/train", "fp", 0, 0, ["res5"], [batch], "float16")
    assert not list((tmp_path / "root").rglob("_chunks/*"))  # no marker: the chunk is not done
    extract.write_chunk(store, "features/train", "fp", 0, 0, ["res5"], [batch], "bfloat16")  # the range fits


@pytest.fixture(scope="module")
def float32_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("f32") / "exp"
    run_ok("run", *tiny_overrides(root), *STEP1)
    return root


@pytest.mark.parametrize("dtype,stored,rel_tol,agree", [("float16", "<f2", 1e-3, 0.97), ("bfloat16", "<u2", 8e-3, 0.9)])
def test_half_precision_storage_halves_the_parts_and_clusters_alike(
    float32_root: Path, tmp_path: Path, dtype: str, stored: str, rel_tol: float, agree: float
) -> None:
    root = tmp_path / "exp"
    proc = run_ok("run", *tiny_overrides(root), *STEP1, f"config.EXTRACT.STORAGE_DTYPE={dtype}")
    feats = manifest(root / "features/train")
    assert feats["storage_dtype"] == dtype
    parts = {n: e for n, e in feats["files"].items() if n.startswith("res5/part-") and not n.endswith("-index.npy")}
    full = manifest(float32_root / "features/train")["files"]
    assert all(e["dtype"] == stored for e in parts.values())
    assert sum(e["size"] for e in parts.values()) < 0.51 * sum(full[n]["size"] for n in parts)
    # The stored features are the float32 ones rounded (same model, same images), read back as float32.
    _, reference = features_from_disk(float32_root, "train", "res5")
    _, half = features_from_disk(root, "train", "res5")
    decoded = decode_features(half, dtype)
    error = np.abs(decoded - reference).max(axis=1) / np.abs(reference).max(axis=1)
    assert error.max() < rel_tol, error.max()
    # The cluster step reads them; its labels mostly agree with float32's (k-means from the same seed).
    labels, labels32 = (
        np.load(root / "clusters/res5-k20/labels.npy"),
        np.load(float32_root / "clusters/res5-k20/labels.npy"),
    )
    assert labels.shape == labels32.shape == (512,)
    assert (labels == labels32).mean() >= agree, ((labels == labels32).mean(), proc.stderr[-2000:])


def test_changing_the_storage_dtype_redoes_the_extraction(float32_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "exp"
    shutil.copytree(float32_root, root)
    again = run_ok("extract", *tiny_overrides(root), *STEP1)
    assert "already published" in again.stderr
    proc = cli("extract", *tiny_overrides(root), *STEP1, "config.EXTRACT.STORAGE_DTYPE=float16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already published" not in proc.stderr
    assert manifest(root / "features/train")["storage_dtype"] == "float16"
