"""The `_SUCCESS.json` manifest that publishes a folder, on local files and on a real S3 server."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from clusterfit import artifacts
from clusterfit.storage import Store


def ledger_folder(store: Store, folder: str = "clusters/k3") -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Publish a small cluster-like folder; returns (manifest, labels, centroids)."""
    labels = np.arange(40, dtype=np.int64) % 3
    centroids = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    ledger = artifacts.Ledger(store, folder)
    ledger.put_array("labels.npy", labels)
    ledger.put_array("centroids.npy", centroids)
    ledger.put_json("stats.json", {"sizes": np.bincount(labels).tolist()})
    artifacts.publish(ledger, step="cluster", config={}, inputs={}, fingerprint_="fp", started_s=time.time())
    return artifacts.read_manifest(store, folder), labels, centroids


def test_altered_object_is_caught_by_the_manifest(store: Store) -> None:
    manifest, labels, centroids = ledger_folder(store)
    np.testing.assert_array_equal(artifacts.load_array(store, "clusters/k3", "labels.npy", manifest), labels)
    assert manifest["files"]["centroids.npy"]["shape"] == [3, 8]
    assert manifest["files"]["centroids.npy"]["dtype"] == "<f4"
    # Same shape, same size, different content: only the sha256 can tell.
    store.put_array("clusters/k3/labels.npy", (labels + 1) % 3)
    with pytest.raises(artifacts.ArtifactError) as err:
        artifacts.load_array(store, "clusters/k3", "labels.npy", manifest)
    message = str(err.value)
    print(message)
    assert store.uri("clusters/k3/labels.npy") in message and "altered" in message
    np.testing.assert_array_equal(artifacts.load_array(store, "clusters/k3", "centroids.npy", manifest), centroids)


def test_folder_without_success_manifest_is_refused(store: Store) -> None:
    ledger = artifacts.Ledger(store, "features/TRAIN/res5")
    ledger.put_array("part-0-0.npy", np.zeros((4, 2), dtype=np.float32))  # the step died before publishing
    with pytest.raises(artifacts.ArtifactError) as err:
        artifacts.read_manifest(store, "features/TRAIN/res5")
    print(err.value)
    assert store.uri("features/TRAIN/res5") in str(err.value) and "_SUCCESS.json" in str(err.value)
    assert not artifacts.is_published(store, "features/TRAIN/res5", "any")
