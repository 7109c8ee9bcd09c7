"""Pseudo-labels for training: the experiment's cluster labels or DATA.TRAIN.LABEL_PATHS, checked
before the first step (length, dtype, range), with messages naming the file and the numbers."""

from __future__ import annotations

import io

import numpy as np

from clusterfit import artifacts
from clusterfit.artifacts.layout import LABELS, cluster_folder
from clusterfit.config import Config
from clusterfit.errors import UserError
from clusterfit.storage import Store, read_uri, sha256_bytes


class LabelError(UserError, ValueError):
    """A label file that does not fit the dataset or NUM_CLUSTERS."""


def load_labels(cfg: Config, store: Store, num_images: int) -> tuple[np.ndarray, str, str]:
    """(labels int64 (num_images,), source URI, digest); -1 marks images without a label."""
    if cfg.DATA.TRAIN.LABEL_PATHS:
        uri = cfg.DATA.TRAIN.LABEL_PATHS[0]
        data = read_uri(uri, cfg.STORAGE)
        try:
            labels = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise LabelError(f"DATA.TRAIN.LABEL_PATHS: {uri}: not a .npy array: {exc}") from exc
        digest = sha256_bytes(data)
    else:
        folder = cluster_folder(cfg)
        manifest = artifacts.read_manifest(store, folder)
        labels = artifacts.load_array(store, folder, LABELS, manifest)
        uri, digest = store.uri(f"{folder}/{LABELS}"), str(manifest["_digest"])
    check_labels(labels, uri, num_images, cfg.CLUSTERFIT.NUM_CLUSTERS)
    return labels.astype(np.int64), uri, digest


def check_labels(labels: np.ndarray, uri: str, num_images: int, num_clusters: int) -> None:
    if labels.ndim != 1:
        raise LabelError(f"{uri}: labels must be one-dimensional (one per image), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelError(f"{uri}: labels must be integers (int64), got dtype {labels.dtype}")
    if len(labels) != num_images:
        raise LabelError(f"{uri}: {len(labels)} labels but the training dataset has {num_images} images")
    valid = labels[labels != -1]
    if len(valid) == 0:
        raise LabelError(f"{uri}: no image has a label")
    low, high = int(valid.min()), int(valid.max())
    if low < 0 or high >= num_clusters:
        raise LabelError(
            f"{uri}: label ids range {low}..{high}, outside 0..{num_clusters - 1} "
            f"(CLUSTERFIT.NUM_CLUSTERS={num_clusters})"
        )
