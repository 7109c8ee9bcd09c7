"""The cluster step's VISSL options: PCA before k-means, DATA_LIMIT, TEST_PARTITION, and the recorded k-means choice.

One extraction (digits, random ResNet-18, res5: 512-d) feeds several in-process cluster runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clusterfit import kmeans
from clusterfit.artifacts.layout import CLUSTER_STATS, PCA_COMPONENTS, PCA_MEAN
from clusterfit.steps import cluster
from tests.conftest import run_ok, tiny_config, tiny_overrides
from tests.steps.helpers import features_from_disk, manifest

STEP1 = {"PIPELINE.STEPS": "[extract,cluster]"}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster") / "exp"
    run_ok("extract", *tiny_overrides(root, **STEP1))
    return root


def run_cluster(root: Path, tmp_path: Path, **extra: Any) -> tuple[Path, dict[str, Any]]:
    """A cluster run on `root`'s features into its own experiment root (a copy of the features)."""
    own = tmp_path / "exp"
    shutil.copytree(root / "features", own / "features")
    cfg = tiny_config(own, **STEP1, **extra)
    result = cluster.run(cfg)
    folder = own / result.folder
    return folder, json.loads((folder / CLUSTER_STATS).read_text())


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bruteforce_labels(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    sq = ((points[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    return sq.argmin(1)


@pytest.mark.parametrize("whitening", ["whiten", "whiten_l2", "none"])
def test_pca_before_kmeans_is_fitted_on_train_and_applied_to_every_split(
    extracted: Path, tmp_path: Path, whitening: str
) -> None:
    n_dims = 16
    folder, stats = run_cluster(
        extracted,
        tmp_path,
        **{"CLUSTERFIT.FEATURES.DIMENSIONALITY_REDUCTION": n_dims, "CLUSTERFIT.FEATURES.PCA_WHITENING": whitening},
    )
    assert {PCA_MEAN, PCA_COMPONENTS} <= set(manifest(folder)["files"])
    mean, components = np.load(folder / PCA_MEAN), np.load(folder / PCA_COMPONENTS)
    centroids = np.load(folder / "centroids.npy")
    assert components.shape == (n_dims, 512) and centroids.shape == (20, n_dims)
    assert stats["dimensionality_reduction"] == {"dims_in": 512, "dims_out": n_dims, "whitening": whitening}
    # Oracle: the covariance of the L2-normalised TRAIN features (every point is sampled at K=20).
    _, train = features_from_disk(extracted, "train", "res5")
    x = unit(train.astype(np.float64))
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-5)
    projected = (x - x.mean(0)) @ components.T.astype(np.float64)
    cov = projected.T @ projected / len(x)
    top = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1][:n_dims]
    if whitening == "none":  # the top principal axes: their variances, uncorrelated
        np.testing.assert_allclose(cov, np.diag(top), rtol=1e-3, atol=1e-6)
    else:  # whitened: unit variance along each of them
        np.testing.assert_allclose(cov, np.eye(n_dims), atol=1e-3)
    # Every split is assigned in the projected space: the brute-force argmin with the saved projection.
    for split, name in (("train", "labels.npy"), ("test", "test/labels.npy")):
        _, feats = features_from_disk(extracted, split, "res5")
        points = (unit(feats.astype(np.float64)) - mean) @ components.T
        if whitening == "whiten_l2":
            points = unit(points)
        labels = np.load(folder / name)
        assert np.mean(bruteforce_labels(points, centroids) == labels) > 0.995, split


def test_data_limit_caps_the_training_sample(extracted: Path, tmp_path: Path) -> None:
    _, stats = run_cluster(extracted, tmp_path, **{"CLUSTERFIT.DATA_LIMIT": 300})
    assert stats["train_points"] == 300
    assert stats["num_points"] == 1437  # every image is still assigned


def test_test_partition_empty_assigns_the_clustered_split_only(extracted: Path, tmp_path: Path) -> None:
    folder, _ = run_cluster(extracted, tmp_path, **{"CLUSTERFIT.FEATURES.TEST_PARTITION": "''"})
    files = set(manifest(folder)["files"])
    assert "labels.npy" in files and "test/labels.npy" not in files


def test_stats_record_the_kmeans_choice(extracted: Path, tmp_path: Path) -> None:
    _, stats = run_cluster(extracted, tmp_path)
    choice = stats["algorithm_choice"]
    assert choice["requested"] == "auto" and choice["algorithm"] == "lloyd"  # d=512 < 1024
    assert (choice["k"], choice["dim"], choice["unit_sphere"]) == (20, 512, True)
    assert choice["faiss_version"] == kmeans.faiss_version() and choice["reason"]
    assert stats["train_points"] == 1437 and "dimensionality_reduction" not in stats
