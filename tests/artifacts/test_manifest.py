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


@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_no_manifest_for_a_folder_with_a_missing_or_partial_object(store: Store, damage: str) -> None:
    ledger = artifacts.Ledger(store, "features/train/res5")
    ledger.put_array("part-00000-000000.npy", np.ones((4, 8), dtype=np.float32))
    ledger.put_json("stats.json", {"n": 4})
    data = store.get_bytes("features/train/res5/part-00000-000000.npy")
    if damage == "missing":  # a lost upload, or a part deleted by someone else meanwhile
        store.delete("features/train/res5/part-00000-000000.npy")
    else:  # what a store without atomic writes can hold after a cut-off upload
        store.put_bytes("features/train/res5/part-00000-000000.npy", data[: len(data) // 2])
    with pytest.raises(artifacts.ArtifactError) as err:
        artifacts.publish(ledger, step="extract", config={}, inputs={}, fingerprint_="fp", started_s=time.time())
    print(err.value)
    assert store.uri("features/train/res5/part-00000-000000.npy") in str(err.value)
    assert ("is missing" if damage == "missing" else f"has {len(data) // 2:,} bytes") in str(err.value)
    assert not store.exists("features/train/res5/_SUCCESS.json")
    with pytest.raises(artifacts.ArtifactError, match="no _SUCCESS.json"):
        artifacts.read_manifest(store, "features/train/res5")
